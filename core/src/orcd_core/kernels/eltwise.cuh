// orcd-worker core kernels: element-wise ops (part of core.cu, which includes every op family).
#pragma once
#include "common.cuh"

// ================================================================================================
// Element-wise
// ================================================================================================
// y = a + b, b broadcast with period nb (nb == n for a plain add, D for a bias over rows)
extern "C" __global__ void add_f32(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ y,
                                   i64 n, i64 nb) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a[i] + b[nb == n ? i : i % nb];
}

// y[r, c] = silu(g[r * gs + c]) * u[r * us + c]: gate and up may be column slices of one gate|up output
extern "C" __global__ void silu_mul_f32(const float* __restrict__ g, i64 gs, const float* __restrict__ u, i64 us,
                                        float* __restrict__ y, int rows, int cols) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (i64)rows * cols) {
        const i64 r = i / cols, c = i - r * cols;
        const float v = g[r * gs + c];
        y[i] = v / (1.0f + expf(-v)) * u[r * us + c];
    }
}

// tanh approximation, as ggml_gelu
extern "C" __global__ void gelu_f32(const float* __restrict__ x, float* __restrict__ y, i64 n) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        const float v = x[i];
        y[i] = 0.5f * v * (1.0f + tanhf(0.7978845608028654f * v * (1.0f + 0.044715f * v * v)));
    }
}

extern "C" __global__ void f32_to_f16(const float* __restrict__ x, half_bits* __restrict__ y, i64 n) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = f2h(x[i]);
}

// y[r, c] = x[r * row_stride + c]: a row-strided view (a column slice) made contiguous
extern "C" __global__ void copy_rows_f32(const float* __restrict__ x, float* __restrict__ y, int rows, int cols,
                                         i64 row_stride) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (i64)rows * cols) {
        const i64 r = i / cols, c = i - r * cols;
        y[i] = x[r * row_stride + c];
    }
}
