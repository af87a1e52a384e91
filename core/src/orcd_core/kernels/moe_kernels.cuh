// orcd-worker: the expert-indexed GEMVs of a mixture of experts, written once over a format struct
// (the item interface of quant_kernels.cuh), for the decode path of Device.moe.
//
// An expert stack W [E, N, K] is stored as E * N rows of K weights (expert e's row n is row e * N + n).
// A *pair* p = t * k + s is token t's s-th chosen expert, ids[p]; expert ids and routing weights are
// read on the device, so the grids depend only on (T, k) and a decode step stays graph-capturable.
//
// ORCD_MOE_KERNELS(NAME, F) defines:
//   moe_gemv_glu_NAME     a[p, n] = act(W[e, n] . x + bias[e, n], W[e, F + n] . x + bias[e, F + n]),
//                         e = ids[p], N = F: gate|up rows of one expert and the GLU in one pass
//   moe_down_NAME         out[t, n] = sum_s wts[t, s] * (W[ids[t, s], n] . a[t * k + s] + bias[ids[t, s], n]):
//                         down projection and the weighted sum (slots in order: deterministic)
// One warp per output row; lane l takes items l, l + 32, ... of the row (consecutive bytes per warp).
// An expert id outside [0, E) writes NaN (ids come from moe_topk_softmax; NaN makes a bug visible).
#pragma once
#include "quant_kernels.cuh"

#define MOE_WARPS 4  // output rows per block

// act 0: SiLU GLU, silu(g) * u. act 1: ggml_swiglu_oai: x = min(g, limit), y = clamp(u, -limit, limit),
// x * sigmoid(alpha * x) * (y + 1).
__device__ __forceinline__ float moe_act(float g, float u, int act, float alpha, float limit) {
    if (act == 1) {
        const float xg = fminf(g, limit);
        const float yu = fmaxf(fminf(u, limit), -limit);
        return xg / (1.0f + expf(-alpha * xg)) * (yu + 1.0f);
    }
    return g / (1.0f + expf(-g)) * u;
}

// This lane's share of the dot products of NR rows (rows[r]) with x [K]: items lane, lane + 32, ...
template <class F, int NR>
__device__ __forceinline__ void moe_dots(const u8* const rows[NR], const float* __restrict__ x, int K, float acc[NR]) {
    const int lane = threadIdx.x & 31;
    const int n_items = K >> 5;
#pragma unroll
    for (int r = 0; r < NR; ++r) acc[r] = 0.0f;
#pragma unroll 2
    for (int it = lane; it < n_items; it += 32) {
        const int b = it / F::IPB, i = it - b * F::IPB;
#pragma unroll
        for (int r = 0; r < NR; ++r) {
            float v[32];
            int x0, x1;
            F::item(rows[r] + (i64)b * F::TS, i, v, x0, x1);
            const float4* xa = (const float4*)(x + b * F::QK + x0);
            const float4* xb = (const float4*)(x + b * F::QK + x1);
            float s = 0.0f;
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const float4 p = xa[c], q = xb[c];
                s += v[4 * c] * p.x + v[4 * c + 1] * p.y + v[4 * c + 2] * p.z + v[4 * c + 3] * p.w;
                s += v[16 + 4 * c] * q.x + v[16 + 4 * c + 1] * q.y + v[16 + 4 * c + 2] * q.z + v[16 + 4 * c + 3] * q.w;
            }
            acc[r] += s;
        }
    }
}

// grid (ceil(Fh / MOE_WARPS), P); W is [E, 2 Fh, K] (gate rows, then up rows), bias [E, 2 Fh]
template <class F>
__device__ __forceinline__ void moe_gemv_glu_impl(const u8* __restrict__ W, i64 row_bytes, const int* __restrict__ ids,
                                                  const float* __restrict__ x, int x_div, const float* __restrict__ bias,
                                                  float* __restrict__ a, int Fh, int K, int E, int act, float alpha,
                                                  float limit) {
    const int p = blockIdx.y;
    const int n = blockIdx.x * MOE_WARPS + (threadIdx.x >> 5);
    if (n >= Fh) return;
    const int e = ids[p];
    if (e < 0 || e >= E) {
        if ((threadIdx.x & 31) == 0) a[(i64)p * Fh + n] = __int_as_float(0x7fc00000);
        return;
    }
    const i64 g_row = (i64)e * 2 * Fh + n;
    const u8* rows[2] = {W + g_row * row_bytes, W + (g_row + Fh) * row_bytes};
    float acc[2];
    moe_dots<F, 2>(rows, x + (i64)(p / x_div) * K, K, acc);
    const float g = warp_sum(acc[0]), u = warp_sum(acc[1]);
    if ((threadIdx.x & 31) == 0) {
        const float bg = bias ? bias[g_row] : 0.0f, bu = bias ? bias[g_row + Fh] : 0.0f;
        a[(i64)p * Fh + n] = moe_act(g + bg, u + bu, act, alpha, limit);
    }
}

// grid (ceil(N / MOE_WARPS), T); W is [E, N, K], a [T * k, K], wts [T, k], out [T, N]
template <class F>
__device__ __forceinline__ void moe_down_impl(const u8* __restrict__ W, i64 row_bytes, const int* __restrict__ ids,
                                              const float* __restrict__ wts, const float* __restrict__ a,
                                              const float* __restrict__ bias, float* __restrict__ out, int N, int K,
                                              int k, int E) {
    const int t = blockIdx.y;
    const int n = blockIdx.x * MOE_WARPS + (threadIdx.x >> 5);
    if (n >= N) return;
    float acc = 0.0f, b = 0.0f;
    bool bad = false;
    for (int s = 0; s < k; ++s) {
        const int p = t * k + s;
        const int e = ids[p];
        if (e < 0 || e >= E) {
            bad = true;
            continue;
        }
        const float w = wts[p];
        const u8* rows[1] = {W + ((i64)e * N + n) * row_bytes};
        float part[1];
        moe_dots<F, 1>(rows, a + (i64)p * K, K, part);
        acc += w * part[0];
        if (bias) b += w * bias[(i64)e * N + n];
    }
    const float s = warp_sum(acc);
    if ((threadIdx.x & 31) == 0) out[(i64)t * N + n] = bad ? __int_as_float(0x7fc00000) : s + b;
}

#define ORCD_MOE_KERNELS(NAME, F)                                                                            \
    extern "C" __global__ void __launch_bounds__(MOE_WARPS * 32)                                            \
        moe_gemv_glu_##NAME(const u8* W, i64 row_bytes, const int* ids, const float* x, int x_div,          \
                            const float* bias, float* a, int Fh, int K, int E, int act, float alpha,         \
                            float limit) {                                                                   \
        moe_gemv_glu_impl<F>(W, row_bytes, ids, x, x_div, bias, a, Fh, K, E, act, alpha, limit);             \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(MOE_WARPS * 32)                                            \
        moe_down_##NAME(const u8* W, i64 row_bytes, const int* ids, const float* wts, const float* a,        \
                        const float* bias, float* out, int N, int K, int k, int E) {                         \
        moe_down_impl<F>(W, row_bytes, ids, wts, a, bias, out, N, K, k, E);                                  \
    }
