// orcd-worker: activations quantized to int8 for the int8-activation decode GEMVs (gemv_q8_*).
//
// A row of K elements (K a multiple of Q8_GROUP = 32) is quantized per group of 32 as llama.cpp's q8_1:
// d = amax / 127 and q = x * (127 / amax) in float32, rounded to the nearest integer (ties to even;
// d = 0 and q = 0 for a group of zeros). In memory (quantize_q8 writes it, norm.cuh; the GEMVs stage it)
// a row is q8_row_bytes(K) bytes: the K int8 (element e at byte e), then per group a float4 {d, s0, s1,
// s}: s0 and s1 the sums of the dequantized values d q over the group's first and second 16 elements, s
// over all 32 (each d times an exact integer sum, so one rounding). A weight format's dot (F::dot_q8,
// quant_kernels.cuh) multiplies its integer codes with the q by dp4a, four products an instruction, and
// applies its scales and the group's d after; its offsets and mins take the sums: for w = a q_w - b over a
// run of the group, sum w (d q) = a d sum q_w q - b s.
#pragma once
#include "common.cuh"

static_assert(Q8_GROUP == 32 && Q8_META_BYTES == 16, "a group is 8 lanes' float4s; its meta one float4");

__host__ __device__ __forceinline__ i64 q8_row_bytes(int K) { return (i64)K + (i64)(K / Q8_GROUP) * Q8_META_BYTES; }

// Staged in shared memory, the int8 part's 16-byte chunks are swizzled: chunk k (elements 16k .. 16k + 15)
// at slot k ^ ((k >> 3) & 3), a permutation inside each 64 bytes. Lane l of a GEMV reads the 64 bytes of
// its part l (k-quants) or the 32 of its block l (32-element formats), chunk by chunk: without the
// swizzle the 8 lanes of a quarter-warp hit two bank groups (4-way conflicts), with it eight.
__device__ __forceinline__ int q8_swz(int k) { return k ^ ((k >> 3) & 3); }

// One token's quantized row as the GEMVs see it in shared memory: the chunks, then the groups' metas.
struct Q8Row {
    const int4* q;    // K / 16 chunks, swizzled
    const float4* m;  // K / 32 metas {d, s0, s1, s}
    __device__ __forceinline__ int4 chunk(int k) const { return q[q8_swz(k)]; }
    __device__ __forceinline__ float4 meta(int g) const { return m[g]; }
};

// A warp's 32 consecutive elements e0 + lane (lane l holds its value v; e0 a multiple of Q8_GROUP) of a row
// of K elements quantized into the row's q8 layout at `row`: the same bytes and metas as quantize_q8 writes
// for these values (the group's max, q = rint(v * (127 / amax)), the sums as d times exact integer sums), so
// a GEMV reads the same row whichever wrote it. Every lane of the warp calls it.
__device__ __forceinline__ void q8_store_warp(float v, u8* __restrict__ row, int K, int e0) {
    const int lane = threadIdx.x & 31;
    const float amax = warp_max(fabsf(v));
    const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
    const int q = __float2int_rn(v * id);
    int s = q;  // the sum of this lane's half (lanes 0-15, 16-31)
#pragma unroll
    for (int o = 1; o < 16; o <<= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    const int s_other = __shfl_xor_sync(0xffffffffu, s, 16);
    const u32 b = (u32)q & 0xFFu;  // lane 4i packs lanes 4i .. 4i + 3
    const u32 w = b | (__shfl_down_sync(0xffffffffu, b, 1) << 8) | (__shfl_down_sync(0xffffffffu, b, 2) << 16) |
                  (__shfl_down_sync(0xffffffffu, b, 3) << 24);
    if ((lane & 3) == 0) *(u32*)(row + e0 + lane) = w;
    if (lane == 0) {
        const float d = amax / 127.0f;
        *(float4*)(row + K + (e0 / Q8_GROUP) * Q8_META_BYTES) = make_float4(d, d * (float)s, d * (float)s_other, d * (float)(s + s_other));
    }
}
