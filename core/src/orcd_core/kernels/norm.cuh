// orcd-worker core kernels: normalization (part of core.cu, which includes every op family).
#pragma once
#include "common.cuh"

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
