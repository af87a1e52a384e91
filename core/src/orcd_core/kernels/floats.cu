// orcd-worker core formats F32, F16, BF16 (block size 1): decode GEMV, dequantize-to-fp16, row gather.
// An "item" is 32 consecutive elements of a row, so rows must hold a multiple of 32 elements
// (checked by the launcher). Row starts are then 64-byte aligned (arena and GGUF alignment >= 32).
#include "quant_kernels.cuh"

struct FmtF32 {
    static constexpr int QK = 32, TS = 128, IPB = 1;
    __device__ static __forceinline__ void item(const u8* blk, int, float v[32], int& x0, int& x1) {
        const float4* p = (const float4*)blk;
#pragma unroll
        for (int c = 0; c < 8; ++c) {
            const float4 a = __ldg(p + c);
            v[4 * c] = a.x; v[4 * c + 1] = a.y; v[4 * c + 2] = a.z; v[4 * c + 3] = a.w;
        }
        x0 = 0; x1 = 16;
    }
};

struct FmtF16 {
    static constexpr int QK = 32, TS = 64, IPB = 1;
    __device__ static __forceinline__ void item(const u8* blk, int, float v[32], int& x0, int& x1) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const uint4 a = ld16(blk + 16 * c);
            v[8 * c + 0] = h2f_lo(a.x); v[8 * c + 1] = h2f_hi(a.x);
            v[8 * c + 2] = h2f_lo(a.y); v[8 * c + 3] = h2f_hi(a.y);
            v[8 * c + 4] = h2f_lo(a.z); v[8 * c + 5] = h2f_hi(a.z);
            v[8 * c + 6] = h2f_lo(a.w); v[8 * c + 7] = h2f_hi(a.w);
        }
        x0 = 0; x1 = 16;
    }
};

struct FmtBF16 {
    static constexpr int QK = 32, TS = 64, IPB = 1;
    __device__ static __forceinline__ void item(const u8* blk, int, float v[32], int& x0, int& x1) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const uint4 a = ld16(blk + 16 * c);
            const u32 w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                v[8 * c + 2 * j] = __uint_as_float(w[j] << 16);
                v[8 * c + 2 * j + 1] = __uint_as_float(w[j] & 0xFFFF0000u);
            }
        }
        x0 = 0; x1 = 16;
    }
};

ORCD_QUANT_KERNELS(F32, FmtF32)
ORCD_QUANT_KERNELS(F16, FmtF16)
ORCD_QUANT_KERNELS(BF16, FmtBF16)
