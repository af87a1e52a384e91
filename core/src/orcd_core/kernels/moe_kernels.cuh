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
//                         down projection and the weighted sum (slots in order: deterministic); with res,
//                         res[t, n] + that (the residual add's operand order, add_f32: its bits)
//   moe_gemm_NAME         the prefill's grouped GEMM on the tensor cores (below): Y = X W_e^T for each
//                         expert e's rows of the pairs sorted by expert
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

// The GLU's output a[p, n] from a warp's partial sums of the gate and up rows (every lane calls it; lane 0
// writes): act(gate + bias, up + bias), NaN for an expert id outside [0, E) (ok false).
__device__ __forceinline__ void moe_glu_store(float g, float u, bool ok, const float* __restrict__ bias, i64 g_row,
                                              int Fh, float* __restrict__ a, int p, int n, int act, float alpha,
                                              float limit) {
    g = warp_sum(g);
    u = warp_sum(u);
    if ((threadIdx.x & 31) == 0) {
        if (!ok) {
            a[(i64)p * Fh + n] = __int_as_float(0x7fc00000);
        } else {
            const float bg = bias ? bias[g_row] : 0.0f, bu = bias ? bias[g_row + Fh] : 0.0f;
            a[(i64)p * Fh + n] = moe_act(g + bg, u + bu, act, alpha, limit);
        }
    }
}

// The down projection's output out[t, n] from a warp's partial sums of its k slots' rows (every lane calls
// it; lane 0 writes): the slots' sums and biases weighted by wts, in slot order; NaN where an id was bad.
__device__ __forceinline__ void moe_down_store(const float acc[MOE_MAX_K], bool bad, const int* __restrict__ ids,
                                               const float* __restrict__ wts, const float* __restrict__ bias,
                                               const float* __restrict__ res, float* __restrict__ out, int t,
                                               int n, int N, int k, int E) {
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
    if ((threadIdx.x & 31) == 0) {
        const i64 o = (i64)t * N + n;
        const float v = bad ? __int_as_float(0x7fc00000) : sum + b;
        out[o] = res ? res[o] + v : v;
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
    moe_glu_store(acc[0], acc[1], ok, bias, g_row, Fh, a, p, n, act, alpha, limit);
}

// grid (ceil(N / MOE_WARPS), T), dynamic shared memory 4 * k * xs_chunk(k, K); W is [E, N, K], a [T * k, K],
// wts [T, k], out [T, N]; the k slots' rows of one output are one flat list (their loads in flight together)
template <class F>
__device__ __forceinline__ void moe_down_impl(const u8* __restrict__ W, i64 row_bytes, const int* __restrict__ ids,
                                              const float* __restrict__ wts, const float* __restrict__ a,
                                              const float* __restrict__ bias, const float* __restrict__ res,
                                              float* __restrict__ out, int N, int K, int k, int E) {
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
    moe_down_store(acc, bad, ids, wts, bias, res, out, t, n, N, k, E);
}

// ---- the int8-activation expert GEMVs (the decode of decode_gemv "q8", one row or a batch) ------------
// As moe_gemv_glu / moe_down for a format with F::dot_q8 (quant_kernels.cuh gemv_q8_impl): the activations
// quantized to int8 by quantize_q8 (q8.cuh rows: x per token, a per pair), each block stages the rows it
// reads, a warp takes one output row and its lanes the flat list of (row or slot, part), dp4a products.
// Blocks of Q8_WARPS warps. Each pair's values depend on its own token and expert only.

// Stage nv consecutive quantized rows of K elements (q8_row_bytes(K) bytes each) into xs (int8 chunks
// swizzled as q8.cuh says, then the metas; row v at v * q8_row_bytes(K) / 16 int4s); row v's view in xr[v].
__device__ __forceinline__ void moe_stage_q8(const u8* __restrict__ xq, int nv, int K, int4* xs) {
    const int nq = K >> 4, nu = nq + K / Q8_GROUP;  // 16-byte units a row
    for (int u = threadIdx.x; u < nv * nu; u += blockDim.x) {
        const int v = u / nu, w = u - v * nu;
        cp_async16(xs + v * nu + (w < nq ? q8_swz(w) : w), xq + 16 * (i64)u);
    }
    cp_async_wait_all();
    __syncthreads();
}

// grid (ceil(Fh / Q8_WARPS), P), dynamic shared memory q8_row_bytes(K); xq [T] quantized rows, pair p reads
// row p / x_div; a [P, Fh] float32 as moe_gemv_glu's, and aq [P] its rows quantized (the down projection's
// input): each group of 32 outputs of a pair by the warp that completes it (counters [P, Fh / 32], each
// reset by that warp), with q8_store_warp: the bytes quantize_q8 writes for them, without its launch.
// Fh must be a multiple of 32 (moe.py checks): a group short of 32 warps would never complete, and its
// counter would stay set for every later launch.
template <class F>
__device__ __forceinline__ void moe_gemv_glu_q8_impl(const u8* __restrict__ W, i64 row_bytes, const int* __restrict__ ids,
                                                     const u8* __restrict__ xq, int x_div, const float* __restrict__ bias,
                                                     float* __restrict__ a, int Fh, int K, int E, int act, float alpha,
                                                     float limit, u8* __restrict__ aq,
                                                     unsigned int* __restrict__ counters) {
    extern __shared__ int4 x8[];
    const int p = blockIdx.y, lane = threadIdx.x & 31;
    const int n = blockIdx.x * Q8_WARPS + (threadIdx.x >> 5);
    pdl_trigger();
    pdl_wait();  // (the ids too come from a kernel ahead)
    const int e = ids[p];
    const bool ok = n < Fh && e >= 0 && e < E;
    const i64 g_row = (i64)(ok ? e : 0) * 2 * Fh + (n < Fh ? n : 0);
    const u8* __restrict__ rg = W + g_row * row_bytes;
    const u8* __restrict__ ru = W + (g_row + Fh) * row_bytes;
    moe_stage_q8(xq + (i64)(p / x_div) * q8_row_bytes(K), 1, K, x8);
    if (n >= Fh) return;
    const Q8Row xr{x8, (const float4*)(x8 + (K >> 4))};
    const int NP = (K / F::QK) * F::Q8_PARTS;
    float ag = 0.0f, au = 0.0f;
    if (ok) {
#pragma unroll 2
        for (int f = lane; f < 2 * NP; f += 32) {  // gate's parts, then up's
            const bool up = f >= NP;
            const int q = up ? f - NP : f, b = q / F::Q8_PARTS;
            const float v = dot_q8_one<F>((up ? ru : rg) + (i64)b * F::TS, q - b * F::Q8_PARTS, b * F::QK, xr);
            if (up) au += v; else ag += v;
        }
    }
    moe_glu_store(ag, au, ok, bias, g_row, Fh, a, p, n, act, alpha, limit);
    __threadfence();  // lane 0's a[p, n] visible before the count
    __syncwarp();
    unsigned int* const cnt = counters + (i64)p * (Fh / Q8_GROUP) + n / Q8_GROUP;
    unsigned int c = 0;
    if (lane == 0) c = atomicAdd(cnt, 1u);
    if (__shfl_sync(0xffffffffu, c, 0) != Q8_GROUP - 1) return;  // (warp-uniform)
    __threadfence();
    __syncwarp();
    const int e0 = n / Q8_GROUP * Q8_GROUP;
    q8_store_warp(__ldcg(a + (i64)p * Fh + e0 + lane), aq + (i64)p * q8_row_bytes(Fh), Fh, e0);
    if (lane == 0) *cnt = 0u;
}

// grid (ceil(N / Q8_WARPS), T), dynamic shared memory k q8_row_bytes(K); aq [T k] quantized rows of a
template <class F>
__device__ __forceinline__ void moe_down_q8_impl(const u8* __restrict__ W, i64 row_bytes, const int* __restrict__ ids,
                                                 const float* __restrict__ wts, const u8* __restrict__ aq,
                                                 const float* __restrict__ bias, const float* __restrict__ res,
                                                 float* __restrict__ out, int N, int K, int k, int E) {
    extern __shared__ int4 x8[];
    const int t = blockIdx.y, lane = threadIdx.x & 31;
    const int n = blockIdx.x * Q8_WARPS + (threadIdx.x >> 5);
    pdl_trigger();
    pdl_wait();  // (the ids too come from a kernel ahead)
    bool bad = false;
    const u8* rows[MOE_MAX_K];
#pragma unroll
    for (int s = 0; s < MOE_MAX_K; ++s) {
        const int e = s < k ? ids[t * k + s] : 0;
        bad |= s < k && (e < 0 || e >= E);
        rows[s] = W + ((i64)(e >= 0 && e < E ? e : 0) * N + (n < N ? n : 0)) * row_bytes;
    }
    moe_stage_q8(aq + (i64)t * k * q8_row_bytes(K), k, K, x8);
    if (n >= N) return;
    const int nu = (K >> 4) + K / Q8_GROUP;  // int4s a staged row
    const int NP = (K / F::QK) * F::Q8_PARTS;
    float acc[MOE_MAX_K];
#pragma unroll
    for (int s = 0; s < MOE_MAX_K; ++s) acc[s] = 0.0f;
    int s = lane / NP, q = lane - s * NP;  // this lane's first (slot, part) of the flat list
#pragma unroll 2
    for (int f = lane; f < k * NP; f += 32) {
        const int b = q / F::Q8_PARTS;
        const int4* xs = x8 + s * nu;
        const u8* row = rows[0];  // rows[s], selected (an indexed register array would go to local memory)
#pragma unroll
        for (int r = 1; r < MOE_MAX_K; ++r) row = r == s ? rows[r] : row;
        const float v = dot_q8_one<F>(row + (i64)b * F::TS, q - b * F::Q8_PARTS, b * F::QK,
                                      Q8Row{xs, (const float4*)(xs + (K >> 4))});
#pragma unroll
        for (int r = 0; r < MOE_MAX_K; ++r) acc[r] += r == s ? v : 0.0f;
        q += 32;
        while (q >= NP) {
            q -= NP;
            ++s;
        }
    }
    moe_down_store(acc, bad, ids, wts, bias, res, out, t, n, N, k, E);
}

// The int8-activation expert GEMVs of a format with F::dot_q8 (its plugin's .cu, beside ORCD_MOE_KERNELS).
#define ORCD_MOE_KERNELS_Q8(NAME, F)                                                                         \
    extern "C" __global__ void __launch_bounds__(Q8_WARPS * 32)                                             \
        moe_gemv_glu_q8_##NAME(const u8* W, i64 row_bytes, const int* ids, const u8* xq, int x_div,          \
                               const float* bias, float* a, int Fh, int K, int E, int act, float alpha,      \
                               float limit, u8* aq, unsigned int* counters) {                                \
        moe_gemv_glu_q8_impl<F>(W, row_bytes, ids, xq, x_div, bias, a, Fh, K, E, act, alpha, limit, aq,     \
                                counters);                                                                   \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(Q8_WARPS * 32)                                             \
        moe_down_q8_##NAME(const u8* W, i64 row_bytes, const int* ids, const float* wts, const u8* aq,       \
                           const float* bias, const float* res, float* out, int N, int K, int k, int E) {    \
        moe_down_q8_impl<F>(W, row_bytes, ids, wts, aq, bias, res, out, N, K, k, E);                         \
    }

// ---- the grouped prefill GEMM -------------------------------------------------------------------------
// Y[r, n] = sum_k W[e, n, k] X[r, k] for every pair row r of every expert e: X [P, K] fp16 and Y [P, N]
// float32 hold the pairs in sorted order (moe_sort: expert e's at rows offsets[e] .. offsets[e + 1] - 1).
// A block computes one tile: MOE_GEMM_BN rows of expert e's W (grid y) times up to MOE_GEMM_BM of e's pairs.
// Tiles are numbered expert by expert (e's ceil(count_e / BM) after those of the experts before it), found
// from `offsets` on the device, so the grid, (ceil(P / BM) + min(E, P) - 1: at least the tiles there can
// be, ceil(N / BN)), depends on P only: no count goes to the host and a prefill chunk can be a CUDA
// graph. Blocks past the last tile return at once.
// W is decoded as it is read (F::item, then fp16 into shared memory), never written out: the expert
// stack is read once per tile of pairs (where dequantizing every expert to an fp16 scratch for cuBLAS
// wrote and read ~38 GB per 512-token chunk of gpt-oss-20b). A k-step is two 32-weight items: thread t
// decodes item 2 s + t / BN of row n0 + t % BN (the next step's while the tensor cores work on this
// one) and copies two 16-byte pieces of the pairs' matching activations with cp.async (item i's
// elements x0 .. x0 + 15 and x1 .. x1 + 15 of its block: the item's layout, which depends on the item
// index only). Two shared buffers (dynamic shared memory, MOE_GEMM_SMEM_BYTES), one barrier a step.
// Products on the tensor cores (mma.m16n8k16, fp16 operands as the cuBLAS path's, fp32 sums): 8 warps,
// each 32 rows x 32 pairs; a warp skips the 8-pair columns past the tile's last pair. K a multiple of
// 32 (an odd item count: the last step's second item is zeros); any N.
#define MG_BK 64                // weights per k-step (two items)
#define MG_LD (MG_BK + 8)       // halves per shared row: rows 144 bytes apart, an ldmatrix's 8 rows in distinct banks
static_assert(MOE_GEMM_BN == 128 && MOE_GEMM_BM == 64, "moe_gemm's tiling: 8 warps of 32 rows x 32 pairs, "
                                                       "a thread per (row, item) and two 16-byte copies per thread");
static_assert(MOE_GEMM_SMEM_BYTES == 2 * (MOE_GEMM_BN + MOE_GEMM_BM) * MG_LD * 2,
              "the launcher's dynamic shared memory: two buffers of BN weight rows and BM pair rows, MG_LD halves each");

template <class F>
__device__ __forceinline__ void moe_gemm_impl(const u8* __restrict__ W, i64 row_bytes, const int* __restrict__ offsets,
                                              int E, const half_bits* __restrict__ X, float* __restrict__ Y, int N,
                                              int K) {
    constexpr int BN = MOE_GEMM_BN, BM = MOE_GEMM_BM;
    static_assert(F::IPB <= 8, "items per block");
    extern __shared__ __align__(16) half_bits mg_smem[];
    half_bits* const As = mg_smem;                    // [2][BN * MG_LD]
    half_bits* const Bs = mg_smem + 2 * BN * MG_LD;   // [2][BM * MG_LD]
    __shared__ int tile_at[3];            // the tile's expert (< 0: none), first pair row, end of the expert's rows
    __shared__ int item_x[2 * F::IPB];    // item i's element offsets x0, x1 inside its block
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    if (warp == 0) {  // which expert's tile this block is: a scan of the experts' tile counts, 32 at a time
        const int tile = blockIdx.x;
        int base = 0, e_hit = -1, r0 = 0, r1 = 0;
        for (int c0 = 0; c0 < E; c0 += 32) {
            const int e = c0 + lane;
            const int o0 = e < E ? offsets[e] : 0, o1 = e < E ? offsets[e + 1] : 0;
            const int nt = (o1 - o0 + BM - 1) / BM;
            int inc = nt;
#pragma unroll
            for (int d = 1; d < 32; d <<= 1) {
                const int v = __shfl_up_sync(0xffffffffu, inc, d);
                if (lane >= d) inc += v;
            }
            const int lo = base + inc - nt;
            const unsigned hit = __ballot_sync(0xffffffffu, tile >= lo && tile < base + inc);
            if (hit) {
                const int src = __ffs(hit) - 1;
                e_hit = c0 + src;
                r0 = __shfl_sync(0xffffffffu, o0 + (tile - lo) * BM, src);
                r1 = __shfl_sync(0xffffffffu, o1, src);
                break;
            }
            base += __shfl_sync(0xffffffffu, inc, 31);
        }
        if (lane == 0) {
            tile_at[0] = e_hit;
            tile_at[1] = r0;
            tile_at[2] = r1;
        }
    } else if (tid - 32 < F::IPB) {  // the items' layout, from row 0's first block
        float v[32];
        int x0, x1;
        F::item(W, tid - 32, v, x0, x1);
        item_x[2 * (tid - 32)] = x0;
        item_x[2 * (tid - 32) + 1] = x1;
    }
    __syncthreads();
    const int e = tile_at[0];
    if (e < 0) return;
    const int r0 = tile_at[1], nr = min(tile_at[2] - r0, BM), n0 = blockIdx.y * BN;
    const int n_items = K >> 5, S = (n_items + 1) >> 1;
    const int row = tid % BN, half = tid / BN;  // this thread decodes item 2 s + half of row n0 + row
    const u8* wrow = W + ((i64)e * N + min(n0 + row, N - 1)) * row_bytes;  // (rows past N: not stored)
    float v[32];
    auto decode = [&](int s) {
        const int it = 2 * s + half;
        if (it < n_items) {
            const int b = it / F::IPB;
            int x0, x1;
            F::item(wrow + (i64)b * F::TS, it - b * F::IPB, v, x0, x1);
        } else {
#pragma unroll
            for (int j = 0; j < 32; ++j) v[j] = 0.0f;
        }
    };
    auto store_a = [&](int buf) {
        uint4* d = (uint4*)(As + buf * BN * MG_LD + row * MG_LD + 32 * half);
#pragma unroll
        for (int j = 0; j < 4; ++j)
            d[j] = make_uint4(pack_h2_rn(v[8 * j], v[8 * j + 1]), pack_h2_rn(v[8 * j + 2], v[8 * j + 3]),
                              pack_h2_rn(v[8 * j + 4], v[8 * j + 5]), pack_h2_rn(v[8 * j + 6], v[8 * j + 7]));
    };
    auto copy_b = [&](int s, int buf) {  // piece c: pair row c / 8, 8 halves at column 8 (c % 8)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int c = tid + j * 2 * BN, pr = c >> 3, q = c & 7, it = 2 * s + (q >> 2);
            half_bits* dst = Bs + buf * BM * MG_LD + pr * MG_LD + 8 * q;
            if (it < n_items) {
                const int b = it / F::IPB, i = it - b * F::IPB;
                const int col = b * F::QK + item_x[2 * i + ((q >> 1) & 1)] + 8 * (q & 1);
                cp_async16(dst, X + (i64)(r0 + min(pr, nr - 1)) * K + col);
            } else {
                *(uint4*)dst = make_uint4(0u, 0u, 0u, 0u);
            }
        }
    };
    decode(0);
    copy_b(0, 0);
    store_a(0);
    cp_async_wait_all();
    __syncthreads();
    float acc[2][4][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[mi][ni][j] = 0.0f;
    const int wn = warp & 3, wm = warp >> 2;      // the warp's 32 rows and 32 pairs
    const int n8 = min(4, (nr - 32 * wm + 7) >> 3);  // its 8-pair columns that hold pairs (<= 0: none)
    for (int s = 0; s < S; ++s) {
        const int cur = s & 1;
        const bool more = s + 1 < S;
        if (more) {
            decode(s + 1);
            copy_b(s + 1, cur ^ 1);
            if (s + 2 < S) prefetch_l2(wrow + (i64)((2 * (s + 2) + half) / F::IPB) * F::TS);
        }
        if (n8 > 0) {
            const half_bits* a_s = As + cur * BN * MG_LD;
            const half_bits* b_s = Bs + cur * BM * MG_LD;
#pragma unroll
            for (int kk = 0; kk < MG_BK; kk += 16) {
                u32 a[2][4], b[2][4];
#pragma unroll
                for (int mi = 0; mi < 2; ++mi)
                    ldmatrix_x4(a[mi], a_s + (32 * wn + 16 * mi + (lane & 15)) * MG_LD + kk + 8 * (lane >> 4));
#pragma unroll
                for (int nj = 0; nj < 2; ++nj)
                    if (2 * nj < n8)
                        ldmatrix_x4(b[nj], b_s + (32 * wm + 16 * nj + (lane & 7) + 8 * (lane >> 4)) * MG_LD + kk +
                                               8 * ((lane >> 3) & 1));
#pragma unroll
                for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                    for (int ni = 0; ni < 4; ++ni)
                        if (ni < n8)
                            mma_f16_16x8x16(acc[mi][ni], a[mi], b[ni >> 1][2 * (ni & 1)], b[ni >> 1][2 * (ni & 1) + 1]);
            }
        }
        if (more) {
            store_a(cur ^ 1);
            cp_async_wait_all();
        }
        __syncthreads();
    }
    const int g = lane >> 2, c = lane & 3;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
        const int n = n0 + 32 * wn + 16 * mi + g;
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
            const int p = 32 * wm + 8 * ni + 2 * c;
#pragma unroll
            for (int h = 0; h < 2; ++h) {  // pairs p, p + 1
                if (p + h < nr) {
                    float* y = Y + (i64)(r0 + p + h) * N;
                    if (n < N) y[n] = acc[mi][ni][h];
                    if (n + 8 < N) y[n + 8] = acc[mi][ni][2 + h];
                }
            }
        }
    }
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
                        const float* bias, const float* res, float* out, int N, int K, int k, int E) {       \
        moe_down_impl<F>(W, row_bytes, ids, wts, a, bias, res, out, N, K, k, E);                             \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(2 * MOE_GEMM_BN, 2)                                        \
        moe_gemm_##NAME(const u8* W, i64 row_bytes, const int* offsets, int E, const half_bits* X, float* Y, \
                        int N, int K) {                                                                      \
        moe_gemm_impl<F>(W, row_bytes, offsets, E, X, Y, N, K);                                              \
    }
