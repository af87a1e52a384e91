// orcd-worker core kernels of the mixture of experts that do not depend on the weights' format:
// routing (top-k + softmax over the chosen logits) and, for prefill, grouping the (token, slot) pairs by
// expert around the grouped GEMM (Device.moe: backends/cuda/moe.py). The expert-indexed GEMVs of the
// decode path and the prefill's grouped GEMM are per format: moe_kernels.cuh.
#include "moe_kernels.cuh"

// grid (ceil(E / MOE_WARPS), T), block 32 * MOE_WARPS: logits[t, e] = W[e, :] . x[t, :] (+ bias[e]) for an F32
// router, in float32 for any T (the routing decision should not see fp16 GEMM rounding; the router is
// E x D, small enough to stay in L2 while the T tokens read it)
extern "C" __global__ void moe_router_f32(const float* __restrict__ W, const float* __restrict__ x,
                                          const float* __restrict__ bias, float* __restrict__ out, int E, int D) {
    const int t = blockIdx.y, e = blockIdx.x * MOE_WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (e >= E) return;
    const float4* w = (const float4*)(W + (i64)e * D);
    const float4* xv = (const float4*)(x + (i64)t * D);
    float s = 0.0f;
    for (int i = lane; i < (D >> 2); i += 32) {
        const float4 a = __ldg(w + i), b = xv[i];
        s += a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
    }
    s = warp_sum(s);
    if (lane == 0) out[(i64)t * E + e] = s + (bias ? bias[e] : 0.0f);
}

// MOE_MAX_E_PER_LANE (experts per lane in moe_topk_softmax: E <= 32 times it): a -D option (kernels/constants.py)

// grid T, block 32. ids[t, s] = the s-th largest of logits[t, :E] (lowest id first on ties, as a stable
// descending sort), wts[t, s] = softmax over the k chosen logits.
extern "C" __global__ void moe_topk_softmax(const float* __restrict__ logits, int E, int k, int* __restrict__ ids,
                                            float* __restrict__ wts) {
    const int t = blockIdx.x, lane = threadIdx.x;
    const float* l = logits + (i64)t * E;
    float v[MOE_MAX_E_PER_LANE];
#pragma unroll
    for (int j = 0; j < MOE_MAX_E_PER_LANE; ++j) {
        const int e = lane + 32 * j;
        const float le = e < E ? l[e] : -INFINITY;
        v[j] = le == le ? le : -INFINITY;  // NaN never wins (a stable sort puts it last)
    }
    u32 taken = 0;  // bit j: expert lane + 32 j already chosen
    int my_id = -1;
    float my_val = -INFINITY;
    for (int s = 0; s < k; ++s) {
        float best = -INFINITY;
        int bid = 0x7fffffff;
#pragma unroll
        for (int j = 0; j < MOE_MAX_E_PER_LANE; ++j) {
            const int e = lane + 32 * j;
            if (e < E && !(taken >> j & 1u) && (v[j] > best || bid == 0x7fffffff)) {
                best = v[j];
                bid = e;
            }
        }
        // warp argmax: larger value wins, the lower id on ties
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ob = __shfl_xor_sync(0xffffffffu, best, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bid, o);
            if (oi != 0x7fffffff && (bid == 0x7fffffff || ob > best || (ob == best && oi < bid))) {
                best = ob;
                bid = oi;
            }
        }
        if (bid != 0x7fffffff && (bid & 31) == lane) taken |= 1u << (bid >> 5);
        if (lane == s) {
            my_id = bid;
            my_val = best;
        }
    }
    const float mx = __shfl_sync(0xffffffffu, my_val, 0);  // slot 0 holds the largest
    const float ex = lane < k ? expf(my_val - mx) : 0.0f;
    const float sum = warp_sum(ex);
    if (lane < k) {
        ids[(i64)t * k + lane] = my_id;
        wts[(i64)t * k + lane] = ex / sum;
    }
}

#define MOE_SORT_CHUNK 4096

// grid 1, block >= E (a multiple of 32, <= 1024). A stable counting sort of the P = T * k pairs by
// expert: offsets[e] .. offsets[e + 1] is expert e's range of the sorted order; order[i] = the pair at
// sorted position i (pairs of one expert in increasing p); pos[p] = p's sorted position. Thread e walks
// all ids (staged in shared memory, read as broadcasts), so the result is deterministic.
extern "C" __global__ void moe_sort(const int* __restrict__ ids, int P, int E, int* __restrict__ offsets,
                                    int* __restrict__ order, int* __restrict__ pos) {
    __shared__ int sh[MOE_SORT_CHUNK];
    __shared__ int counts[1024];
    const int e = threadIdx.x;
    int n = 0;
    for (int c0 = 0; c0 < P; c0 += MOE_SORT_CHUNK) {
        const int m = min(MOE_SORT_CHUNK, P - c0);
        __syncthreads();
        for (int i = threadIdx.x; i < m; i += blockDim.x) sh[i] = ids[c0 + i];
        __syncthreads();
        if (e < E)
            for (int i = 0; i < m; ++i) n += sh[i] == e;
    }
    counts[e] = n;
    __syncthreads();
    if (threadIdx.x == 0) {
        int acc = 0;
        for (int j = 0; j < E; ++j) {
            const int c = counts[j];
            counts[j] = acc;
            offsets[j] = acc;
            acc += c;
        }
        offsets[E] = acc;  // < P when some id is out of range: those pairs are left out (their rows stay NaN)
    }
    __syncthreads();
    int at = counts[e];
    for (int c0 = 0; c0 < P; c0 += MOE_SORT_CHUNK) {
        const int m = min(MOE_SORT_CHUNK, P - c0);
        __syncthreads();
        for (int i = threadIdx.x; i < m; i += blockDim.x) sh[i] = ids[c0 + i];
        __syncthreads();
        if (e < E)
            for (int i = 0; i < m; ++i)
                if (sh[i] == e) {
                    order[at] = c0 + i;
                    pos[c0 + i] = at++;
                }
    }
}

// out[i, :] = fp16(x[order[i] / k, :]) for the sorted positions i < offsets[E] (pairs whose id was out of
// range are not in the order): each expert's tokens as rows of the grouped GEMM's operand
extern "C" __global__ void moe_gather_f16(const float* __restrict__ x, const int* __restrict__ order,
                                          const int* __restrict__ offsets, int E, int k, int K,
                                          half_bits* __restrict__ out, int P) {
    const i64 g = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= (i64)P * K) return;
    const int i = (int)(g / K), c = (int)(g - (i64)i * K);
    if (i >= offsets[E]) return;
    out[g] = f2h(x[(i64)(order[i] / k) * K + c]);
}

// a[i, c] = fp16(act(h[i, c] + bias[e, c], h[i, Fh + c] + bias[e, Fh + c])), e = ids[order[i]], for the
// sorted positions i < offsets[E]: h [P, 2 Fh] is the pairs' gate|up GEMM output, bias [E, 2 Fh]
extern "C" __global__ void moe_glu_f16(const float* __restrict__ h, const int* __restrict__ ids,
                                       const int* __restrict__ order, const int* __restrict__ offsets, int E,
                                       const float* __restrict__ bias, half_bits* __restrict__ a, int P, int Fh,
                                       int act, float alpha, float limit) {
    const i64 g = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= (i64)P * Fh) return;
    const int i = (int)(g / Fh), c = (int)(g - (i64)i * Fh);
    if (i >= offsets[E]) return;
    const i64 e = ids[order[i]];
    const float* hr = h + (i64)i * 2 * Fh;
    const float bg = bias ? bias[e * 2 * Fh + c] : 0.0f, bu = bias ? bias[e * 2 * Fh + Fh + c] : 0.0f;
    a[g] = f2h(moe_act(hr[c] + bg, hr[Fh + c] + bu, act, alpha, limit));
}

// out[t, n] = sum_s wts[t, s] * (y[pos[t k + s], n] + bias[ids[t k + s], n]) (slots in order); NaN for a
// token with an expert id out of range
extern "C" __global__ void moe_combine(const float* __restrict__ y, const int* __restrict__ ids,
                                       const int* __restrict__ pos, const float* __restrict__ wts,
                                       const float* __restrict__ bias, float* __restrict__ out, int T, int k, int N,
                                       int E) {
    const i64 g = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= (i64)T * N) return;
    const int t = (int)(g / N), n = (int)(g - (i64)t * N);
    float acc = 0.0f;
    for (int s = 0; s < k; ++s) {
        const int p = t * k + s, e = ids[p];
        if (e < 0 || e >= E) {
            acc = __int_as_float(0x7fc00000);
            break;
        }
        acc += wts[p] * (y[(i64)pos[p] * N + n] + (bias ? bias[(i64)e * N + n] : 0.0f));
    }
    out[g] = acc;
}
