// orcd-quant-mxfp4: CUDA kernels for MXFP4 (OCP microscaling FP4, gpt-oss's expert weights).
//
// Block (llama.cpp's block_mxfp4, 17 bytes, 32 weights): e (E8M0 scale) | qs[16] (E2M1 codes).
// Weight j < 16 is the low nibble of qs[j], weight 16 + j its high nibble;
// value = E2M1_DOUBLED[code] * 2^(e - 128) (the table holds doubled values, so they are integers).
//
// One block is one 32-weight item; the GEMV, dequantize-to-fp16 and row gather come from the core's
// templates (quant_kernels.cuh: gemv_MXFP4, dequant_f16_MXFP4, get_rows_MXFP4), the expert-indexed
// GEMVs of the mixture of experts from moe_kernels.cuh (moe_gemv_glu_MXFP4, moe_down_MXFP4).
// ggml_e8m0_to_fp32_half(e) = 2^(e - 128): the normal float with biased exponent e - 1 for e >= 2.
#include "moe_kernels.cuh"

// ---- loading a 17-byte block ---------------------------------------------------------------------
// Blocks are only byte aligned (17-byte stride). The five aligned 32-bit words from (blk & ~3) always
// cover the block's 17 bytes and never reach past the word holding its last byte, so no load leaves
// the allocation. qs word j (qs bytes 4j..4j+3) starts one byte after the block: a funnel shift of
// two neighbouring words by 8 * (1 + blk % 4) bits, clamped so a shift of 32 takes the upper word.
__device__ __forceinline__ u32 mxfp4_load(const u8* blk, u32 q[4]) {
    const unsigned long long a = (unsigned long long)blk;
    const u32* base = (const u32*)(a & ~3ull);
    const u32 s = (u32)(a & 3ull);
    u32 r[5];
#pragma unroll
    for (int j = 0; j < 5; ++j) r[j] = __ldg(base + j);
    const u32 sh = 8u * (s + 1u);
#pragma unroll
    for (int j = 0; j < 4; ++j) q[j] = __funnelshift_rc(r[j], r[j + 1], sh);
    return (r[0] >> (8u * s)) & 0xFFu;  // e
}

// The 32 weights of a block as floats, value = E2M1_DOUBLED[code] * d (d = 2^(e - 128), or a normal
// stand-in the caller corrects), with integer ops and one FADD per weight (no fp16 -> fp32 conversion,
// which runs at 1/8 of the FMA rate and bounded the expert GEMVs):
//   magnitudes: a byte permute over the table {0,1,2,3,4,6,8,12} looks up four 3-bit codes at once;
//   a second byte permute puts a magnitude under the exponent byte 0x4B, so the float is 2^23 + m and
//   one FADD leaves m exactly; the code's sign bit goes onto d; one FMUL gives the exact product.
// Word j of qs holds qs bytes 4j..4j+3: nibble k (bits 4k..4k+3) is weight 4j + k/2 for even k (a low
// nibble) and 16 + 4j + k/2 for odd k (a high nibble).
#define E2M1_MAG_LO 0x03020100u  // doubled magnitudes of codes 0..3
#define E2M1_MAG_HI 0x0C080604u  // codes 4..7
__device__ __forceinline__ void e2m1_decode(const u32 q[4], float d, float v[32]) {
    const u32 db = __float_as_uint(d);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const u32 w = q[j];
        const u32 mag[2] = {__byte_perm(E2M1_MAG_LO, E2M1_MAG_HI, w & 0x7777u),
                            __byte_perm(E2M1_MAG_LO, E2M1_MAG_HI, (w >> 16) & 0x7777u)};
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const float m = __uint_as_float(__byte_perm(mag[k >> 2], 0x4B000000u, 0x7540u | (k & 3))) - ORCD_MAGIC;
            const float dk = __uint_as_float(db | ((w << (28 - 4 * k)) & 0x80000000u));
            v[(k & 1) * 16 + 4 * j + (k >> 1)] = m * dk;
        }
    }
}

struct FmtMXFP4 {
    static constexpr int QK = 32, TS = 17, IPB = 1;
    __device__ static __forceinline__ void item(const u8* blk, int, float v[32], int& x0, int& x1) {
        u32 q[4];
        const u32 e = mxfp4_load(blk, q);
        if (e >= 2u) {
            // d = 2^(e - 128) is a normal float (biased exponent e - 1): doubled * d is exact, bit-identical
            // to the reference's doubled * ggml_e8m0_to_fp32_half(e)
            e2m1_decode(q, __uint_as_float((e - 1u) << 23), v);
        } else {
            // d would be subnormal (2^-128, 2^-127); the H100 flushed such a multiply operand to zero, so
            // two normal factors: 2^-64 here, 2^(e - 64) after (the product, subnormal, is exact)
            e2m1_decode(q, __uint_as_float(63u << 23), v);
            const float rest = __uint_as_float((e + 63u) << 23);
#pragma unroll
            for (int k = 0; k < 32; ++k) v[k] *= rest;
        }
        x0 = 0; x1 = 16;
    }
};

ORCD_QUANT_KERNELS(MXFP4, FmtMXFP4)
ORCD_MOE_KERNELS(MXFP4, FmtMXFP4)
