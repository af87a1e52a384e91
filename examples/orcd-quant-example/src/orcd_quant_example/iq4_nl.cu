// orcd-quant-example: CUDA kernels for IQ4_NL (GGML type 20), the example plugin's format.
//
// Block (llama.cpp's block_iq4_nl, 18 bytes, 32 weights): d (fp16) | qs[16]. Byte j of qs holds the
// 4-bit index of weight j (low nibble) and of weight j + 16 (high nibble); weight = d * KVALUES[index],
// KVALUES the 16 fixed levels of iq4_nl.py.
//
// One block is one 32-weight item; the decode GEMV, dequantize-to-fp16 (the prefill GEMM's operand)
// and row gather are the core's templates (quant_kernels.cuh), instantiated below with the uniform
// names gemv_IQ4_NL, gemv_t4_IQ4_NL, dequant_f16_IQ4_NL, get_rows_IQ4_NL. The core inlines the
// header when it compiles this file (orcd_core.kernels.expand), so no include path is needed.
#include "quant_kernels.cuh"

// The 16 levels plus 128 (1..241), as unsigned bytes packed little-endian into four words: byte i of
// the 16 is KVALUES[i] + 128. tests/test_iq4_nl.py checks these words against iq4_nl.KVALUES.
#define IQ4NL_T0 0x3F2D1801u  // levels 0-3:  -127, -104, -83, -65
#define IQ4NL_T1 0x766A5D4Fu  // levels 4-7:   -49,  -35, -22, -10
#define IQ4NL_T2 0xA6998D81u  // levels 8-11:    1,   13,  25,  38
#define IQ4NL_T3 0xF1D9C5B5u  // levels 12-15:  53,   69,  89, 113

// Level q (0..15) as a float, from registers (no table in memory, which lanes would read at
// different addresses): __byte_perm(a, b, s) puts byte s (0..7) of the eight bytes of (a, b) into
// byte 0 of its result, so q's low three bits pick within the half of the table that bit 3 chooses.
// The biased byte u = level + 128 becomes the level exactly by the magic-number conversion (common.cuh).
__device__ __forceinline__ float iq4nl_level(u32 q) {
    const u32 lo = __byte_perm(IQ4NL_T0, IQ4NL_T1, q & 7u);
    const u32 hi = __byte_perm(IQ4NL_T2, IQ4NL_T3, q & 7u);
    return small_u2f(((q & 8u) ? hi : lo) & 0xFFu, ORCD_MAGIC + 128.0f);
}

struct FmtIQ4_NL {
    static constexpr int QK = 32, TS = 18, IPB = 1;
    __device__ static __forceinline__ void item(const u8* blk, int, float v[32], int& x0, int& x1) {
        u32 q[4];
        ld16_a2(blk + 2, q);  // qs: 18-byte blocks are only 2-byte aligned
        const float d = h2f(ld2(blk));
#pragma unroll
        for (int k = 0; k < 16; ++k) {
            const u32 b = byte_of(q, k);
            v[k] = d * iq4nl_level(b & 0xFu);  // weight k; d * level is exact in float32, as in NumPy
            v[16 + k] = d * iq4nl_level(b >> 4);  // weight 16 + k
        }
        x0 = 0; x1 = 16;
    }
};

ORCD_QUANT_KERNELS(IQ4_NL, FmtIQ4_NL)
