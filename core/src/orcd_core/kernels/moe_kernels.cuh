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
// One warp per output row; lane l takes items l, l + 32, ... of the row (consecutive bytes per warp); the
// block first stages its activation vectors in shared memory (quant_kernels.cuh: stage_x), so the
// launcher passes dynamic shared memory (moe.py). Top-k at most MOE_MAX_K.
// An expert id outside [0, E) writes NaN (ids come from moe_topk_softmax; NaN makes a bug visible).
#pragma once
#include "quant_kernels.cuh"

// MOE_WARPS (output rows per block), MOE_MAX_K and the MOE_ACT_* codes: -D options (kernels/constants.py)

// act MOE_ACT_SILU: SiLU GLU, silu(g) * u. act MOE_ACT_SWIGLU_OAI: ggml_swiglu_oai: x = min(g, limit),
// y = clamp(u, -limit, limit), x * sigmoid(alpha * x) * (y + 1).
static_assert(MOE_ACT_SILU != MOE_ACT_SWIGLU_OAI, "the expert activations are distinct");
__device__ __forceinline__ float moe_act(float g, float u, int act, float alpha, float limit) {
    if (act == MOE_ACT_SWIGLU_OAI) {
        const float xg = fminf(g, limit);
        const float yu = fmaxf(fminf(u, limit), -limit);
        return xg / (1.0f + expf(-alpha * xg)) * (yu + 1.0f);
    }
    return g / (1.0f + expf(-g)) * u;
}

// This lane's share of the dot products of nr (<= MAXR) rows (rows[r]) with staged vectors: row r with
// vector xv(r) = xs + (PAIRED ? r : 0) * K / 4 (x staged in shared memory as in quant_kernels.cuh; the
// block stages every vector, K at most XS_MAX_BYTES / 4 / nv, else chunked). Lane l takes the flat
// (row, item) list's entries l, l + 32, ..., so all the rows' loads are in flight together.
template <class F, int MAXR, bool PAIRED>
__device__ __forceinline__ void moe_dots(const u8* const rows[MAXR], int nr, const float* __restrict__ x, int nv,
                                         int K, float acc[MAXR]) {
    extern __shared__ float4 xs[];
    const int lane = threadIdx.x & 31;
    const int KC = xs_chunk(nv, K);
#pragma unroll
    for (int r = 0; r < MAXR; ++r) acc[r] = 0.0f;
    for (int k0 = 0; k0 < K; k0 += KC) {
        const int kc = min(KC, K - k0);
        if (k0) __syncthreads();
        stage_x(x, K, nv, k0, kc, xs);
        __syncthreads();
        const int n_items = kc >> 5, it0 = k0 >> 5;
        int r = lane / n_items, it = lane - r * n_items;
#pragma unroll 2
        for (int f = lane; f < nr * n_items; f += 32) {
            const int g = it0 + it;
            const int b = g / F::IPB, i = g - b * F::IPB;
            const float s = item_dot1<F>(rows[r] + (i64)b * F::TS, i, xs + (PAIRED ? r : 0) * (kc >> 2), b * F::QK - k0);
#pragma unroll
            for (int rr = 0; rr < MAXR; ++rr) acc[rr] += rr == r ? s : 0.0f;
            it += 32;
            while (it >= n_items) {
                it -= n_items;
                ++r;
            }
        }
    }
}

// grid (ceil(Fh / MOE_WARPS), P), dynamic shared memory 4 * xs_chunk(1, K); W is [E, 2 Fh, K] (gate
// rows, then up rows), bias [E, 2 Fh]
template <class F>
__device__ __forceinline__ void moe_gemv_glu_impl(const u8* __restrict__ W, i64 row_bytes, const int* __restrict__ ids,
                                                  const float* __restrict__ x, int x_div, const float* __restrict__ bias,
                                                  float* __restrict__ a, int Fh, int K, int E, int act, float alpha,
                                                  float limit) {
    const int p = blockIdx.y;
    const int n = blockIdx.x * MOE_WARPS + (threadIdx.x >> 5);
    const int e = ids[p];
    const bool ok = n < Fh && e >= 0 && e < E;  // (a warp without a row still helps staging)
    const i64 g_row = (i64)(ok ? e : 0) * 2 * Fh + (n < Fh ? n : 0);
    const u8* rows[2] = {W + g_row * row_bytes, W + (g_row + Fh) * row_bytes};
    float acc[2];
    moe_dots<F, 2, false>(rows, ok ? 2 : 0, x + (i64)(p / x_div) * K, 1, K, acc);
    if (n >= Fh) return;
    const float g = warp_sum(acc[0]), u = warp_sum(acc[1]);
    if ((threadIdx.x & 31) == 0) {
        if (!ok) {
            a[(i64)p * Fh + n] = __int_as_float(0x7fc00000);
        } else {
            const float bg = bias ? bias[g_row] : 0.0f, bu = bias ? bias[g_row + Fh] : 0.0f;
            a[(i64)p * Fh + n] = moe_act(g + bg, u + bu, act, alpha, limit);
        }
    }
}

// grid (ceil(N / MOE_WARPS), T), dynamic shared memory 4 * k * xs_chunk(k, K); W is [E, N, K], a [T * k, K],
// wts [T, k], out [T, N]; the k slots' rows of one output are one flat list (their loads in flight together)
template <class F>
__device__ __forceinline__ void moe_down_impl(const u8* __restrict__ W, i64 row_bytes, const int* __restrict__ ids,
                                              const float* __restrict__ wts, const float* __restrict__ a,
                                              const float* __restrict__ bias, float* __restrict__ out, int N, int K,
                                              int k, int E) {
    const int t = blockIdx.y;
    const int n = blockIdx.x * MOE_WARPS + (threadIdx.x >> 5);
    bool bad = false;
    const u8* rows[MOE_MAX_K];
#pragma unroll
    for (int s = 0; s < MOE_MAX_K; ++s) {
        const int e = s < k ? ids[t * k + s] : 0;
        bad |= s < k && (e < 0 || e >= E);
        rows[s] = W + ((i64)(e >= 0 && e < E ? e : 0) * N + (n < N ? n : 0)) * row_bytes;
    }
    float acc[MOE_MAX_K];
    moe_dots<F, MOE_MAX_K, true>(rows, n < N ? k : 0, a + (i64)t * k * K, k, K, acc);
    if (n >= N) return;
    float sum = 0.0f, b = 0.0f;
#pragma unroll
    for (int s = 0; s < MOE_MAX_K; ++s) {
        if (s < k) {
            const int p = t * k + s;
            const float w = wts[p];
            sum += w * warp_sum(acc[s]);
            const int e = ids[p];
            if (bias && e >= 0 && e < E) b += w * bias[(i64)e * N + n];
        }
    }
    if ((threadIdx.x & 31) == 0) out[(i64)t * N + n] = bad ? __int_as_float(0x7fc00000) : sum + b;
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
