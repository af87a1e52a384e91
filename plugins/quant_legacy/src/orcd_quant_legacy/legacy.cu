// orcd-quant-legacy: CUDA kernels for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (32 weights per block).
//
// One block is one 32-weight item; the GEMV, dequantize-to-fp16 and row gather are the core's templates
// (quant_kernels.cuh): gemv_Q4_0, dequant_f16_Q4_0, get_rows_Q4_0, ... Layouts as in llama.cpp's
// ggml-common.h. In the 4/5-bit types byte j holds weight j (low nibble) and weight j + 16 (high nibble).
#include "quant_kernels.cuh"

// The int8-activation GEMVs' codes of a 32-weight block of 4-bit codes as dp4a takes them: lo[c] weights
// 4c .. 4c + 3 (q[c]'s low nibbles), hi[c] weights 16 + 4c .. (its high nibbles); FIVE merges the fifth
// bits of qh into bit 4 of each byte.
template <bool FIVE>
__device__ __forceinline__ void codes_q4x8(const u32 q[4], u32 qh, u32 lo[4], u32 hi[4]) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
        lo[c] = (q[c] & 0x0F0F0F0Fu) | (FIVE ? bits4_to_bytes_bit4(qh >> (4 * c)) : 0u);
        hi[c] = ((q[c] >> 4) & 0x0F0F0F0Fu) | (FIVE ? bits4_to_bytes_bit4(qh >> (16 + 4 * c)) : 0u);
    }
}

// sum q x_q over a 32-weight block of codes in that order (lo: elements 0..15, hi: 16..31; a[c], b[c]
// each four bytes): 8 dp4a against the block's two x chunks xa, xb
__device__ __forceinline__ int dot_codes8(const u32 a[4], const u32 b[4], const int4& xa, const int4& xb) {
    const int wa[4] = {xa.x, xa.y, xa.z, xa.w}, wb[4] = {xb.x, xb.y, xb.z, xb.w};
    int s = 0;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
        s = dp4a((int)a[c], wa[c], s);
        s = dp4a((int)b[c], wb[c], s);
    }
    return s;
}

// The int8-activation dots of NR rows' 32-weight blocks of codes with NT token rows (out[r NT + t]), each
// token's two x chunks and its group's meta read once for the NR rows. code(r, sum, meta) is row r's value
// from sum q x_q and the group's meta: the same expression for any NR and NT.
template <int NT, int NR, class Code>
__device__ __forceinline__ void dot_q8_rows(const u32 (*lo)[4], const u32 (*hi)[4], int e0, const Q8Row* x, int nt,
                                            float* out, Code code) {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
        if (t >= nt) {
#pragma unroll
            for (int r = 0; r < NR; ++r) out[r * NT + t] = 0.0f;
            continue;
        }
        const float4 gm = x[t].meta(e0 >> 5);
        const int4 xa = x[t].chunk(e0 >> 4), xb = x[t].chunk((e0 >> 4) + 1);
#pragma unroll
        for (int r = 0; r < NR; ++r) out[r * NT + t] = code(r, dot_codes8(lo[r], hi[r], xa, xb), gm);
    }
}

// w = d (q - off) (Q4_0, Q5_0): sum w x = d (d_x sum(q x_q) - off s)
template <int NT, int NR>
__device__ __forceinline__ void dot_q8_off(const u32 (*lo)[4], const u32 (*hi)[4], const float* d, float off, int e0,
                                           const Q8Row* x, int nt, float* out) {
    dot_q8_rows<NT, NR>(lo, hi, e0, x, nt, out,
                        [&](int r, int s, const float4& gm) { return d[r] * fmaf(gm.x, (float)s, -off * gm.w); });
}

// w = d q + m, d and m the fp16 halves of dm[r] (Q4_1, Q5_1): sum w x = d d_x sum(q x_q) + m s
template <int NT, int NR>
__device__ __forceinline__ void dot_q8_dm(const u32 (*lo)[4], const u32 (*hi)[4], const u32* dm, int e0, const Q8Row* x,
                                          int nt, float* out) {
    dot_q8_rows<NT, NR>(lo, hi, e0, x, nt, out, [&](int r, int s, const float4& gm) {
        const float d = h2f_lo(dm[r]), m = h2f_hi(dm[r]);
        return fmaf(m, gm.w, d * (gm.x * (float)s));  // (fused explicitly: main's rounding, in every kernel)
    });
}

// ---- Q4_0: d (fp16) | qs[16]; 18 bytes; w = d * (q - 8) -------------------------------------------
struct FmtQ4_0 {
    static constexpr int QK = 32, TS = 18, IPB = 1;
    __device__ static __forceinline__ void item(const u8* blk, int, float v[32], int& x0, int& x1) {
        u32 q[4];
        ld16_a2(blk + 2, q);
        const float d = h2f(ld2(blk));
#pragma unroll
        for (int k = 0; k < 16; ++k) {
            const u32 b = byte_of(q, k);
            v[k] = d * small_u2f(b & 0xF, ORCD_MAGIC + 8.0f);
            v[16 + k] = d * small_u2f(b >> 4, ORCD_MAGIC + 8.0f);
        }
        x0 = 0; x1 = 16;
    }
    // The int8-activation GEMV's part (the whole block): w = d (q - 8), so sum w x = d (d_x sum(q x_q) - 8 s).
    static constexpr int Q8_PARTS = 1;
    template <int NT, int NR>
    __device__ static __forceinline__ void dot_q8(const u8* const* blk, int, int e0, const Q8Row* x, int nt, float* out) {
        u32 lo[NR][4], hi[NR][4];
        float d[NR];
#pragma unroll
        for (int r = 0; r < NR; ++r) {
            u32 q[4];
            ld16_a2(blk[r] + 2, q);
            codes_q4x8<false>(q, 0u, lo[r], hi[r]);
            d[r] = h2f(ld2(blk[r]));
        }
        dot_q8_off<NT, NR>(lo, hi, d, 8.0f, e0, x, nt, out);
    }
};

// ---- Q4_1: d, m (fp16) | qs[16]; 20 bytes; w = d * q + m ----------------------------------------------
struct FmtQ4_1 {
    static constexpr int QK = 32, TS = 20, IPB = 1;
    __device__ static __forceinline__ void item(const u8* blk, int, float v[32], int& x0, int& x1) {
        u32 q[4];
        ld16_a4(blk + 4, q);
        const u32 dm = ld4(blk);
        const float d = h2f_lo(dm), m = h2f_hi(dm);
#pragma unroll
        for (int k = 0; k < 16; ++k) {
            const u32 b = byte_of(q, k);
            v[k] = d * small_u2f(b & 0xF, ORCD_MAGIC) + m;
            v[16 + k] = d * small_u2f(b >> 4, ORCD_MAGIC) + m;
        }
        x0 = 0; x1 = 16;
    }
    // The int8-activation GEMV's part (the whole block): w = d q + m, so sum w x = d d_x sum(q x_q) + m s.
    static constexpr int Q8_PARTS = 1;
    template <int NT, int NR>
    __device__ static __forceinline__ void dot_q8(const u8* const* blk, int, int e0, const Q8Row* x, int nt, float* out) {
        u32 lo[NR][4], hi[NR][4], dm[NR];
#pragma unroll
        for (int r = 0; r < NR; ++r) {
            u32 q[4];
            ld16_a4(blk[r] + 4, q);
            codes_q4x8<false>(q, 0u, lo[r], hi[r]);
            dm[r] = ld4(blk[r]);
        }
        dot_q8_dm<NT, NR>(lo, hi, dm, e0, x, nt, out);
    }
};

// ---- Q5_0: d | qh (u32, bit j = fifth bit of weight j) | qs[16]; 22 bytes; w = d * (q - 16) -----------
// Four weights of a word at a time: their nibbles and fifth bits merged into four bytes, then each byte
// to d * (q - 16) by q_f7 and one FFMA (exact: common.cuh).
struct FmtQ5_0 {
    static constexpr int QK = 32, TS = 22, IPB = 1;
    __device__ static __forceinline__ void item(const u8* blk, int, float v[32], int& x0, int& x1) {
        u32 q[4];
        ld16_a2(blk + 6, q);
        const float d = h2f(ld2(blk));
        const u32 qh = (u32)ld2(blk + 2) | ((u32)ld2(blk + 4) << 16);
        const float s = 64.0f * d, o = -144.0f * d;  // (128 + 16) d
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const u32 lo = (q[c] & 0x0F0F0F0Fu) | bits4_to_bytes_bit4(qh >> (4 * c));         // weights 4c ..
            const u32 hi = ((q[c] >> 4) & 0x0F0F0F0Fu) | bits4_to_bytes_bit4(qh >> (16 + 4 * c));  // 16 + 4c ..
            v[4 * c + 0] = fmaf(q_f7<0>(lo), s, o); v[4 * c + 1] = fmaf(q_f7<1>(lo), s, o);
            v[4 * c + 2] = fmaf(q_f7<2>(lo), s, o); v[4 * c + 3] = fmaf(q_f7<3>(lo), s, o);
            v[16 + 4 * c + 0] = fmaf(q_f7<0>(hi), s, o); v[16 + 4 * c + 1] = fmaf(q_f7<1>(hi), s, o);
            v[16 + 4 * c + 2] = fmaf(q_f7<2>(hi), s, o); v[16 + 4 * c + 3] = fmaf(q_f7<3>(hi), s, o);
        }
        x0 = 0; x1 = 16;
    }
    // The int8-activation GEMV's part (the whole block): the 5-bit codes merged into bytes as item() does,
    // 8 dp4a; w = d (q - 16), so sum w x = d (d_x sum(q x_q) - 16 s).
    static constexpr int Q8_PARTS = 1;
    template <int NT, int NR>
    __device__ static __forceinline__ void dot_q8(const u8* const* blk, int, int e0, const Q8Row* x, int nt, float* out) {
        u32 lo[NR][4], hi[NR][4];
        float d[NR];
#pragma unroll
        for (int r = 0; r < NR; ++r) {
            u32 q[4];
            ld16_a2(blk[r] + 6, q);
            codes_q4x8<true>(q, (u32)ld2(blk[r] + 2) | ((u32)ld2(blk[r] + 4) << 16), lo[r], hi[r]);
            d[r] = h2f(ld2(blk[r]));
        }
        dot_q8_off<NT, NR>(lo, hi, d, 16.0f, e0, x, nt, out);
    }
};

// ---- Q5_1: d, m | qh (u32) | qs[16]; 24 bytes; w = d * q + m --------------------------------------------
struct FmtQ5_1 {
    static constexpr int QK = 32, TS = 24, IPB = 1;
    __device__ static __forceinline__ void item(const u8* blk, int, float v[32], int& x0, int& x1) {
        u32 q[4];
        ld16_a4(blk + 8, q);
        const u32 dm = ld4(blk), qh = ld4(blk + 4);
        const float d = h2f_lo(dm), m = h2f_hi(dm);
#pragma unroll
        for (int k = 0; k < 16; ++k) {
            const u32 b = byte_of(q, k);
            v[k] = d * small_u2f((b & 0xF) | (((qh >> k) & 1) << 4), ORCD_MAGIC) + m;
            v[16 + k] = d * small_u2f((b >> 4) | (((qh >> (k + 16)) & 1) << 4), ORCD_MAGIC) + m;
        }
        x0 = 0; x1 = 16;
    }
    // The int8-activation GEMV's part (the whole block): w = d q + m (5-bit q), as Q4_1's.
    static constexpr int Q8_PARTS = 1;
    template <int NT, int NR>
    __device__ static __forceinline__ void dot_q8(const u8* const* blk, int, int e0, const Q8Row* x, int nt, float* out) {
        u32 lo[NR][4], hi[NR][4], dm[NR];
#pragma unroll
        for (int r = 0; r < NR; ++r) {
            u32 q[4];
            ld16_a4(blk[r] + 8, q);
            codes_q4x8<true>(q, ld4(blk[r] + 4), lo[r], hi[r]);
            dm[r] = ld4(blk[r]);
        }
        dot_q8_dm<NT, NR>(lo, hi, dm, e0, x, nt, out);
    }
};

// ---- Q8_0: d | qs[32] (int8); 34 bytes; w = d * q ---------------------------------------------------------
// Four weights of a word at a time: q + 128 = byte ^ 0x80, then d * q by q_f8 and one FFMA (exact).
struct FmtQ8_0 {
    static constexpr int QK = 32, TS = 34, IPB = 1;
    __device__ static __forceinline__ void item(const u8* blk, int, float v[32], int& x0, int& x1) {
        u32 a[4], b[4];
        ld16_a2(blk + 2, a);
        ld16_a2(blk + 18, b);
        const float d = h2f(ld2(blk));
        const float s = 16384.0f * d, o = -32896.0f * d;  // 2^14 d, (2^15 + 128) d
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const u32 wa = a[c] ^ 0x80808080u, wb = b[c] ^ 0x80808080u;
            v[4 * c + 0] = fmaf(q_f8<0>(wa), s, o); v[4 * c + 1] = fmaf(q_f8<1>(wa), s, o);
            v[4 * c + 2] = fmaf(q_f8<2>(wa), s, o); v[4 * c + 3] = fmaf(q_f8<3>(wa), s, o);
            v[16 + 4 * c + 0] = fmaf(q_f8<0>(wb), s, o); v[16 + 4 * c + 1] = fmaf(q_f8<1>(wb), s, o);
            v[16 + 4 * c + 2] = fmaf(q_f8<2>(wb), s, o); v[16 + 4 * c + 3] = fmaf(q_f8<3>(wb), s, o);
        }
        x0 = 0; x1 = 16;
    }
    // The int8-activation GEMV's part (the whole block): 8 dp4a of the int8 codes; sum w x = d d_x sum(q x_q).
    static constexpr int Q8_PARTS = 1;
    template <int NT, int NR>
    __device__ static __forceinline__ void dot_q8(const u8* const* blk, int, int e0, const Q8Row* x, int nt, float* out) {
        u32 a[NR][4], b[NR][4];
        float d[NR];
#pragma unroll
        for (int r = 0; r < NR; ++r) {
            ld16_a2(blk[r] + 2, a[r]);
            ld16_a2(blk[r] + 18, b[r]);
            d[r] = h2f(ld2(blk[r]));
        }
        dot_q8_rows<NT, NR>(a, b, e0, x, nt, out, [&](int r, int s, const float4& gm) { return d[r] * (gm.x * (float)s); });
    }
};

// The decode GEMVs' item dot for Q5_0, streamed: weight k (low nibble) and 16 + k (high nibble) go
// straight into the sum with their x, d applied to the sum. Four weights of a word at a time, as
// FmtQ5_0::item merges them: each byte to q - 16 by q_f7 and one FFMA (64 (2 + q / 64) - 144, exact), the
// values bit for bit those of a per-weight bit extraction (about 3 instructions a weight fewer).
template <>
struct ItemDot<FmtQ5_0> {
    template <int MAXT>
    __device__ static __forceinline__ void dot(const u8* blk, int, const float4* __restrict__ xv, int xst, int eb,
                                               int T, float out[MAXT]) {
        u32 q[4];
        ld16_a2(blk + 6, q);
        const float d = h2f(ld2(blk));
        const u32 qh = (u32)ld2(blk + 2) | ((u32)ld2(blk + 4) << 16);
        float s[MAXT];
#pragma unroll
        for (int t = 0; t < MAXT; ++t) s[t] = 0.0f;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const u32 lo = (q[c] & 0x0F0F0F0Fu) | bits4_to_bytes_bit4(qh >> (4 * c));         // weights 4c ..
            const u32 hi = ((q[c] >> 4) & 0x0F0F0F0Fu) | bits4_to_bytes_bit4(qh >> (16 + 4 * c));  // 16 + 4c ..
            // elements 4c..4c+3 and 16+4c..: decoded once for every token
            const float wa[4] = {fmaf(q_f7<0>(lo), 64.0f, -144.0f), fmaf(q_f7<1>(lo), 64.0f, -144.0f),
                                 fmaf(q_f7<2>(lo), 64.0f, -144.0f), fmaf(q_f7<3>(lo), 64.0f, -144.0f)};
            const float wb[4] = {fmaf(q_f7<0>(hi), 64.0f, -144.0f), fmaf(q_f7<1>(hi), 64.0f, -144.0f),
                                 fmaf(q_f7<2>(hi), 64.0f, -144.0f), fmaf(q_f7<3>(hi), 64.0f, -144.0f)};
            const float4* __restrict__ pa = xv + xs_f4(eb + 4 * c);  // token 0's slots; token t's xst further
            const float4* __restrict__ pb = xv + xs_f4(eb + 16 + 4 * c);
#pragma unroll
            for (int t = 0; t < MAXT; ++t) {
                if (t < T) {
                    const float4 a = pa[t * xst], b = pb[t * xst];
                    const float xa[4] = {a.x, a.y, a.z, a.w}, xb[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
                    for (int u = 0; u < 4; ++u) s[t] = fmaf(wb[u], xb[u], fmaf(wa[u], xa[u], s[t]));  // (one FFMA a weight)
                }
            }
        }
#pragma unroll
        for (int t = 0; t < MAXT; ++t) out[t] = d * s[t];
    }
};

// The one-token GEMV's item dot for Q8_0, streamed: each word's four int8 go straight into the sum
// (no 32-float array live), d applied to the sum.
template <>
struct ItemDot<FmtQ8_0> {
    template <int MAXT>
    __device__ static __forceinline__ void dot(const u8* blk, int, const float4* __restrict__ xv, int xst, int eb,
                                               int T, float out[MAXT]) {
        u32 w[8];
        ld16_a2(blk + 2, w);
        ld16_a2(blk + 18, w + 4);
        const float d = h2f(ld2(blk));
        float s[MAXT];
#pragma unroll
        for (int t = 0; t < MAXT; ++t) s[t] = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const u32 q = w[j] ^ 0x80808080u;  // int8 = (byte ^ 0x80) - 128: by q_f8 and one FFMA (exact)
            const float w0 = fmaf(q_f8<0>(q), 16384.0f, -32896.0f), w1 = fmaf(q_f8<1>(q), 16384.0f, -32896.0f),
                        w2 = fmaf(q_f8<2>(q), 16384.0f, -32896.0f), w3 = fmaf(q_f8<3>(q), 16384.0f, -32896.0f);
            const float4* __restrict__ pa = xv + xs_f4(eb + 4 * j);  // token 0's slot; token t's xst further
#pragma unroll
            for (int t = 0; t < MAXT; ++t) {
                if (t < T) {
                    const float4 a = pa[t * xst];
                    s[t] = fmaf(w3, a.w, fmaf(w2, a.z, fmaf(w1, a.y, fmaf(w0, a.x, s[t]))));
                }
            }
        }
#pragma unroll
        for (int t = 0; t < MAXT; ++t) out[t] = d * s[t];
    }
};

ORCD_QUANT_KERNELS(Q4_0, FmtQ4_0)
ORCD_QUANT_KERNELS(Q4_1, FmtQ4_1)
ORCD_QUANT_KERNELS(Q5_0, FmtQ5_0)
ORCD_QUANT_KERNELS(Q5_1, FmtQ5_1)
ORCD_QUANT_KERNELS(Q8_0, FmtQ8_0)
ORCD_QUANT_KERNELS_Q8(Q4_0, FmtQ4_0)
ORCD_QUANT_KERNELS_Q8(Q4_1, FmtQ4_1)
ORCD_QUANT_KERNELS_Q8(Q5_0, FmtQ5_0)
ORCD_QUANT_KERNELS_Q8(Q5_1, FmtQ5_1)
ORCD_QUANT_KERNELS_Q8(Q8_0, FmtQ8_0)
