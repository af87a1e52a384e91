// orcd-worker: the three kernels every tensor format provides, written once over a format struct.
//
// A format struct F describes its blocks and how to dequantize one 32-element *item* in registers:
//
//   struct F {
//     static constexpr int QK;   // elements per block
//     static constexpr int TS;   // bytes per block
//     static constexpr int IPB;  // items per block (QK / 32)
//     // dequantize item i (0 <= i < IPB) of the block at `blk` into v[0..32): v[0..16) belong to
//     // row elements x0 + 0..15 and v[16..32) to x1 + 0..15 (element offsets inside the block, each
//     // a multiple of 16).
//     __device__ static void item(const u8* blk, int i, float v[32], int& x0, int& x1);
//   };
//
// A row of K elements is K / 32 items; item `it` lives in block it / IPB. Consecutive lanes take
// consecutive items, so a warp reads consecutive bytes of the row.
//
// ORCD_QUANT_KERNELS(NAME, F) then defines, with uniform names per format:
//   gemv_NAME        y[t, n] = sum_k W[n, k] x'[t, k] (+ bias[n]) (+ res[t, n])   decode matvec of one
//                    token (T = 1), R rows per warp; dynamic shared memory xs_bytes = 4 * T * xs_chunk(T, K)
//                    (x staged there); x' is x, rms_norm(x) * aux or silu(x) * aux by `mode` (GEMV_X_*:
//                    the op before the GEMV fused into its staging), res a residual added in the epilogue
//                    (or null); x rows x_stride floats apart, aux rows aux_stride (0: one aux for all)
//   gemv_t4_NAME     the same for T <= 4 tokens, gemv_t8_NAME for T <= GEMV_MAX_T (a batched decode
//                    step's rows): each row's y computed exactly as gemv_NAME computes a lone token's
//   gemv_tc_NAME     the same for T <= GEMV_MAX_T tokens on the tensor cores (sm_80 and later; tf32
//                    operands, fp32 sums): each row's y the same for any T. Which of the two the CUDA
//                    device launches: backends/cuda/planner.py, decode_gemv
//   dequant_f16_NAME out[n, k] = W[row0 + n, k] as fp16            the prefill GEMM's operand
// and ORCD_QUANT_KERNELS_Q8(NAME, F), for a format that also defines F::dot_q8 and F::Q8_PARTS (below):
//   gemv_q8_NAME     gemv_NAME's y for one token from x quantized to int8 (quantize_q8, q8.cuh), the
//                    weights' integer codes by dp4a; gemv_q8_t8_NAME the same for T <= GEMV_MAX_T tokens,
//                    each row's y as gemv_q8_NAME computes a lone token's
//   get_rows_NAME    out[t, k] = W[ids[t], k] as float32           embedding gather
#pragma once
#include "common.cuh"
#include "q8.cuh"

// GEMV_MAX_T, GEMV_WARPS (warps per block), GEMV_MAX_R, GEMV_TC_WARPS, XS_MAX_BYTES, XS_TC_MAX_BYTES,
// XS_CHUNK_ALIGN and the GEMV_X_* modes below are -D options of every compile
// (orcd_core/kernels/constants.py), shared with the launchers.

// Activations are staged in shared memory first (XS_MAX_BYTES of dynamic shared memory at most,
// XS_TC_MAX_BYTES for the tensor-core GEMV; the launcher passes xs_bytes(T, K, that budget)): a lane reads the x of *its* item, so lanes of a warp read 32
// different 128-byte spans of x, which from global memory costs one L1 wavefront per lane and was
// what bounded these GEMVs (docs/perf-notes.md). In shared memory the float4s are swizzled: float4 c
// (0..7) of 32-element row r sits at r * 8 + (c ^ (r & 7)), so the 8 lanes of a quarter-warp that read
// float4 c of 8 consecutive rows hit 8 different bank groups. When T vectors of K floats do not fit,
// the K axis is walked in chunks of budget / (4 T) floats, rounded down to a multiple of XS_CHUNK_ALIGN
// (whole blocks, and whole slabs for every warp of the tensor-core GEMV).
static_assert(XS_CHUNK_ALIGN % 256 == 0 && XS_CHUNK_ALIGN % (128 * GEMV_TC_WARPS) == 0,
              "a staged chunk holds whole 256-element blocks and whole 128-element slabs of each K-split warp");
static_assert(XS_MAX_BYTES / (4 * GEMV_MAX_T) >= XS_CHUNK_ALIGN && XS_TC_MAX_BYTES >= XS_MAX_BYTES,
              "a chunk of GEMV_MAX_T vectors fits");

__host__ __device__ __forceinline__ int xs_chunk(int T, int K, int budget = XS_MAX_BYTES) {
    return 4 * T * K <= budget ? K : (budget / (4 * T)) & ~(XS_CHUNK_ALIGN - 1);
}
__device__ __forceinline__ int xs_f4(int e) {  // element e (a multiple of 4) of a staged chunk -> float4 slot
    const int r = e >> 5;
    return (r << 3) | (((e >> 2) & 7) ^ (r & 7));
}
// Staging without a memory round trip per element: a plain strided loop whose load feeds the
// shared-memory store of the same iteration waits for each load in turn (staging K = 4864 floats took
// ~10 such trips per GEMV block). Copies global -> shared go through cp_async16 (no register holds
// them, so the GEMVs keep their register count and occupancy); the loads a thread must compute on are
// batched by block_loop_batched.

// The block's threads walk i = 0 .. n - 1 (thread t takes t, t + blockDim, ... in ascending order),
// STAGE_UNROLL indices at a time: their loads `load(i)` all issued before the first `use(i, v)`.
#define STAGE_UNROLL 2
template <class Load, class Use>
__device__ __forceinline__ void block_loop_batched(int n, Load load, Use use) {
    for (int i0 = threadIdx.x; i0 < n; i0 += STAGE_UNROLL * blockDim.x) {
        decltype(load(0)) v[STAGE_UNROLL];
#pragma unroll
        for (int u = 0; u < STAGE_UNROLL; ++u)
            if (i0 + u * (int)blockDim.x < n) v[u] = load(i0 + u * (int)blockDim.x);
#pragma unroll
        for (int u = 0; u < STAGE_UNROLL; ++u)
            if (i0 + u * (int)blockDim.x < n) use(i0 + u * (int)blockDim.x, v[u]);
    }
}

// Stage elements [k0, k0 + kc) of nv vectors (vector v at x + v * stride) into xs[v * kc / 4 + ...].
// Every thread of the block takes part; the caller synchronizes after it (each thread's copies are
// complete when it returns; the barrier makes them visible to the block).
__device__ __forceinline__ void stage_x(const float* __restrict__ x, i64 stride, int nv, int k0, int kc, float4* xs) {
    const int n4 = kc >> 2;
    for (int i = threadIdx.x; i < nv * n4; i += blockDim.x) {
        const int v = i / n4, e4 = i - v * n4;
        cp_async16(xs + v * n4 + xs_f4(4 * e4), x + v * stride + k0 + 4 * e4);
    }
    cp_async_wait_all();
}
// The one-token GEMV's input modes: the element-wise or row-wise op that produced x, done while x is
// staged, so that it needs no launch of its own (backends/cuda/fusion.py decides).
//   GEMV_X_PLAIN  x as given
//   GEMV_X_RMS    rms_norm(x) * aux, aux the norm weight [K] (as rms_norm_f32); all of K in one chunk
//   GEMV_X_SILU   silu(x) * aux, x the gate and aux the up half [K] (as silu_mul_f32)
static_assert(GEMV_X_PLAIN != GEMV_X_RMS && GEMV_X_PLAIN != GEMV_X_SILU && GEMV_X_RMS != GEMV_X_SILU,
              "the GEMV input modes are distinct");

// Stage elements [k0, k0 + kc) of one vector through `mode`. Every thread of the block takes part;
// the caller synchronizes after it (block_sum's barriers order the RMS mode's two passes). The RMS
// mode's arithmetic is rms_norm_rows's (core.cu, launched with this block size): the same values.
__device__ __forceinline__ void stage_x1(const float* __restrict__ x, const float* __restrict__ aux, float eps,
                                         int mode, int k0, int kc, int K, float4* xs, float* red) {
    const int n4 = kc >> 2;
    if (mode == GEMV_X_SILU) {  // the gate copied, then each thread combines its slots with the up half
        for (int i = threadIdx.x; i < n4; i += blockDim.x) cp_async16(xs + xs_f4(4 * i), x + k0 + 4 * i);
        cp_async_wait_all();
        block_loop_batched(
            n4, [&](int i) { return *(const float4*)(aux + k0 + 4 * i); },
            [&](int i, float4 u) {
                const float4 g = xs[xs_f4(4 * i)];
                xs[xs_f4(4 * i)] = make_float4(g.x / (1.0f + expf(-g.x)) * u.x, g.y / (1.0f + expf(-g.y)) * u.y,
                                               g.z / (1.0f + expf(-g.z)) * u.z, g.w / (1.0f + expf(-g.w)) * u.w);
            });
        return;
    }
    // GEMV_X_RMS: kc == K (the launcher checks), raw x copied first, then scaled in place. Each thread
    // adds the squares of the slots it copied in ascending order, as rms_norm_rows does.
    for (int i = threadIdx.x; i < n4; i += blockDim.x) cp_async16(xs + xs_f4(4 * i), x + 4 * i);
    cp_async_wait_all();
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n4; i += blockDim.x) ss += sumsq4(xs[xs_f4(4 * i)]);
    const float r = rms_scale(block_sum(ss, red), K, eps);
    block_loop_batched(  // each thread rescales the slots it copied
        n4, [&](int i) { return *(const float4*)(aux + 4 * i); },
        [&](int i, float4 w) { xs[xs_f4(4 * i)] = rms_apply4(xs[xs_f4(4 * i)], r, w); });
}

// Stage elements [k0, k0 + kc) of T <= GEMV_MAX_T vectors through `mode` for the tensor-core GEMV: the
// operands of every vector copied in one batch of cp.async (one memory round trip for all, where
// stage_x1 takes one per vector and its batched loads one per two elements a thread), each value
// rounded to tf32 (tf32_round) as it is written. Shared memory: x at xs[0, T kc), then the silu mode's
// up halves (T kc more) or the RMS mode's norm weight (K more): stage_vectors() floats x kc in all. A
// thread transforms the slots it copied itself (complete for it after cp_async_wait_all), so the
// caller's barrier after the call is the only one the plain and silu modes need. The RMS mode (kc ==
// K) computes each vector's norm as rms_norm_rows does in a block of NT = 32 GEMV_WARPS threads, T of
// them at once: thread t < NT copies and sums the slots t, t + NT, ... of every vector in ascending
// order, each warp's butterfly sums go to red, and one more butterfly over lanes that hold the NT / 32
// warp sums (zeros in the others) makes a vector's block sum: bit for bit block_sum's at NT threads.
__host__ __device__ __forceinline__ int stage_vectors(int mode, int T) {
    return mode == GEMV_X_SILU ? 2 * T : mode == GEMV_X_RMS ? T + 1 : T;
}
__device__ __forceinline__ void stage_rows(const float* __restrict__ x, i64 x_stride, const float* __restrict__ aux,
                                           i64 aux_stride, float eps, int mode, int T, int k0, int kc, int K,
                                           float4* xs, float* red) {
    const int n4 = kc >> 2, n = T * n4;  // slot i: vector i / n4, float4 i % n4
    float4* const second = xs + n;       // the up halves, or the norm weight
    auto at = [&](int i) -> int { const int v = i / n4; return v * n4 + xs_f4(4 * (i - v * n4)); };
    auto round4 = [](float4 a) { return make_float4(tf32_round(a.x), tf32_round(a.y), tf32_round(a.z), tf32_round(a.w)); };
    if (mode != GEMV_X_RMS) {
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            const int v = i / n4, e = 4 * (i - v * n4);
            cp_async16(xs + at(i), x + v * x_stride + k0 + e);
            if (mode == GEMV_X_SILU) cp_async16(second + at(i), aux + v * aux_stride + k0 + e);
        }
        cp_async_wait_all();
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            const float4 g = xs[at(i)];
            if (mode == GEMV_X_PLAIN) {
                xs[at(i)] = round4(g);
            } else {  // GEMV_X_SILU: silu(gate) * up, as silu_mul_f32
                const float4 u = second[at(i)];
                xs[at(i)] = round4(make_float4(g.x / (1.0f + expf(-g.x)) * u.x, g.y / (1.0f + expf(-g.y)) * u.y,
                                               g.z / (1.0f + expf(-g.z)) * u.z, g.w / (1.0f + expf(-g.w)) * u.w));
            }
        }
        return;
    }
    constexpr int NT = 32 * GEMV_WARPS;
    static_assert(GEMV_MAX_T * (NT / 32) <= 32, "the warp sums of GEMV_MAX_T vectors fit red[32]");
    __shared__ float rscale[GEMV_MAX_T];
    for (int i = threadIdx.x; i < n4; i += blockDim.x) cp_async16(second + xs_f4(4 * i), aux + 4 * i);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (warp < NT / 32) {
        for (int v = 0; v < T; ++v)
            for (int i = threadIdx.x; i < n4; i += NT) cp_async16(xs + v * n4 + xs_f4(4 * i), x + v * x_stride + 4 * i);
        cp_async_wait_all();
        for (int v = 0; v < T; ++v) {
            float ss = 0.0f;
            for (int i = threadIdx.x; i < n4; i += NT) ss += sumsq4(xs[v * n4 + xs_f4(4 * i)]);
            ss = warp_sum(ss);
            if (lane == 0) red[v * (NT / 32) + warp] = ss;
        }
    }
    cp_async_wait_all();
    __syncthreads();
    if (warp == 0) {
        for (int v = 0; v < T; ++v) {
            const float w = warp_sum(lane < NT / 32 ? red[v * (NT / 32) + lane] : 0.0f);
            if (lane == 0) rscale[v] = rms_scale(w, K, eps);
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const int v = i / n4, e = i - v * n4;
        xs[at(i)] = round4(rms_apply4(xs[at(i)], rscale[v], second[xs_f4(4 * e)]));
    }
}

// The dots of one item with the staged x of T <= MAXT tokens: s[t] for token t's chunk at xv + t * xst
// (float4s; element offset eb of the item's block in the chunk). The item's weights are decoded once
// and multiplied into every token's sum, each token's by the same expression in the same order as a
// lone token's (MAXT = 1), so a row's value does not depend on how many tokens share the launch.
// Default: dequantize the item (F::item, 32 floats live), then its dot with each token's x. A format may
// specialize ItemDot to stream its decode into the sums, a few weights at a time (fewer registers
// live). Keep a specialization compact: the batched GEMV inlines it once with MAXT token bodies, and
// a kernel of a few hundred KB of machine code runs from the instruction cache's misses (seen: 386 KB
// for gemv_t8_Q5_0 at 7.6x the time of the one-token kernel, docs/perf-notes.md).
template <class F>
struct ItemDot {
    template <int MAXT>
    __device__ static __forceinline__ void dot(const u8* blk, int i, const float4* __restrict__ xv, int xst, int eb,
                                               int T, float s[MAXT]) {
        float v[32];
        int x0, x1;
        F::item(blk, i, v, x0, x1);
        int ra[4], rb[4];  // the float4 slots of the item's elements: once, for every token
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            ra[c] = xs_f4(eb + x0 + 4 * c);
            rb[c] = xs_f4(eb + x1 + 4 * c);
        }
#pragma unroll
        for (int t = 0; t < MAXT; ++t) {
            float acc = 0.0f;
            if (t < T) {
#pragma unroll
                for (int c = 0; c < 4; ++c) {  // elements 4c.. then x1 + 4c.., one FFMA a weight
                    const float4 a = xv[t * xst + ra[c]], bb = xv[t * xst + rb[c]];
                    acc = fmaf(v[4 * c + 3], a.w, fmaf(v[4 * c + 2], a.z, fmaf(v[4 * c + 1], a.y, fmaf(v[4 * c], a.x, acc))));
                    acc = fmaf(v[16 + 4 * c + 3], bb.w, fmaf(v[16 + 4 * c + 2], bb.z,
                               fmaf(v[16 + 4 * c + 1], bb.y, fmaf(v[16 + 4 * c], bb.x, acc))));
                }
            }
            s[t] = acc;
        }
    }
};

// One token's item dot (the MoE's expert GEMVs).
template <class F>
__device__ __forceinline__ float item_dot1(const u8* blk, int i, const float4* __restrict__ xv, int eb) {
    float s[1];
    ItemDot<F>::template dot<1>(blk, i, xv, 0, eb, 1, s);
    return s[0];
}

// One warp per R consecutive rows (R = rows_per_warp, 1..GEMV_MAX_R, chosen by the launcher so a warp
// has a few items per lane even for short rows): the warp walks the R rows' items of the staged chunk as
// one flat list, lane l taking items l, l+32, ...; partial sums are kept per (token, row) and reduced
// per row at the end.

template <class F, int MAXT>
__device__ __forceinline__ void gemv_impl(const u8* __restrict__ W, i64 row_bytes, const float* __restrict__ x,
                                          i64 x_stride, float* __restrict__ y, const float* __restrict__ bias,
                                          int N, int K, int T, int R, const float* __restrict__ aux, i64 aux_stride,
                                          const float* __restrict__ res, float eps, int mode) {
    extern __shared__ float4 xs[];
    __shared__ float red[32];
    const int lane = threadIdx.x & 31;
    const int row0 = (blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5)) * R;
    const int nr = row0 < N ? min(R, N - row0) : 0;  // this warp's rows (0: it only helps staging)
    const int KC = xs_chunk(T, K);
    pdl_trigger();  // (the next kernel may take free SMs now; it waits for this one where it must)
    if (MAXT == 1) {  // the warp's weight bytes (its rows are consecutive) requested into L2 before x is
        // staged: their DRAM latency overlaps the staging (and a fused norm's reduction over K) instead of
        // following it. One token only: measured, the one-token step -3.5%, the 8-row step +6% (its x is
        // staged in chunks, docs/perf-notes.md)
        const u8* wb = W + (i64)row0 * row_bytes;
        const i64 nbytes = (i64)nr * row_bytes;
        for (i64 o = (i64)lane * 128; o < nbytes; o += 32 * 128) prefetch_l2(wb + o);
    }
    // launched early (pdl): the weights above are requested while the kernel ahead ends; x, res and y
    // only after it
    pdl_wait();
    float acc[MAXT][GEMV_MAX_R];
#pragma unroll
    for (int t = 0; t < MAXT; ++t)
#pragma unroll
        for (int r = 0; r < GEMV_MAX_R; ++r) acc[t][r] = 0.0f;
    for (int k0 = 0; k0 < K; k0 += KC) {
        const int kc = min(KC, K - k0);
        if (k0) __syncthreads();  // the previous chunk is consumed
        if (mode == GEMV_X_PLAIN) {
            stage_x(x, x_stride, T, k0, kc, xs);
        } else {
            for (int t = 0; t < T; ++t)
                stage_x1(x + t * x_stride, aux + t * aux_stride, eps, mode, k0, kc, K, xs + t * (kc >> 2), red);
        }
        __syncthreads();
        const int n_items = kc >> 5, it0 = k0 >> 5;
        // Lane l takes the items whose flat index r * (K / 32) + g over the warp's rows is l mod 32, in
        // ascending order: the same items in the same order whether K is staged whole or in chunks
        // (how many chunks depends on T), so a row's sum does not depend on how many rows share the launch.
        // One loop, unrolled only for one token: every copy of the item dot is machine code the
        // instruction cache must hold (MAXT token bodies each in the batched kernels). Row r's sums run
        // in `a` (one add per item and token), taken from and put back to acc[][r] around its items.
        const int NI = K >> 5, it1 = it0 + n_items;
        for (int r = 0; r < nr; ++r) {
            float a[MAXT];
#pragma unroll
            for (int t = 0; t < MAXT; ++t) {
                a[t] = acc[t][0];
#pragma unroll
                for (int rr = 1; rr < GEMV_MAX_R; ++rr) a[t] = rr == r ? acc[t][rr] : a[t];
            }
#pragma unroll(MAXT == 1 ? 2 : 1)
            for (int g = it0 + ((lane - r * NI - it0) & 31); g < it1; g += 32) {
                const int b = g / F::IPB, i = g - b * F::IPB;
                // each token's dot is the one-token kernel's: the same value for a row alone or batched
                float s[MAXT];
                ItemDot<F>::template dot<MAXT>(W + (i64)(row0 + r) * row_bytes + (i64)b * F::TS, i, xs, kc >> 2,
                                               b * F::QK - k0, T, s);
#pragma unroll
                for (int t = 0; t < MAXT; ++t) a[t] = __fadd_rn(a[t], s[t]);
            }
#pragma unroll
            for (int t = 0; t < MAXT; ++t) {
#pragma unroll
                for (int rr = 0; rr < GEMV_MAX_R; ++rr) acc[t][rr] = rr == r ? a[t] : acc[t][rr];
            }
        }
    }
    // every warp reduces all its sums (zeros past nr / T): shuffles outside divergent branches, so
    // the compiler emits no collective fallback code for them; only lane 0 of a real (row, token) writes
#pragma unroll
    for (int rr = 0; rr < GEMV_MAX_R; ++rr) {
#pragma unroll
        for (int t = 0; t < MAXT; ++t) {
            const float s = warp_sum(acc[t][rr]);
            if (lane == 0 && rr < nr && t < T) {
                const i64 o = (i64)t * N + row0 + rr;
                const float v = s + (bias ? bias[row0 + rr] : 0.0f);
                y[o] = res ? res[o] + v : v;  // the residual add's operand order (add_f32)
            }
        }
    }
}

// The tensor-core decode GEMV (sm_80 and later): y[t, n] for T <= GEMV_MAX_T tokens as gemv_impl
// defines it (the same staging and input modes, bias and residual), its products on the tensor cores:
// mma.m16n8k8 over tf32 operands (every weight and every x rounded to 10 mantissa bits, as fp16 would
// round them, in fp32's range: tf32_bits, tf32_round), fp32 sums.
//
// A warp computes a tile of 16 rows for all T tokens: the 8 columns of the mma's B are the tokens (past
// T a copy of token T - 1, whose columns no one writes), so 8 tokens cost the weights' decode once, as
// one token does. K is walked in slabs of 128
// elements, 4 items: in slab s lane (g = lane / 4, c = lane % 4) decodes item 4s + c of rows g and g + 8
// (F::item) and reads token g's x at the same 32 elements. Those are 16 k-steps of the mma: in step j
// the mma's k index c takes element 2j of lane c's item and k index c + 4 element 2j + 1 (any pairing
// of k indices with elements works if A and B share it). A block is GEMV_TC_WARPS warps: GEMV_TC_WARPS /
// KS tiles, each with its K split over KS warps (the tile's warp w takes slabs w, w + KS, ..., in
// ascending order; the KS partial tiles are added in warp order at the end).
//
// A row's value for token t does not depend on T: each warp runs the same sequence of mma over the same
// A (KS comes from N and K only; a staged chunk is a multiple of 8 slabs, so a warp's slabs and their
// order do not depend on the chunking), and a column of an mma's result depends only on its column of B.
template <class F>
__device__ __forceinline__ void gemv_tc_impl(const u8* __restrict__ W, i64 row_bytes, const float* __restrict__ x,
                                             i64 x_stride, float* __restrict__ y, const float* __restrict__ bias,
                                             int N, int K, int T, int KS, const float* __restrict__ aux,
                                             i64 aux_stride, const float* __restrict__ res, float eps, int mode) {
    extern __shared__ float4 xs[];
    __shared__ float red[32];
    __shared__ float4 part[GEMV_TC_WARPS * 32];  // the K-split warps' partial tiles
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int kw = warp % KS, row0 = (blockIdx.x * (GEMV_TC_WARPS / KS) + warp / KS) * 16;
    const int g = lane >> 2, c = lane & 3;
    const bool live = row0 < N;  // (else the warp only helps to stage x)
    // rows past N (in the last tile) read row N - 1 and are never written
    const u8* __restrict__ wa = W + (i64)min(row0 + g, N - 1) * row_bytes;
    const u8* __restrict__ wb = W + (i64)min(row0 + g + 8, N - 1) * row_bytes;
    const int NI = K >> 5, NS = (NI + 3) >> 2;  // items and slabs of a row
    const int KC = xs_chunk(stage_vectors(mode, T), K, XS_TC_MAX_BYTES);  // (RMS mode: the launcher fits all of K)
    auto prefetch = [&](int s) {  // a slab's weight lines requested into L2
        const int it = min(4 * s + c, NI - 1);
        prefetch_l2(wa + (i64)(it / F::IPB) * F::TS);
        prefetch_l2(wb + (i64)(it / F::IPB) * F::TS);
    };
    // Slab s: decode (this lane's item of rows g and g + 8; past the row's end, when K is not a multiple
    // of 128, the last item again, whose products get zeros for x), then 16 k-steps on the tensor cores
    // over two chains of accumulators (d: even float4s of the item, e: odd ones; added at the end).
    int x0 = 0, x1 = 16, blk = 0;
    float va[32], vb[32];
    auto decode = [&](int s) {
        if (s + 2 * KS < NS) prefetch(s + 2 * KS);  // so the slab two ahead finds its lines in L2
        const int it = min(4 * s + c, NI - 1);
        blk = it / F::IPB;
        const int i = it - blk * F::IPB;
        F::item(wa + (i64)blk * F::TS, i, va, x0, x1);
        F::item(wb + (i64)blk * F::TS, i, vb, x0, x1);
    };
    float d[4] = {0.0f, 0.0f, 0.0f, 0.0f}, e[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // rows g, g + 8 x tokens 2c, 2c + 1
    auto multiply_slab = [&](int k0, const float4* __restrict__ xt, bool zero) {
        // the float4 slots of x at elements x0 + 4q and x1 + 4q: xs_f4(e + 4q) = xs_f4(e) ^ q for e a
        // multiple of 16 (F::item's runs start at multiples of 16)
        const int sa = xs_f4(blk * F::QK - k0 + x0), sb = xs_f4(blk * F::QK - k0 + x1);
#pragma unroll
        for (int q = 0; q < 8; ++q) {  // elements 4q .. 4q + 3 of the item (x0 + .. for q < 4, then x1 + ..)
            float4 xv = xt[q < 4 ? sa ^ q : sb ^ (q - 4)];
            if (zero) xv = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            float* acc = q & 1 ? e : d;
            mma_tf32_16x8x8(acc, tf32_bits(va[4 * q]), tf32_bits(vb[4 * q]), tf32_bits(va[4 * q + 1]),
                            tf32_bits(vb[4 * q + 1]), __float_as_uint(xv.x), __float_as_uint(xv.y));
            mma_tf32_16x8x8(acc, tf32_bits(va[4 * q + 2]), tf32_bits(vb[4 * q + 2]), tf32_bits(va[4 * q + 3]),
                            tf32_bits(vb[4 * q + 3]), __float_as_uint(xv.z), __float_as_uint(xv.w));
        }
    };
    auto multiply = [&](int s, int k0, const float4* __restrict__ xt) {  // (the zeros only in a row's last slab)
        if (4 * s + 4 > NI) multiply_slab(k0, xt, 4 * s + c >= NI);
        else multiply_slab(k0, xt, false);
    };
    // A slab is decoded before the x it multiplies is needed: the warp's first (kw) before x is staged,
    // so that their memory latencies overlap; each next one right after the last one's products (its
    // weights do not depend on x, so also across a chunk's end, before the next chunk is staged).
    int s = kw;
    pdl_trigger();  // (the next kernel may take free SMs now; it waits for this one where it must)
    if (live) {
        if (kw + KS < NS) prefetch(kw + KS);
        if (kw < NS) decode(kw);
    }
    // launched early (pdl): the first slab's weights above are read while the kernel ahead ends; x, res
    // and y only after it
    pdl_wait();
    for (int k0 = 0; k0 < K; k0 += KC) {
        const int kc = min(KC, K - k0);
        if (k0) __syncthreads();  // the previous chunk is consumed
        stage_rows(x, x_stride, aux, aux_stride, eps, mode, T, k0, kc, K, xs, red);
        __syncthreads();
        if (!live) continue;
        const float4* __restrict__ xt = xs + min(g, T - 1) * (kc >> 2);  // lanes of tokens past T: columns no one writes
        for (const int s_end = (k0 + kc + 127) >> 7; s < s_end; s += KS) {  // this chunk's slabs
            multiply(s, k0, xt);
            if (s + KS < NS) decode(s + KS);
        }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) d[j] += e[j];
    if (KS > 1) {  // the tile's first warp adds the others' partial tiles, in warp order
        part[warp * 32 + lane] = make_float4(d[0], d[1], d[2], d[3]);
        __syncthreads();
        if (kw != 0) return;
        for (int j = 1; j < KS; ++j) {
            const float4 p = part[(warp + j) * 32 + lane];
            d[0] += p.x; d[1] += p.y; d[2] += p.z; d[3] += p.w;
        }
    }
    if (!live) return;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int r = row0 + g + 8 * (j >> 1), t = 2 * c + (j & 1);
        if (r < N && t < T) {
            const i64 o = (i64)t * N + r;
            const float v = d[j] + (bias ? bias[r] : 0.0f);
            y[o] = res ? res[o] + v : v;  // the residual add's operand order (add_f32), as gemv_impl
        }
    }
}

// One thread per item of rows [row0, row0 + n_rows); out is [n_rows, K] fp16.
template <class F>
__device__ __forceinline__ void dequant_f16_impl(const u8* __restrict__ W, i64 row_bytes, half_bits* __restrict__ out,
                                                 int row0, int n_rows, int K) {
    const int n_items = K >> 5;
    const i64 g = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= (i64)n_rows * n_items) return;
    const int r = (int)(g / n_items), it = (int)(g - (i64)r * n_items);
    const int b = it / F::IPB, i = it - b * F::IPB;
    float v[32];
    int x0, x1;
    F::item(W + (i64)(row0 + r) * row_bytes + (i64)b * F::TS, i, v, x0, x1);
    half_bits* o = out + (i64)r * K + b * F::QK;
    uint4* oa = (uint4*)(o + x0);
    uint4* ob = (uint4*)(o + x1);
#pragma unroll
    for (int c = 0; c < 2; ++c) {
        oa[c] = make_uint4(pack_h2(v[8 * c], v[8 * c + 1]), pack_h2(v[8 * c + 2], v[8 * c + 3]),
                           pack_h2(v[8 * c + 4], v[8 * c + 5]), pack_h2(v[8 * c + 6], v[8 * c + 7]));
        ob[c] = make_uint4(pack_h2(v[16 + 8 * c], v[16 + 8 * c + 1]), pack_h2(v[16 + 8 * c + 2], v[16 + 8 * c + 3]),
                           pack_h2(v[16 + 8 * c + 4], v[16 + 8 * c + 5]), pack_h2(v[16 + 8 * c + 6], v[16 + 8 * c + 7]));
    }
}

// grid (ceil(K/32 / blockDim), T): out[t, :] = row ids[t] of W as float32. Ids outside [0, N) give NaN rows
// (the engine validates ids before they reach the GPU; NaN makes a violation visible, never silent).
template <class F>
__device__ __forceinline__ void get_rows_impl(const u8* __restrict__ W, i64 row_bytes, const int* __restrict__ ids,
                                              float* __restrict__ out, int N, int K) {
    const int t = blockIdx.y;
    const int it = blockIdx.x * blockDim.x + threadIdx.x;
    if (it >= (K >> 5)) return;
    const int id = ids[t];
    const bool bad = id < 0 || id >= N;
    const int b = it / F::IPB, i = it - b * F::IPB;
    float* o = out + (i64)t * K + b * F::QK;
    float v[32];
    int x0, x1;
    F::item(W + (i64)(bad ? 0 : id) * row_bytes + (i64)b * F::TS, i, v, x0, x1);
    if (bad) {
#pragma unroll
        for (int k = 0; k < 32; ++k) v[k] = __int_as_float(0x7fc00000);
    }
    float4* oa = (float4*)(o + x0);
    float4* ob = (float4*)(o + x1);
#pragma unroll
    for (int c = 0; c < 4; ++c) {
        oa[c] = make_float4(v[4 * c], v[4 * c + 1], v[4 * c + 2], v[4 * c + 3]);
        ob[c] = make_float4(v[16 + 4 * c], v[16 + 4 * c + 1], v[16 + 4 * c + 2], v[16 + 4 * c + 3]);
    }
}

// ================================================================================================
// The int8-activation decode GEMV of one token (gemv_q8_NAME, for a format that defines F::dot_q8 and
// F::Q8_PARTS; its plugin's source instantiates ORCD_QUANT_KERNELS_Q8): y[n] = sum_k W[n, k] x[k]
// (+ bias[n]) (+ res[n]), x quantized by quantize_q8 (q8.cuh: int8 per 32 elements; the GEMV input mode,
// the RMS norm or the silu_mul, applied there). F::dot_q8<NT, NR>(blk, p, e0, x, nt, out) writes
// out[r NT + t], the sum of w x[t] over part p (0 .. Q8_PARTS - 1) of weight row r's block blk[r] (r <
// NR), whose first element is e0, for the nt <= NT token rows x[0 .. nt) (0 past them: a step of fewer
// rows does only their work): the parts' weights loaded and their integer codes decoded once, then per
// token its x chunks read once and, per weight row, the codes times the int8 x by dp4a (four products an
// instruction), the block's scales and the groups' d applied per run after, each (row, token) by the same
// expressions as a lone one (NT = NR = 1);
// ~2 instructions a weight where the float GEMVs spend 5-6 on decoding and FFMAs (what bounds them on
// the larger matrices: docs/perf-notes.md). The float GEMVs stay the exact path.
// A block of Q8_WARPS warps stages the quantized row (q8_row_bytes(K), one batch of cp.async), each warp
// takes R consecutive rows (the batched kernel R groups of Q8_T8_ROWS rows, each token's x read from
// shared memory once for a group), and lane l the parts l, l + 32, ... Launched early (PDL): the warp's
// weights are requested into L2 while the kernel ahead (quantize_q8) runs; its x only after.
// ================================================================================================
// F::dot_q8 of one token row and one weight row: the part's sum (the expert GEMVs', moe_kernels.cuh)
template <class F>
__device__ __forceinline__ float dot_q8_one(const u8* blk, int p, int e0, const Q8Row& x) {
    const Q8Row xs[1] = {x};
    const u8* const blks[1] = {blk};
    float v[1];
    F::template dot_q8<1, 1>(blks, p, e0, xs, 1, v);
    return v[0];
}

template <class F, int MAXT>
__device__ __forceinline__ void gemv_q8_impl(const u8* __restrict__ W, i64 row_bytes, const u8* __restrict__ xq,
                                             float* __restrict__ y, const float* __restrict__ bias, int N, int K,
                                             int T, int R, const float* __restrict__ res) {
    extern __shared__ int4 x8[];
    constexpr int RB = MAXT == 1 ? 1 : Q8_T8_ROWS;  // weight rows taken together (each token's x read once)
    const int lane = threadIdx.x & 31;
    const int row0 = (blockIdx.x * Q8_WARPS + (threadIdx.x >> 5)) * R * RB;
    const int nr = row0 < N ? min(R * RB, N - row0) : 0;  // this warp's rows (0: it only helps staging)
    const int nt = MAXT == 1 ? 1 : T;                      // tokens (rows of x and y)
    pdl_trigger();
    {
        const u8* wb = W + (i64)row0 * row_bytes;
        const i64 nbytes = (i64)nr * row_bytes;
        for (i64 o = (i64)lane * 128; o < nbytes; o += 32 * 128) prefetch_l2(wb + o);
    }
    pdl_wait();
    // 16-byte units of a quantized row: the int8 chunks, then the metas (q8_row_bytes(K) = 16 nu: the
    // tokens' rows follow each other in global and in shared memory)
    const int nq = K >> 4, nu = nq + K / Q8_GROUP;
    for (int u = threadIdx.x; u < nt * nu; u += blockDim.x) {
        const int t = u / nu, w = u - t * nu;
        cp_async16(x8 + t * nu + (w < nq ? q8_swz(w) : w), xq + 16 * (i64)u);
    }
    cp_async_wait_all();
    __syncthreads();
    const int NP = (K / F::QK) * F::Q8_PARTS;  // parts of a row
    Q8Row xr[MAXT];  // (rows past nt: dot_q8 skips them; their sums are never written)
#pragma unroll
    for (int t = 0; t < MAXT; ++t) {
        const int o = min(t, nt - 1) * nu;
        xr[t] = Q8Row{x8 + o, (const float4*)(x8 + o + nq)};
    }
    for (int r = 0; r < nr; r += RB) {  // (nr is the same for the warp's lanes: the shuffles below see all of them)
        const int nb = min(RB, nr - r);  // rows of this group (the last one of the matrix may have fewer)
        const u8* __restrict__ wr[RB];
#pragma unroll
        for (int j = 0; j < RB; ++j) wr[j] = W + (i64)(row0 + r + min(j, nb - 1)) * row_bytes;
        float a[RB][MAXT];
#pragma unroll
        for (int j = 0; j < RB; ++j)
#pragma unroll
            for (int t = 0; t < MAXT; ++t) a[j][t] = 0.0f;
        // lane l takes the parts l, l + 32, ... of each row: of a flat list over the R rows for one token
        // (flat index r * NP + p = lane mod 32), of each row alone for a batch, which is the one-token
        // kernel's order at R = 1 (the launcher's), so a row's sum is added up in the same order either way
#pragma unroll(MAXT == 1 ? 2 : 1)  // (the batched kernel's body is RB x MAXT dots: unrolled, its code doubles)
        for (int p = MAXT == 1 ? (lane - r * NP) & 31 : lane; p < NP; p += 32) {
            const int b = p / F::Q8_PARTS;
            const u8* blks[RB];
#pragma unroll
            for (int j = 0; j < RB; ++j) blks[j] = wr[j] + (i64)b * F::TS;
            // the weights loaded and decoded once for every token, each token's x once for the RB rows;
            // each (row, token) sum by the same expressions in the same order as a lone token's of a lone
            // row: a row's value does not depend on how many tokens share the launch
            float v[RB * MAXT];
            F::template dot_q8<MAXT, RB>(blks, p - b * F::Q8_PARTS, b * F::QK, xr, nt, v);
#pragma unroll
            for (int j = 0; j < RB; ++j)
#pragma unroll
                for (int t = 0; t < MAXT; ++t) a[j][t] = __fadd_rn(a[j][t], v[j * MAXT + t]);  // (never fused
            //   with the dot's last product: a kernel of fewer rows, whose dot ends in a branch, would round otherwise)
        }
        auto store = [&](int n, int t, float s) {  // token t's sum s of row n
            const i64 o = (i64)t * N + n;
            const float v = s + (bias ? bias[n] : 0.0f);
            y[o] = res ? res[o] + v : v;  // the residual add's operand order (add_f32), as gemv_impl
        };
#pragma unroll
        for (int j = 0; j < RB; ++j) {
            if (j >= nb) break;  // (warp-uniform)
            if constexpr (MAXT == 8) {  // the 8 sums at once (warp_sum8: warp_sum's bits), lanes 4t write token t
                const float s = warp_sum8(a[j]);
                if ((lane & 3) == 0 && (lane >> 2) < nt) store(row0 + r + j, lane >> 2, s);
            } else {
#pragma unroll
                for (int t = 0; t < MAXT; ++t) {
                    const float s = warp_sum(a[j][t]);
                    if (lane == 0 && t < nt) store(row0 + r + j, t, s);
                }
            }
        }
    }
}

// The int8-activation GEMVs of a format with F::dot_q8 (a quant plugin's .cu, beside ORCD_QUANT_KERNELS):
// gemv_q8_NAME one token, gemv_q8_t8_NAME up to GEMV_MAX_T (each row's values those of a lone token).
// Dynamic shared memory: T q8_row_bytes(K). A warp takes R rows (gemv_q8_t8_*: R groups of Q8_T8_ROWS).
#define ORCD_QUANT_KERNELS_Q8(NAME, F)                                                                       \
    extern "C" __global__ void __launch_bounds__(Q8_WARPS * 32)                                             \
        gemv_q8_##NAME(const u8* W, i64 row_bytes, const u8* xq, float* y, const float* bias, int N, int K,  \
                       int T, int R, const float* res) {                                                     \
        gemv_q8_impl<F, 1>(W, row_bytes, xq, y, bias, N, K, 1, R, res);                                      \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(Q8_WARPS * 32)                                             \
        gemv_q8_t8_##NAME(const u8* W, i64 row_bytes, const u8* xq, float* y, const float* bias, int N,      \
                          int K, int T, int R, const float* res) {                                           \
        gemv_q8_impl<F, GEMV_MAX_T>(W, row_bytes, xq, y, bias, N, K, T, R, res);                             \
    }

#define ORCD_QUANT_KERNELS(NAME, F)                                                                          \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                                           \
        gemv_##NAME(const u8* W, i64 row_bytes, const float* x, i64 xst, float* y, const float* bias, int N, \
                    int K, int T, int R, const float* aux, i64 ast, const float* res, float eps, int mode) {  \
        gemv_impl<F, 1>(W, row_bytes, x, xst, y, bias, N, K, 1, R, aux, ast, res, eps, mode);                \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                                           \
        gemv_t4_##NAME(const u8* W, i64 row_bytes, const float* x, i64 xst, float* y, const float* bias,     \
                       int N, int K, int T, int R, const float* aux, i64 ast, const float* res, float eps,   \
                       int mode) {                                                                           \
        gemv_impl<F, 4>(W, row_bytes, x, xst, y, bias, N, K, T, R, aux, ast, res, eps, mode);                \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                                           \
        gemv_t8_##NAME(const u8* W, i64 row_bytes, const float* x, i64 xst, float* y, const float* bias,     \
                       int N, int K, int T, int R, const float* aux, i64 ast, const float* res, float eps,   \
                       int mode) {                                                                           \
        gemv_impl<F, GEMV_MAX_T>(W, row_bytes, x, xst, y, bias, N, K, T, R, aux, ast, res, eps, mode);       \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(GEMV_TC_WARPS * 32)                                        \
        gemv_tc_##NAME(const u8* W, i64 row_bytes, const float* x, i64 xst, float* y, const float* bias,     \
                       int N, int K, int T, int KS, const float* aux, i64 ast, const float* res, float eps,  \
                       int mode) {                                                                           \
        gemv_tc_impl<F>(W, row_bytes, x, xst, y, bias, N, K, T, KS, aux, ast, res, eps, mode);               \
    }                                                                                                        \
    extern "C" __global__ void dequant_f16_##NAME(const u8* W, i64 row_bytes, half_bits* out, int row0,      \
                                                  int n_rows, int K) {                                       \
        dequant_f16_impl<F>(W, row_bytes, out, row0, n_rows, K);                                             \
    }                                                                                                        \
    extern "C" __global__ void get_rows_##NAME(const u8* W, i64 row_bytes, const int* ids, float* out, int N, \
                                               int K) {                                                      \
        get_rows_impl<F>(W, row_bytes, ids, out, N, K);                                                      \
    }
