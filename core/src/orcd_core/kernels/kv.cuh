// orcd-worker core kernels: the KV cache: which cache a token writes, and kv_write (part of core.cu, which includes every op family).
#pragma once
#include "common.cuh"

// The cache of token t: kc / vc, or through a table (kvp non-null: the layer's slice [2, kvs] of K and V
// addresses). A table of kvs > 1 columns has one per row of a batched decode step: token t's are kvp[t]
// and kvp[kvs + t]. A table of one column holds one cache for every token of the step (a captured
// prefill chunk of one sequence, or a batched step of one row): kvp[0] and kvp[1].
__device__ __forceinline__ half_bits* kv_of(half_bits* c, const unsigned long long* kvp, int kvs, int t, int which) {
    return kvp ? (half_bits*)kvp[which * kvs + (kvs == 1 ? 0 : t)] : c;
}

// ================================================================================================
// KV cache: k, v [T, Hkv, hd] float32 (token strides ks, vs) -> cache [n_rows, Hkv, hd] fp16 at slot
// positions[t] % n_rows (of token t's cache in a batched decode step: kv_of)
// ================================================================================================
extern "C" __global__ void kv_write(const float* __restrict__ k, i64 ks, const float* __restrict__ v, i64 vs,
                                   half_bits* kc, half_bits* vc, const unsigned long long* __restrict__ kvp, int kvs,
                                   const int* __restrict__ positions, int T, int Hkv, int hd, int n_rows) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 per_t = (i64)Hkv * hd;
    if (i >= (i64)T * per_t) return;
    const int t = (int)(i / per_t);
    const i64 r = i - (i64)t * per_t;
    const i64 dst = (i64)(positions[t] % n_rows) * per_t + r;
    kv_of(kc, kvp, kvs, t, 0)[dst] = f2h(k[(i64)t * ks + r]);
    kv_of(vc, kvp, kvs, t, 1)[dst] = f2h(v[(i64)t * vs + r]);
}
