// orcd-worker core kernels: argmax and sampling (part of core.cu, which includes every op family).
#pragma once
#include "common.cuh"

// ================================================================================================
// Argmax over each [V] row of [B, V], two passes: one partial (value, index) pair per block of the
// first (grid (P, B), P the launcher's ARGMAX_BLOCKS, backends/cuda/sampler.py), then one block per row
// (grid B). Ties go to the lowest index (as numpy.argmax).
// ================================================================================================

__device__ __forceinline__ void argmax_merge(float& v, int& i, float v2, int i2) {
    if (v2 > v || (v2 == v && i2 < i)) { v = v2; i = i2; }
}
__device__ __forceinline__ void block_argmax(float& v, int& i) {
    __shared__ float sv[32];
    __shared__ int si[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) argmax_merge(v, i, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, i, o));
    __syncthreads();
    if (lane == 0) { sv[warp] = v; si[warp] = i; }
    __syncthreads();
    v = lane < nw ? sv[lane] : -INFINITY;
    i = lane < nw ? si[lane] : 0x7fffffff;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) argmax_merge(v, i, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, i, o));
}

extern "C" __global__ void argmax_part(const float* __restrict__ x, int V, float* __restrict__ pv, int* __restrict__ pi) {
    pdl_trigger();  // (launched by PDL: the next kernel may start; nothing read before pdl_wait)
    pdl_wait();
    const int b = blockIdx.y;
    x += (i64)b * V;
    float v = -INFINITY;
    int i = 0x7fffffff;
    for (int k = blockIdx.x * blockDim.x + threadIdx.x; k < V; k += gridDim.x * blockDim.x) argmax_merge(v, i, x[k], k);
    block_argmax(v, i);
    if (threadIdx.x == 0) { pv[b * gridDim.x + blockIdx.x] = v; pi[b * gridDim.x + blockIdx.x] = i; }
}

extern "C" __global__ void argmax_final(const float* __restrict__ pv, const int* __restrict__ pi, int P, int* __restrict__ out,
                                        float* __restrict__ out_v) {
    pdl_trigger();  // (launched by PDL: the next kernel may start; nothing read before pdl_wait)
    pdl_wait();
    const int b = blockIdx.x;
    float v = -INFINITY;
    int i = 0x7fffffff;
    for (int k = threadIdx.x; k < P; k += blockDim.x) argmax_merge(v, i, pv[b * P + k], pi[b * P + k]);
    block_argmax(v, i);
    if (threadIdx.x == 0) {
        out[b] = i == 0x7fffffff ? 0 : i;
        if (out_v) out_v[b] = v;
    }
}

// ================================================================================================
// Sampling (orcd_core/sampling.py is the specification; this reproduces it on the GPU), for each row b
// of [B, V] logits with the row's own parameters (device arrays indexed by b: a captured step samples
// any rows): grid y = row for the element-wise kernels, grid x = row for the one-block ones.
//   sample_prep:    l = logits / temperature (float32 division; skipped when greedy)
//   sample_penalty: llama.cpp's penalties (repetition, frequency, presence) on each distinct id of the window
//   argmax_part/final over l: greedy result, and l_max for the exponentials
//   sample_exp:     e[i] = exp((double)l[i] - (double)l_max)
//   sample_select:  top-k -> top-p -> min-p -> inverse-CDF draw, in the order (l desc, id asc),
//                   without sorting: radix descent over 64-bit keys (ordered l, ~id), 8 bits a pass,
//                   with per-digit weight histograms (double) in shared memory.
// The uniform is SplitMix64(seed + (step_index + 1) * golden gamma), top 24 bits.
// ================================================================================================
extern "C" __global__ void sample_prep(const float* __restrict__ logits, i64 ls, float* __restrict__ l, int V,
                                       const float* __restrict__ temps) {
    pdl_trigger();  // (launched by PDL: the next kernel may start; nothing read before pdl_wait)
    pdl_wait();
    const int b = blockIdx.y, i = blockIdx.x * blockDim.x + threadIdx.x;
    const float temperature = temps[b];
    if (i < V) l[(i64)b * V + i] = temperature > 0.0f ? logits[b * ls + i] / temperature : logits[b * ls + i];
}

extern "C" __global__ void sample_penalty(float* __restrict__ l, int V, const int* __restrict__ recent, int rs,
                                          const int* __restrict__ windows, const float* __restrict__ penalties,
                                          const float* __restrict__ freqs, const float* __restrict__ presences) {
    pdl_trigger();  // (launched by PDL: the next kernel may start; nothing read before pdl_wait)
    pdl_wait();
    const int b = blockIdx.x, W = windows[b];  // (0 when no penalty is on)
    const float penalty = penalties[b], freq = freqs[b], presence = presences[b];
    if (W <= 0) return;
    l += (i64)b * V;
    recent += (i64)b * rs;
    for (int j = threadIdx.x; j < W; j += blockDim.x) {
        const int id = recent[j];
        if (id < 0 || id >= V) continue;
        bool first = true;
        for (int k = 0; k < j; ++k)
            if (recent[k] == id) { first = false; break; }
        if (!first) continue;
        int c = 1;
        for (int k = j + 1; k < W; ++k) c += recent[k] == id;
        const float v = l[id];
        const float r = v > 0.0f ? v / penalty : v * penalty;
        // (rounded as sampling.py computes it: no fused multiply-add)
        l[id] = __fsub_rn(r, __fadd_rn(__fmul_rn((float)c, freq), presence));
    }
}

extern "C" __global__ void sample_exp(const float* __restrict__ l, const float* __restrict__ vmax, double* __restrict__ e, int V,
                                      const float* __restrict__ temps) {
    pdl_trigger();  // (launched by PDL: the next kernel may start; nothing read before pdl_wait)
    pdl_wait();
    const int b = blockIdx.y, i = blockIdx.x * blockDim.x + threadIdx.x;
    if (temps[b] <= 0.0f) return;  // greedy: the argmax is the answer
    if (i < V) e[(i64)b * V + i] = exp((double)l[(i64)b * V + i] - (double)vmax[b]);
}

__device__ __forceinline__ unsigned long long sample_key(float v, int i) {
    u32 b = __float_as_uint(v);
    b = (b & 0x80000000u) ? ~b : (b | 0x80000000u);  // order-preserving map of floats to unsigned
    return ((unsigned long long)b << 32) | (unsigned long long)(0xFFFFFFFFu - (u32)i);
}

__device__ double block_sum_d(double v, double* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : 0.0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum of e over the set {key >= lo, e >= emin}.
__device__ double set_sum(const float* l, const double* e, int V, unsigned long long lo, double emin, double* scratch) {
    double s = 0.0;
    for (int i = threadIdx.x; i < V; i += blockDim.x)
        if (sample_key(l[i], i) >= lo && e[i] >= emin) s += e[i];
    return block_sum_d(s, scratch);
}

// The first key of the set {key >= lo, e >= emin}, in descending key order, whose inclusive running
// weight (1 per element when count_mode, else e) is >= thr (or > thr when strict). Returns 0 when none.
// A digit without weight is never chosen, so thr <= 0 gives the set's first key of positive weight
// (top_p 0: the most probable token) rather than a run of empty digits down to a key of no element.
__device__ unsigned long long radix_select(const float* l, const double* e, int V, unsigned long long lo, double emin,
                                           bool count_mode, double thr, bool strict, double* hist, int* chosen) {
    unsigned long long prefix = 0, mask = 0;
    double acc = 0.0;
    for (int shift = 56; shift >= 0; shift -= 8) {
        for (int d = threadIdx.x; d < 256; d += blockDim.x) hist[d] = 0.0;
        __syncthreads();
        for (int i = threadIdx.x; i < V; i += blockDim.x) {
            const unsigned long long key = sample_key(l[i], i);
            if (key < lo || e[i] < emin || (key & mask) != prefix) continue;
            atomicAdd(&hist[(key >> shift) & 255], count_mode ? 1.0 : e[i]);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int c = -1;
            for (int d = 255; d >= 0; --d) {
                const double s = acc + hist[d];
                if (hist[d] > 0.0 && (strict ? s > thr : s >= thr)) { c = d; break; }
                acc = s;
            }
            *chosen = c;
        }
        __syncthreads();
        const int c = *chosen;
        __syncthreads();
        if (c < 0) return 0ull;
        prefix |= (unsigned long long)c << shift;
        mask |= 255ull << shift;
    }
    return prefix;
}

__device__ __forceinline__ double splitmix_uniform(unsigned long long seed, int step_index) {
    unsigned long long x = seed + (unsigned long long)(step_index + 1) * 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    x = x ^ (x >> 31);
    return (double)(x >> 40) * (1.0 / 16777216.0);
}

// One block of 1024 threads.
extern "C" __global__ void __launch_bounds__(1024)
    sample_select(const float* __restrict__ l, const double* __restrict__ e, int V, const int* __restrict__ top_ks,
                  const double* __restrict__ top_ps, const double* __restrict__ min_ps,
                  const unsigned long long* __restrict__ seeds, const float* __restrict__ temps,
                  const int* __restrict__ step_index, int* __restrict__ out) {
    pdl_trigger();  // (launched by PDL: the next kernel may start; nothing read before pdl_wait)
    pdl_wait();
    __shared__ double hist[256];
    __shared__ double scratch[32];
    __shared__ int chosen;
    __shared__ unsigned long long kmin[32];
    const int b = blockIdx.x;
    if (temps[b] <= 0.0f) return;  // greedy: out[b] is the argmax
    l += (i64)b * V;
    e += (i64)b * V;
    const int top_k = top_ks[b];
    const double top_p = top_ps[b], min_p = min_ps[b];
    const unsigned long long seed = seeds[b];
    unsigned long long lo = 0;
    if (top_k > 0 && top_k < V) lo = radix_select(l, e, V, 0ull, -1.0, true, (double)top_k, false, hist, &chosen);
    if (top_p < 1.0) {
        const double total = set_sum(l, e, V, lo, -1.0, scratch);
        const unsigned long long x = radix_select(l, e, V, lo, -1.0, false, top_p * total, false, hist, &chosen);
        if (x) lo = x;
    }
    const double emin = min_p > 0.0 ? min_p : -1.0;
    const double total = set_sum(l, e, V, lo, emin, scratch);
    const double target = splitmix_uniform(seed, step_index[b]) * total;
    unsigned long long x = radix_select(l, e, V, lo, emin, false, target, true, hist, &chosen);
    if (!x) {  // rounding left no candidate past the target: the last (smallest) key of the set
        unsigned long long m = ~0ull;
        for (int i = threadIdx.x; i < V; i += blockDim.x) {
            const unsigned long long key = sample_key(l[i], i);
            if (key >= lo && e[i] >= emin && key < m) m = key;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const unsigned long long other = __shfl_xor_sync(0xffffffffu, m, o);
            m = other < m ? other : m;
        }
        if ((threadIdx.x & 31) == 0) kmin[threadIdx.x >> 5] = m;
        __syncthreads();
        if (threadIdx.x == 0) {
            for (int w = 1; w < (int)(blockDim.x >> 5); ++w) m = kmin[w] < m ? kmin[w] : m;
            kmin[0] = m;
        }
        __syncthreads();
        x = kmin[0];
    }
    if (threadIdx.x == 0) out[b] = (int)(0xFFFFFFFFu - (u32)(x & 0xFFFFFFFFull));
}
