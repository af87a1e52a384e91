// orcd-worker core kernels: attention (prefill and decode) (part of core.cu, which includes every op family).
#pragma once
#include "common.cuh"
#include "q8.cuh"
#include "kv.cuh"
#include "rope.cuh"

// ================================================================================================
// Attention for prefill (and any step with T > 1): flash-style, O(T) memory.
// grid (ceil(T / 16), Hq), 128 threads: each warp owns 4 queries; key tiles of 32 keys staged in
// shared memory; online softmax per query. A query at position p sees keys kp <= p with
// kp > p - window (window > 0). `sinks` [Hq] (or null) adds exp(sink) to each denominator.
// Keys are read from the cache (the step's own k/v were written by kv_write first): kc / vc, or the one
// cache of a one-column table (kvp, kvs = 1: a captured prefill chunk, backends/cuda/prefill.py).
// Queries may come in any order of positions (each block reads keys up to its highest position).
// ================================================================================================
#define AP_QT 16
#define AP_KT 32
// AP_MAXD (head dim at most): a -D option (kernels/constants.py)

extern "C" __global__ void __launch_bounds__(128)
    attn_prefill(const float* __restrict__ q, half_bits* kc0, half_bits* vc0, const unsigned long long* __restrict__ kvp,
                 int kvs, const int* __restrict__ positions, const float* __restrict__ sinks, float* __restrict__ out,
                 int T, int Hq, int Hkv, int hd, int n_rows, float scale, int window) {
    const half_bits* __restrict__ kc = kv_of(kc0, kvp, kvs, 0, 0);  // one sequence: its cache, or the table's
    const half_bits* __restrict__ vc = kv_of(vc0, kvp, kvs, 0, 1);
    __shared__ float qs[AP_QT][AP_MAXD];
    __shared__ float ks[AP_KT][AP_MAXD + 1];
    __shared__ float vs[AP_KT][AP_MAXD];
    __shared__ int range[2];
    const int h = blockIdx.y, kvh = h / (Hq / Hkv);
    const int q0 = blockIdx.x * AP_QT;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int i = threadIdx.x; i < AP_QT * hd; i += blockDim.x) {
        const int r = i / hd, d = i - r * hd;
        qs[r][d] = q0 + r < T ? q[((i64)(q0 + r) * Hq + h) * hd + d] * scale : 0.0f;
    }
    if (threadIdx.x == 0) {
        int lo = 0x7fffffff, hi = -1;
        for (int r = 0; r < AP_QT && q0 + r < T; ++r) {
            const int p = positions[q0 + r];
            lo = min(lo, p);
            hi = max(hi, p);
        }
        range[0] = window > 0 ? max(0, lo - window + 1) : 0;
        range[1] = hi;
    }
    __syncthreads();
    const int kmin = range[0], kmax = range[1];
    float m[4], l[4], acc[4][4];
    int qpos[4];
#pragma unroll
    for (int qi = 0; qi < 4; ++qi) {
        const int r = q0 + warp * 4 + qi;
        qpos[qi] = r < T ? positions[r] : -1;
        m[qi] = -INFINITY;
        l[qi] = 0.0f;
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[qi][c] = 0.0f;
    }
    const float* q4 = qs[warp * 4];
    // K/V tiles: 16-byte loads into registers, the next tile fetched while this one is computed on
    const int vpr = hd >> 3;         // uint4 per key row
    const int n_vec = AP_KT * vpr;   // <= 512 = 4 per thread
    uint4 kreg[4], vreg[4];
    auto fetch = [&](int k0) {
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const int i = threadIdx.x + u * 128;
            const int j = i / vpr, c = i - j * vpr;
            const int kp = k0 + j;
            if (i < n_vec && kp <= kmax) {
                const i64 off = ((i64)(kp % n_rows) * Hkv + kvh) * hd + 8 * c;
                kreg[u] = ld16(kc + off);
                vreg[u] = ld16(vc + off);
            } else {
                kreg[u] = make_uint4(0, 0, 0, 0);
                vreg[u] = make_uint4(0, 0, 0, 0);
            }
        }
    };
    fetch(kmin);
    for (int k0 = kmin; k0 <= kmax; k0 += AP_KT) {
        __syncthreads();
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const int i = threadIdx.x + u * 128;
            if (i < n_vec) {
                const int j = i / vpr, c = 8 * (i - j * vpr);
                const u32 kw[4] = {kreg[u].x, kreg[u].y, kreg[u].z, kreg[u].w};
                const u32 vw[4] = {vreg[u].x, vreg[u].y, vreg[u].z, vreg[u].w};
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    ks[j][c + 2 * e] = h2f_lo(kw[e]);
                    ks[j][c + 2 * e + 1] = h2f_hi(kw[e]);
                    vs[j][c + 2 * e] = h2f_lo(vw[e]);
                    vs[j][c + 2 * e + 1] = h2f_hi(vw[e]);
                }
            }
        }
        __syncthreads();
        if (k0 + AP_KT <= kmax) fetch(k0 + AP_KT);
        // lane = key: its score against the warp's 4 queries (one K read feeds 4 FMA chains)
        float sc4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll 8
        for (int d = 0; d < hd; ++d) {
            const float kd = ks[lane][d];
#pragma unroll
            for (int qi = 0; qi < 4; ++qi) sc4[qi] += q4[qi * AP_MAXD + d] * kd;
        }
        const int kp = k0 + lane;
        float pr[4];
#pragma unroll
        for (int qi = 0; qi < 4; ++qi) {
            const int p = qpos[qi];
            const bool valid = p >= 0 && kp <= p && (window <= 0 || kp > p - window);
            const float sv = valid ? sc4[qi] : -INFINITY;
            const float m_new = fmaxf(m[qi], warp_max(sv));
            pr[qi] = 0.0f;
            if (m_new == -INFINITY) continue;  // nothing visible yet for this query
            pr[qi] = valid ? expf(sv - m_new) : 0.0f;
            const float corr = expf(m[qi] - m_new);
            l[qi] = l[qi] * corr + warp_sum(pr[qi]);
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[qi][c] *= corr;
            m[qi] = m_new;
        }
        // values: one V read per (key, dim) feeds the 4 queries
        for (int j = 0; j < AP_KT; ++j) {
            float vd[4];
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int d = lane + 32 * c;
                vd[c] = d < hd ? vs[j][d] : 0.0f;
            }
#pragma unroll
            for (int qi = 0; qi < 4; ++qi) {
                const float pj = __shfl_sync(0xffffffffu, pr[qi], j);
#pragma unroll
                for (int c = 0; c < 4; ++c) acc[qi][c] += pj * vd[c];
            }
        }
    }
#pragma unroll
    for (int qi = 0; qi < 4; ++qi) {
        const int r = q0 + warp * 4 + qi;
        if (qpos[qi] < 0) continue;
        float mm = m[qi], ll = l[qi], f = 1.0f;
        if (sinks) {
            const float sk = sinks[h];
            const float mf = fmaxf(mm, sk);
            f = expf(mm - mf);
            ll = ll * f + expf(sk - mf);
        }
        const float inv = ll > 0.0f ? f / ll : 0.0f;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const int d = lane + 32 * c;
            if (d < hd) out[((i64)r * Hq + h) * hd + d] = acc[qi][c] * inv;
        }
    }
}

// ================================================================================================
// The same prefill attention on the tensor cores (sm_80 on; head dims 64, 96, 128): flash attention in
// the FlashAttention-2 layout. grid (ceil(T / AP_TC_QT), Hq), 128 threads: warp w owns queries
// 16 w .. 16 w + 15 of the block's 64; key tiles of AP_TC_KT = 64 keys, K and V staged in shared memory by
// cp.async (the next tile's while this one is computed on). S = Q K^T by mma.m16n8k16 (Q rounded to fp16
// once, with the scale and log2 e folded in; K and V are the cache's fp16), the online softmax in
// registers (base 2), P rounded to fp16 as the A operand of P V straight from S's accumulators, fp32
// sums. Masks, windows, sinks and the ring's rows as attn_prefill. A warp skips the tiles that hold no
// key any of its queries sees (the causal future, keys out of its window). Dynamic shared memory:
// Q [64][hd + PAD] and two buffers of K and V [64][hd + PAD] halves.
// ================================================================================================
template <int HD>
__device__ __forceinline__ void attn_prefill_tc_impl(const float* __restrict__ q, half_bits* kc0, half_bits* vc0,
                                                     const unsigned long long* __restrict__ kvp, int kvs,
                                                     const int* __restrict__ positions,
                                                     const float* __restrict__ sinks, float* __restrict__ out, int T,
                                                     int Hq, int Hkv, int n_rows, float scale, int window) {
    constexpr int LD = HD + AP_TC_PAD, QT = AP_TC_QT, KT = AP_TC_KT, KS = HD / 16, DT = HD / 8, CPR = HD / 8;
    constexpr float LOG2E = 1.4426950408889634f;
    static_assert(QT == 64 && KT == 64 && HD % 16 == 0 && HD <= AP_MAXD, "4 warps of 16 queries, 8 key columns");
    extern __shared__ __align__(16) half_bits ap_smem[];
    half_bits* const Qs = ap_smem;          // [QT][LD]
    half_bits* const Ks = Qs + QT * LD;     // [2][KT][LD]
    half_bits* const Vs = Ks + 2 * KT * LD; // [2][KT][LD]
    __shared__ int range[2];
    const half_bits* __restrict__ kc = kv_of(kc0, kvp, kvs, 0, 0);  // one sequence: its cache, or the table's
    const half_bits* __restrict__ vc = kv_of(vc0, kvp, kvs, 0, 1);
    const int h = blockIdx.y, kvh = h / (Hq / Hkv), q0 = blockIdx.x * QT;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, c = lane & 3;
    const float qscale = scale * LOG2E;
    for (int i = tid; i < QT * (HD / 2); i += 128) {
        const int r = i / (HD / 2), d = 2 * (i - r * (HD / 2));
        u32 w = 0u;
        if (q0 + r < T) {
            const float* qr = q + ((i64)(q0 + r) * Hq + h) * HD + d;
            w = pack_h2_rn(qr[0] * qscale, qr[1] * qscale);
        }
        *(u32*)(Qs + r * LD + d) = w;
    }
    if (warp == 0) {  // the block's keys: from the lowest visible to the highest position
        int lo = 0x7fffffff, hi = -1;
        for (int r = lane; r < QT && q0 + r < T; r += 32) {
            const int p = positions[q0 + r];
            lo = min(lo, p);
            hi = max(hi, p);
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            lo = min(lo, __shfl_xor_sync(0xffffffffu, lo, o));
            hi = max(hi, __shfl_xor_sync(0xffffffffu, hi, o));
        }
        if (lane == 0) {
            range[0] = window > 0 ? max(0, lo - window + 1) : 0;
            range[1] = hi;
        }
    }
    // this thread's two query rows (g, g + 8 of the warp's 16) and the warp's span of positions
    const int r0 = q0 + 16 * warp + g;
    const int p0 = r0 < T ? positions[r0] : -1, p1 = r0 + 8 < T ? positions[r0 + 8] : -1;
    int wmax = max(p0, p1), wmin = min(p0 < 0 ? 0x7fffffff : p0, p1 < 0 ? 0x7fffffff : p1);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        wmax = max(wmax, __shfl_xor_sync(0xffffffffu, wmax, o));
        wmin = min(wmin, __shfl_xor_sync(0xffffffffu, wmin, o));
    }
    __syncthreads();
    const int kmin = range[0], kmax = range[1];
    auto load_kv = [&](int k0, int buf) {
        half_bits* kd = Ks + buf * KT * LD;
        half_bits* vd = Vs + buf * KT * LD;
        for (int i = tid; i < KT * CPR; i += 128) {
            const int j = i / CPR, cc = i - j * CPR, kp = k0 + j;
            half_bits* dk = kd + j * LD + 8 * cc;
            half_bits* dv = vd + j * LD + 8 * cc;
            if (kp <= kmax) {
                const i64 off = ((i64)(kp % n_rows) * Hkv + kvh) * HD + 8 * cc;
                cp_async16(dk, kc + off);
                cp_async16(dv, vc + off);
            } else {  // zeros, never garbage: a masked key's p is 0, and 0 * NaN would not be
                *(uint4*)dk = make_uint4(0u, 0u, 0u, 0u);
                *(uint4*)dv = make_uint4(0u, 0u, 0u, 0u);
            }
        }
    };
    if (kmin <= kmax) load_kv(kmin, 0);
    u32 qf[KS][4];
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) ldmatrix_x4(qf[ks], Qs + (16 * warp + (lane & 15)) * LD + 16 * ks + 8 * (lane >> 4));
    float o[DT][4];
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[dt][e] = 0.0f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
    cp_async_wait_all();
    __syncthreads();
    for (int k0 = kmin, t = 0; k0 <= kmax; k0 += KT, ++t) {
        const int cur = t & 1;
        if (k0 + KT <= kmax) load_kv(k0 + KT, cur ^ 1);
        if (k0 <= wmax && (window <= 0 || k0 + KT - 1 > wmin - window)) {  // warp-uniform
            float s[8][4];
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[j][e] = 0.0f;
            const half_bits* kb = Ks + cur * KT * LD;
#pragma unroll
            for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
                for (int nj = 0; nj < 4; ++nj) {
                    u32 b[4];
                    ldmatrix_x4(b, kb + (16 * nj + (lane & 7) + 8 * (lane >> 4)) * LD + 16 * ks + 8 * ((lane >> 3) & 1));
                    mma_f16_16x8x16(s[2 * nj], qf[ks], b[0], b[1]);
                    mma_f16_16x8x16(s[2 * nj + 1], qf[ks], b[2], b[3]);
                }
            }
            float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int kp = k0 + 8 * j + 2 * c + e;
                    const bool v0 = p0 >= 0 && kp <= p0 && (window <= 0 || kp > p0 - window);
                    const bool v1 = p1 >= 0 && kp <= p1 && (window <= 0 || kp > p1 - window);
                    s[j][e] = v0 ? s[j][e] : -INFINITY;
                    s[j][2 + e] = v1 ? s[j][2 + e] : -INFINITY;
                    mx0 = fmaxf(mx0, s[j][e]);
                    mx1 = fmaxf(mx1, s[j][2 + e]);
                }
#pragma unroll
            for (int x = 1; x < 4; x <<= 1) {  // a row's 64 scores lie in the 4 lanes of its quad
                mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, x));
                mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, x));
            }
            const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
            const float c0 = n0 == -INFINITY ? 1.0f : exp2f(m0 - n0), c1 = n1 == -INFINITY ? 1.0f : exp2f(m1 - n1);
            float rs0 = 0.0f, rs1 = 0.0f;
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    s[j][e] = n0 == -INFINITY ? 0.0f : exp2f(s[j][e] - n0);
                    s[j][2 + e] = n1 == -INFINITY ? 0.0f : exp2f(s[j][2 + e] - n1);
                    rs0 += s[j][e];
                    rs1 += s[j][2 + e];
                }
#pragma unroll
            for (int x = 1; x < 4; x <<= 1) {
                rs0 += __shfl_xor_sync(0xffffffffu, rs0, x);
                rs1 += __shfl_xor_sync(0xffffffffu, rs1, x);
            }
            l0 = l0 * c0 + rs0;
            l1 = l1 * c1 + rs1;
            m0 = n0;
            m1 = n1;
#pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
                o[dt][0] *= c0;
                o[dt][1] *= c0;
                o[dt][2] *= c1;
                o[dt][3] *= c1;
            }
            const half_bits* vb = Vs + cur * KT * LD;
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {  // keys 16 kk ..: P's A fragment is S's accumulators of columns 2 kk, 2 kk + 1
                const u32 a[4] = {pack_h2_rn(s[2 * kk][0], s[2 * kk][1]), pack_h2_rn(s[2 * kk][2], s[2 * kk][3]),
                                  pack_h2_rn(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                  pack_h2_rn(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
                for (int dd = 0; dd < DT / 2; ++dd) {
                    u32 b[4];
                    ldmatrix_x4_trans(b, vb + (16 * kk + (lane & 7) + 8 * ((lane >> 3) & 1)) * LD + 16 * dd + 8 * (lane >> 4));
                    mma_f16_16x8x16(o[2 * dd], a, b[0], b[1]);
                    mma_f16_16x8x16(o[2 * dd + 1], a, b[2], b[3]);
                }
            }
        }
        cp_async_wait_all();
        __syncthreads();
    }
#pragma unroll
    for (int row = 0; row < 2; ++row) {
        const int p = row ? p1 : p0;
        if (p < 0) continue;
        const float mm = row ? m1 : m0;
        float ll = row ? l1 : l0, f = 1.0f;
        if (sinks) {  // exp(sink) in the denominator: 2^(sink log2 e) in these base-2 units
            const float sk = sinks[h] * LOG2E;
            const float mf = fmaxf(mm, sk);
            f = exp2f(mm - mf);
            ll = ll * f + exp2f(sk - mf);
        }
        const float inv = ll > 0.0f ? f / ll : 0.0f;
        float* orow = out + ((i64)(r0 + 8 * row) * Hq + h) * HD + 2 * c;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
            orow[8 * dt] = o[dt][2 * row] * inv;
            orow[8 * dt + 1] = o[dt][2 * row + 1] * inv;
        }
    }
}

#define ORCD_ATTN_PREFILL_TC(HD)                                                                              \
    extern "C" __global__ void __launch_bounds__(128)                                                        \
        attn_prefill_tc_##HD(const float* q, half_bits* kc0, half_bits* vc0, const unsigned long long* kvp,  \
                             int kvs, const int* positions, const float* sinks, float* out, int T, int Hq,    \
                             int Hkv, int n_rows, float scale, int window) {                                 \
        attn_prefill_tc_impl<HD>(q, kc0, vc0, kvp, kvs, positions, sinks, out, T, Hq, Hkv, n_rows, scale, window); \
    }
ORCD_ATTN_PREFILL_TC(64)
ORCD_ATTN_PREFILL_TC(96)
ORCD_ATTN_PREFILL_TC(128)

// ================================================================================================
// Attention for decode tokens, one per sequence (a batched step: row b's cache is kv_of(.., b)), split
// over the sequence (flash-decoding). Grid (Hq, S, B), 128 threads; row b = blockIdx.z computes exactly
// what a lone token computes. The query at p = positions[b] sees the span of keys [lo, p] (lo = p -
// window + 1 for a sliding window, else 0). Its splits take `ad_chunk(span)` keys each, a function of
// the span alone (so a row's result does not depend on the launch's other rows, on S or on the cache's
// size): split s covers keys [lo + s*chunk, lo + (s+1)*chunk), and only the first S_eff =
// ceil(span / chunk) splits run (the others exit at once: the launcher sizes S for the longest span a
// launch can see, device.py's decode_grid_splits). A split writes its unnormalized output, max and
// denominator; the head's last split to finish combines the S_eff partials (and the sink) into out. A
// head with one split writes out itself, by the combine's arithmetic.
// The kernel is a chain of memory round trips (a few KB per head), so every load that does not depend
// on an earlier result is issued first: the block's first keys (a thread per key, the key's whole row in
// 16-byte loads) and its first values (a thread per 8 dims and one of G = 128 / (hd/8) key groups, AD_VU
// keys a group) before the query; a second round only where a split holds more keys than that.
// hd a multiple of 8, <= AP_MAXD; AD_CHUNK_MIN, AD_CHUNK, AD_SPLITS: kernels/constants.py.
// xq (or null; hd a multiple of 32): the output also quantized to int8 for the o projection's int8 GEMV
// (q8.cuh; row b at xq + b q8_row_bytes(Hq hd)): whoever writes a head's output (its only split, or the
// combine) quantizes it, a warp per group of 32 dims (q8_store_warp: the bytes quantize_q8 would write),
// so the GEMV needs no quantize launch of its own.
// rk (or null): rope here. q, rk and rv are the q|k|v GEMVs' outputs (token strides qs, ks, vs): the block
// ropes its query (and, in the split that holds the query's own key, that key) with rope.cuh's pair
// function, takes that key and value from there, and the head group's first q head writes them to the
// cache as rope_kv_write would; otherwise q is roped already and the cache holds the step's keys.
// ================================================================================================
#define AD_VU 8

// keys per split of a query that sees `span` keys: the smallest AD_CHUNK_MIN * 2^k (at most AD_CHUNK)
// that needs at most AD_SPLITS splits (device.py's decode_splits says the same)
__device__ __forceinline__ int ad_chunk(int span) {
    int c = AD_CHUNK_MIN;
    while (c < AD_CHUNK && (span + c - 1) / c > AD_SPLITS) c <<= 1;
    return c;
}

__device__ void attn_decode_combine_head(const float* part_o, const float* part_ml, const float* sinks, float* out,
                                         int hh, int sh, int S, int n, int hd, u8* xq_row, int K);

// out = o * e / L with e = exp(m - M), L = sum * e + exp(sink - M), M = max(m, sink) over the head's
// splits: the combine's expression for one of them (attn_decode_combine_head)
__device__ __forceinline__ float attn_decode_one_split(float o, float m, float sum, const float* sinks, int sh) {
    const float sink = sinks ? sinks[sh] : -INFINITY;
    const float M = fmaxf(sink, m);
    const float e = m > -INFINITY ? expf(m - M) : 0.0f;
    const float L = (e > 0.0f ? sum * e : 0.0f) + (sinks ? expf(sink - M) : 0.0f);
    const float oo = e > 0.0f ? o * e : 0.0f;
    return L > 0.0f ? oo / L : 0.0f;
}

extern "C" __global__ void __launch_bounds__(128)
    attn_decode_part(const float* __restrict__ q, i64 qs, half_bits* kc0, half_bits* vc0, const unsigned long long* __restrict__ kvp,
                     int kvs, const int* __restrict__ positions, float* __restrict__ part_o, float* __restrict__ part_ml,
                     int Hq, int Hkv, int hd, int n_rows, float scale, int window,
                     unsigned int* __restrict__ counters, const float* __restrict__ sinks, float* __restrict__ out,
                     u8* __restrict__ xq, const float* __restrict__ rk, i64 ks, const float* __restrict__ rv, i64 vs,
                     const float* __restrict__ freq_factors, int n_rot, int neox, float theta_scale, float freq_scale,
                     float ext_factor, float attn_factor, float corr0, float corr1) {
    __shared__ float qsh[AP_MAXD];
    __shared__ uint4 ksh4[AP_MAXD / 8];  // (rope here) the query's own key, roped, as the cache holds it
    __shared__ float sc[AD_CHUNK];
    __shared__ float red[32];
    __shared__ float4 accs[2 * 128];  // each thread's 8 dims of values
    pdl_trigger();  // (a GEMV launched early behind it prefetches its weights meanwhile; pdl_wait there)
    // Launched early, by PDL: until the wait below, the block reads only what no kernel of this step
    // writes: the rows' positions (the host's copy, or advance_rows at the end of the step before), the
    // KV table (the host's copy) and the cache's keys and values before the query's own position, which
    // earlier steps wrote. Those steps have ended: every step ends in a copy to the host (the token, or
    // a prefill chunk's logits), and the next starts behind it on the stream, a new graph launch or the
    // host's copy of its inputs. So the keys' and values' loads are in flight while the q|k|v GEMV
    // ahead ends; the query, this step's own key and value, and every write come after the wait.
    const int b = blockIdx.z;
    const int h = blockIdx.x, s = blockIdx.y, S = gridDim.y, kvh = h / (Hq / Hkv);
    const int hh = b * Hq + h;  // (row, head): the partials', counters' and output's index
    const half_bits* __restrict__ kc = kv_of(kc0, kvp, kvs, b, 0);
    const half_bits* __restrict__ vc = kv_of(vc0, kvp, kvs, b, 1);
    const int p = positions[b];
    const int lo = window > 0 ? max(0, p - window + 1) : 0;
    const int span = p + 1 - lo, chunk = ad_chunk(span);
    const int S_eff = min(S, (span + chunk - 1) / chunk);
    if (s >= S_eff) {  // (block-uniform) beyond the visible keys: no partial, no count
        pdl_wait();  // (every block waits: the grid ends after the kernels ahead, as the chain needs)
        return;
    }
    const int kb = lo + s * chunk, ke = min(lo + (s + 1) * chunk, p + 1);
    __shared__ bool last;
    const int n = ke - kb;
    const int nv = hd >> 3;         // 16-byte vectors per key row
    const i64 row = (i64)Hkv * hd;  // elements per cache position
    const int G = blockDim.x / nv;  // key groups of the values
    const int g = threadIdx.x / nv, t = threadIdx.x - g * nv;
    const half_bits* vb = vc + (i64)kvh * hd + 8 * t;
    // rope here (rk set): q, k and v as the GEMVs wrote them; this split holds the query's own key (the
    // last, n - 1) if it is the last one: that key and its value from rk, rv (as rope_kv_write would have
    // written them, fp16), never from the cache, which the head group's first q head writes meanwhile
    const bool own = rk && s == S_eff - 1;  // (block-uniform)
    uint4 vown = make_uint4(0u, 0u, 0u, 0u);  // the own value's 8 dims 8t .. of this thread (g < G)
    // the first round of keys and values in flight before anything else (without rope here, rk null, a
    // kernel ahead wrote this step's own key and value to the cache: then they wait like the rest)
    if (!rk) pdl_wait();
    uint4 kw[AP_MAXD / 8];
    if (threadIdx.x < n) {
        const half_bits* kr = kc + (i64)((kb + threadIdx.x) % n_rows) * row + (i64)kvh * hd;
#pragma unroll
        for (int u = 0; u < AP_MAXD / 8; ++u)
            if (u < nv) kw[u] = ld16(kr + 8 * u);
    }
    uint4 vw[AD_VU];
    if (g < G) {
#pragma unroll
        for (int u = 0; u < AD_VU; ++u)
            if (g + u * G < n) vw[u] = ld16(vb + (i64)((kb + g + u * G) % n_rows) * row);
    }
    pdl_wait();  // (what the kernels ahead wrote from here on: q, k and v of this step; a no-op the second time)
    if (rk) {  // the query's pairs (threads 0 .. hd/2), the own key's (hd/2 .. hd: hd <= 128 threads)
        const int i = threadIdx.x < (hd >> 1) ? threadIdx.x : threadIdx.x - (hd >> 1);
        if (threadIdx.x < (hd >> 1)) {
            const RopedPair r = rope_head_pair_value(q + (i64)b * qs + (i64)h * hd, i, p, n_rot, neox, freq_factors,
                                                     theta_scale, freq_scale, ext_factor, attn_factor, corr0, corr1);
            qsh[r.a] = r.o.x * scale;
            qsh[r.b] = r.o.y * scale;
        } else if (own && threadIdx.x < hd) {
            const RopedPair r = rope_head_pair_value(rk + (i64)b * ks + (i64)kvh * hd, i, p, n_rot, neox, freq_factors,
                                                     theta_scale, freq_scale, ext_factor, attn_factor, corr0, corr1);
            half_bits* ksh = (half_bits*)ksh4;
            ksh[r.a] = f2h(r.o.x);
            ksh[r.b] = f2h(r.o.y);
        }
        if (own && g < G) {
            const float* vr = rv + (i64)b * vs + (i64)kvh * hd + 8 * t;
            vown = make_uint4(pack_h2(vr[0], vr[1]), pack_h2(vr[2], vr[3]), pack_h2(vr[4], vr[5]), pack_h2(vr[6], vr[7]));
        }
    } else {
        for (int d = threadIdx.x; d < hd; d += blockDim.x) qsh[d] = q[(i64)b * qs + (i64)h * hd + d] * scale;
    }
    __syncthreads();
    if (own && h % (Hq / Hkv) == 0) {  // the head group's first q head writes the own key and value to the cache
        const i64 slot = (i64)(p % n_rows) * row + (i64)kvh * hd;
        if (threadIdx.x < nv) *(uint4*)(kv_of(kc0, kvp, kvs, b, 0) + slot + 8 * threadIdx.x) = ksh4[threadIdx.x];
        if (g == 0) *(uint4*)(kv_of(vc0, kvp, kvs, b, 1) + slot + 8 * t) = vown;
    }
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        if (j != threadIdx.x) {  // a second round (a split of more keys than threads)
            const half_bits* kr = kc + (i64)((kb + j) % n_rows) * row + (i64)kvh * hd;
#pragma unroll
            for (int u = 0; u < AP_MAXD / 8; ++u)
                if (u < nv) kw[u] = ld16(kr + 8 * u);
        }
        if (own && j == n - 1) {
#pragma unroll
            for (int u = 0; u < AP_MAXD / 8; ++u)
                if (u < nv) kw[u] = ksh4[u];
        }
        float dot = 0.0f;
#pragma unroll
        for (int u = 0; u < AP_MAXD / 8; ++u) {
            if (u < nv) {
                const float* qd = qsh + 8 * u;
                dot += qd[0] * h2f_lo(kw[u].x) + qd[1] * h2f_hi(kw[u].x) + qd[2] * h2f_lo(kw[u].y) + qd[3] * h2f_hi(kw[u].y) +
                       qd[4] * h2f_lo(kw[u].z) + qd[5] * h2f_hi(kw[u].z) + qd[6] * h2f_lo(kw[u].w) + qd[7] * h2f_hi(kw[u].w);
            }
        }
        sc[j] = dot;
        mx = fmaxf(mx, dot);
    }
    mx = block_max(mx, red);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const float e = expf(sc[j] - mx);
        sc[j] = e;
        sum += e;
    }
    sum = block_sum(sum, red);  // (its barriers also publish sc[])
    float a[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    if (g < G) {
        for (int j0 = g; j0 < n; j0 += AD_VU * G) {
            if (j0 != g) {  // a later round
#pragma unroll
                for (int u = 0; u < AD_VU; ++u)
                    if (j0 + u * G < n) vw[u] = ld16(vb + (i64)((kb + j0 + u * G) % n_rows) * row);
            }
#pragma unroll
            for (int u = 0; u < AD_VU; ++u) {
                if (j0 + u * G < n) {
                    if (own && j0 + u * G == n - 1) vw[u] = vown;
                    const float pj = sc[j0 + u * G];
                    const u32 wv[4] = {vw[u].x, vw[u].y, vw[u].z, vw[u].w};
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        a[2 * e] += pj * h2f_lo(wv[e]);
                        a[2 * e + 1] += pj * h2f_hi(wv[e]);
                    }
                }
            }
        }
    }
    accs[2 * threadIdx.x] = make_float4(a[0], a[1], a[2], a[3]);
    accs[2 * threadIdx.x + 1] = make_float4(a[4], a[5], a[6], a[7]);
    __syncthreads();
    const float* acc = (const float*)accs;  // thread (g, t)'s dim e at acc[(g * nv + t) * 8 + e]
    u8* const xq_row = xq ? xq + (i64)b * q8_row_bytes(Hq * hd) : nullptr;
    if (S_eff == 1) {  // (block-uniform) the head's only split: normalized here, nothing to combine
        const int d = threadIdx.x;  // (one dim a thread: hd <= AP_MAXD <= the block's 128 threads)
        float v = 0.0f;
        if (d < hd) {
            float o = 0.0f;
            for (int gg = 0; gg < G; ++gg) o += acc[gg * nv * 8 + d];
            v = attn_decode_one_split(o, mx, sum, sinks, h);
            out[(i64)hh * hd + d] = v;
        }
        if (xq_row && d < (hd & ~31))  // (warp-uniform; the launcher passes xq for hd % 32 == 0 only)
            q8_store_warp(v, xq_row, Hq * hd, h * hd + (d & ~31));
        return;
    }
    float* po = part_o + ((i64)hh * S + s) * hd;
    float* pml = part_ml + ((i64)hh * S + s) * 2;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float o = 0.0f;
        for (int gg = 0; gg < G; ++gg) o += acc[gg * nv * 8 + d];
        po[d] = o;
    }
    if (threadIdx.x == 0) { pml[0] = mx; pml[1] = sum; }
    // The last split of this head to finish combines all S_eff (no second launch); it resets the
    // head's counter to 0, so a replayed graph finds it zeroed.
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(&counters[hh], 1u) == (unsigned)(S_eff - 1);
    __syncthreads();
    if (last) {
        __threadfence();
        attn_decode_combine_head(part_o, part_ml, sinks, out, hh, h, S, S_eff, hd, xq_row, Hq * hd);
        if (threadIdx.x == 0) counters[hh] = 0u;
    }
}

// Reads go through L2 (__ldcg): the partials were written by other blocks of the same launch. The
// partials of (row, head) hh are the first n of its S slots; sh is the head's sink.
// Two round trips: every split's (max, sum) pair read once into shared memory (a thread per split:
// the max, then each split's weight exp(m_s - M) and the denominator, block reductions); then the
// output as float4 columns: a thread per 4 dims and one of GS = 128 / (hd/4) split groups, each
// group's splits' loads in flight together, the groups added in shared memory. The order of the
// additions depends on n and hd only (a row's result does not depend on its launch).
// Every thread of the block calls it (block-uniform branch).
__device__ void attn_decode_combine_head(const float* part_o, const float* part_ml, const float* sinks, float* out,
                                         int hh, int sh, int S, int n, int hd, u8* xq_row, int K) {
    __shared__ float w[AD_MAX_SPLITS];
    __shared__ float ls[AD_MAX_SPLITS];
    __shared__ float red[32];
    __shared__ float4 oc[128];
    const float2* ml = (const float2*)(part_ml + (i64)hh * S * 2);
    const float sink = sinks ? sinks[sh] : -INFINITY;
    float M = sink;
    for (int s = threadIdx.x; s < n; s += blockDim.x) {
        const float2 v = __ldcg(ml + s);
        w[s] = v.x;
        ls[s] = v.y;
        M = fmaxf(M, v.x);
    }
    M = block_max(M, red);
    float L = 0.0f;
    for (int s = threadIdx.x; s < n; s += blockDim.x) {  // (the thread's own entries: no barrier needed)
        const float m = w[s];
        const float e = m > -INFINITY ? expf(m - M) : 0.0f;
        w[s] = e;
        if (e > 0.0f) L += ls[s] * e;
    }
    L = block_sum(L, red) + (sinks ? expf(sink - M) : 0.0f);  // (its barriers also publish w[])
    const int nq = hd >> 2, GS = blockDim.x / nq;  // float4 columns; split groups
    const int gs = threadIdx.x / nq, tq = threadIdx.x - gs * nq;
    float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (gs < GS) {
        const float4* po = (const float4*)(part_o + (i64)hh * S * hd) + tq;
#pragma unroll 8
        for (int s = gs; s < n; s += GS) {
            const float ws = w[s];
            const float4 v = __ldcg(po + (i64)s * nq);
            if (ws > 0.0f) {  // (a split with no weight adds nothing, whatever its partial)
                o.x += v.x * ws;
                o.y += v.y * ws;
                o.z += v.z * ws;
                o.w += v.w * ws;
            }
        }
    }
    oc[threadIdx.x] = o;
    __syncthreads();
    const float* ocf = (const float*)oc;  // group gg's dim d at ocf[gg * hd + d]
    const int d = threadIdx.x;  // (one dim a thread, as above)
    float v = 0.0f;
    if (d < hd) {
        float r = 0.0f;
        for (int gg = 0; gg < GS; ++gg) r += ocf[gg * hd + d];
        v = L > 0.0f ? r / L : 0.0f;
        out[(i64)hh * hd + d] = v;
    }
    if (xq_row && d < (hd & ~31)) q8_store_warp(v, xq_row, K, sh * hd + (d & ~31));  // (warp-uniform)
}
