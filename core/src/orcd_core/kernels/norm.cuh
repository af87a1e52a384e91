// orcd-worker core kernels: normalization (part of core.cu, which includes every op family).
#pragma once
#include "common.cuh"
#include "q8.cuh"

// ================================================================================================
// Normalization: one block per row.
// ================================================================================================
// y = x / sqrt(mean(x^2) + eps) * w        (ggml_rms_norm followed by the weight multiply)
extern "C" __global__ void rms_norm_f32(const float* __restrict__ x, const float* __restrict__ w,
                                        float* __restrict__ y, int D, float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (i64)blockIdx.x * D;
    float* yr = y + (i64)blockIdx.x * D;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, scratch);
    const float r = 1.0f / sqrtf(ss / (float)D + eps);
    for (int i = threadIdx.x; i < D; i += blockDim.x) yr[i] = xr[i] * r * w[i];
}

// rms_norm_f32 for decode rows (D % 4 == 0), launched with the GEMV's block size: the arithmetic of
// the GEMV's fused RMS staging (stage_x1), so a row's normalized values are the same whether a GEMV
// stages the norm itself (one token, short rows) or reads this kernel's output (more rows).
extern "C" __global__ void rms_norm_rows(const float* __restrict__ x, const float* __restrict__ w,
                                         float* __restrict__ y, int D, float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (i64)blockIdx.x * D;
    float* yr = y + (i64)blockIdx.x * D;
    const int n4 = D >> 2;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n4; i += blockDim.x) ss += sumsq4(*(const float4*)(xr + 4 * i));
    const float r = rms_scale(block_sum(ss, scratch), D, eps);
    for (int i = threadIdx.x; i < n4; i += blockDim.x)
        *(float4*)(yr + 4 * i) = rms_apply4(*(const float4*)(xr + 4 * i), r, *(const float4*)(w + 4 * i));
}

// y = (x - mean) / sqrt(var + eps) * w + b  (ggml_norm followed by weight and bias; either may be null)
extern "C" __global__ void layer_norm_f32(const float* __restrict__ x, const float* __restrict__ w,
                                          const float* __restrict__ b, float* __restrict__ y, int D, float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (i64)blockIdx.x * D;
    float* yr = y + (i64)blockIdx.x * D;
    float s = 0.0f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) s += xr[i];
    const float mean = block_sum(s, scratch) / (float)D;
    float v = 0.0f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        const float c = xr[i] - mean;
        v += c * c;
    }
    const float r = 1.0f / sqrtf(block_sum(v, scratch) / (float)D + eps);
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        float o = (xr[i] - mean) * r;
        if (w) o *= w[i];
        if (b) o += b[i];
        yr[i] = o;
    }
}

// ================================================================================================
// Decode rows quantized to int8 for the int8-activation GEMVs (q8.cuh's layout): row t of out (at t *
// q8_row_bytes(K)) is rows t of x through the GEMV input `mode` (GEMV_X_*, as stage_x1: x as given,
// rms_norm(x) * aux with the norm weight aux, or silu(x) * aux with the up half aux), quantized. Grid
// (blocks along K, T rows); a thread takes 4 elements and 8 consecutive threads a group, so a group's
// max and sums are three butterflies. The RMS mode runs one block per row (the norm's sum over all of
// K first, as rms_norm_rows adds it); the others Q8_QUANT_THREADS threads a block, as many as cover K.
// quantize_q8_xf also writes the rows through the input op as float32 to xf (row t at t K; the MoE's
// router reads the norm's floats, its experts the int8 rows: one launch for both); a template flag, not a
// null test, so quantize_q8 (every dense decode GEMV's) carries neither the argument nor the store
// (with a null-tested xf in the one kernel, the only change next/moe made to a dense step, qwen2's step
// measured 1% slower: perf-notes, twelfth session).
// Launched early (PDL): nothing is read before the kernel ahead has ended.
// ================================================================================================
static_assert(Q8_QUANT_THREADS % 32 == 0 && Q8_QUANT_THREADS <= 1024, "whole warps, so whole groups, in a block");
template <bool XF>
__device__ __forceinline__ void quantize_q8_rows(const float* __restrict__ x, i64 x_stride, const float* __restrict__ aux,
                                                 i64 aux_stride, float eps, int mode, int K, u8* __restrict__ out,
                                                 float* __restrict__ xf) {
    __shared__ float red[32];
    const float* __restrict__ xr = x + (i64)blockIdx.y * x_stride;
    const float* __restrict__ ar = aux + (i64)blockIdx.y * aux_stride;  // (aux null and stride 0 in the plain mode)
    u8* __restrict__ o = out + (i64)blockIdx.y * q8_row_bytes(K);
    const int n4 = K >> 2;
    // the RMS mode's norm weight (no kernel writes it) requested before the wait: for a row that one pass
    // of the block covers (the launcher's case up to K = 4,096), its load is then off the chain of round
    // trips (x, the block's sum, the weight)
    const int i_first = blockIdx.x * blockDim.x + threadIdx.x;
    float4 w_first = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (mode == GEMV_X_RMS && i_first < n4) w_first = *(const float4*)(ar + 4 * i_first);
    pdl_trigger();
    pdl_wait();
    float r = 0.0f;
    if (mode == GEMV_X_RMS) {
        float ss = 0.0f;
        for (int i = threadIdx.x; i < n4; i += blockDim.x) ss += sumsq4(*(const float4*)(xr + 4 * i));
        r = rms_scale(block_sum(ss, red), K, eps);
    }
    // (the loop's bound is the same for the whole block: every lane of a warp reaches the shuffles)
    for (int i0 = blockIdx.x * blockDim.x; i0 < n4; i0 += gridDim.x * blockDim.x) {
        const int i = i0 + threadIdx.x;
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (i < n4) {
            v = *(const float4*)(xr + 4 * i);
            if (mode == GEMV_X_RMS) {
                v = rms_apply4(v, r, i == i_first ? w_first : *(const float4*)(ar + 4 * i));
            } else if (mode == GEMV_X_SILU) {  // as silu_mul_f32
                const float4 u = *(const float4*)(ar + 4 * i);
                v = make_float4(v.x / (1.0f + expf(-v.x)) * u.x, v.y / (1.0f + expf(-v.y)) * u.y,
                                v.z / (1.0f + expf(-v.z)) * u.z, v.w / (1.0f + expf(-v.w)) * u.w);
            }
            if constexpr (XF) *(float4*)(xf + (i64)blockIdx.y * K + 4 * i) = v;
        }
        float amax = fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 4));
        const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
        const int q0 = __float2int_rn(v.x * id), q1 = __float2int_rn(v.y * id);
        const int q2 = __float2int_rn(v.z * id), q3 = __float2int_rn(v.w * id);
        int s = (q0 + q1) + (q2 + q3);
        s += __shfl_xor_sync(0xffffffffu, s, 1);
        s += __shfl_xor_sync(0xffffffffu, s, 2);  // this thread's 16 elements
        const int s_other = __shfl_xor_sync(0xffffffffu, s, 4);
        if (i < n4) {
            *(u32*)(o + 4 * i) = (u32)(q0 & 0xFF) | ((u32)(q1 & 0xFF) << 8) | ((u32)(q2 & 0xFF) << 16) | ((u32)q3 << 24);
            if ((i & 7) == 0) {  // the group's first thread: s is its first 16's sum
                const float d = amax / 127.0f;
                *(float4*)(o + K + 2 * i) = make_float4(d, d * (float)s, d * (float)s_other, d * (float)(s + s_other));
            }
        }
    }
}
extern "C" __global__ void __launch_bounds__(1024)
    quantize_q8(const float* __restrict__ x, i64 x_stride, const float* __restrict__ aux, i64 aux_stride, float eps,
                int mode, int K, u8* __restrict__ out) {
    quantize_q8_rows<false>(x, x_stride, aux, aux_stride, eps, mode, K, out, nullptr);
}
extern "C" __global__ void __launch_bounds__(1024)
    quantize_q8_xf(const float* __restrict__ x, i64 x_stride, const float* __restrict__ aux, i64 aux_stride,
                   float eps, int mode, int K, u8* __restrict__ out, float* __restrict__ xf) {
    quantize_q8_rows<true>(x, x_stride, aux, aux_stride, eps, mode, K, out, xf);
}
