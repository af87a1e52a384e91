// orcd-quant-q4k: CUDA kernels for the k-quants Q4_K, Q5_K and Q6_K (QK_K = 256 weights per block).
//
// Each format only says how to dequantize one 32-weight item in registers; the GEMV, the
// dequantize-to-fp16 and the row gather are the core's templates (quant_kernels.cuh), so the kernel
// names are uniform: gemv_Q4_K, dequant_f16_Q4_K, get_rows_Q4_K, ... Block layouts as in llama.cpp's
// ggml-common.h; the arithmetic follows dequantize_row_q*_K in float32.
#include "quant_kernels.cuh"

// Scale and min j (0..7) of a Q4_K/Q5_K block from its 12 packed bytes (get_scale_min_k4):
// j < 4: low 6 bits of bytes j and j+4; j >= 4: low/high nibble of byte j+4 with the top two bits
// of byte j-4 (scale) or byte j (min) above it.
__device__ __forceinline__ void scale_min_k4(const u32 s[3], int j, float& sc, float& mn) {
    const int b = j < 4 ? j : j + 4;  // byte holding the low bits
    const u32 sw = b < 4 ? s[0] : b < 8 ? s[1] : s[2];  // (selected, not indexed: no local-memory copy of s)
    const u32 lo = (sw >> (8 * (b & 3))) & 0xFF;
    if (j < 4) {
        const u32 mb = (s[1] >> (8 * j)) & 0xFF;  // byte j + 4
        sc = (float)(lo & 63);
        mn = (float)(mb & 63);
    } else {
        const u32 hs = (s[0] >> (8 * (j - 4))) & 0xFF;  // byte j - 4
        const u32 hm = (s[1] >> (8 * (j - 4))) & 0xFF;  // byte j
        sc = (float)((lo & 0xF) | ((hs >> 6) << 4));
        mn = (float)((lo >> 4) | ((hm >> 6) << 4));
    }
}

// ---- Q4_K: d, dmin (fp16) | scales[12] | qs[128]; 144 bytes ------------------------------------------
// Item i = (j = i / 2, h = i % 2) covers qs[32j + 16h, +16): low nibbles are weights 64j + 16h + 0..15
// (sub-block 2j), high nibbles weights 64j + 32 + 16h + 0..15 (sub-block 2j + 1).
struct FmtQ4_K {
    static constexpr int QK = 256, TS = 144, IPB = 8;
    __device__ static __forceinline__ void item(const u8* blk, int i, float v[32], int& x0, int& x1) {
        const int j = i >> 1, h = i & 1;
        const u32 dm = ld4(blk);
        const u32 s[3] = {ld4(blk + 4), ld4(blk + 8), ld4(blk + 12)};
        u32 q[4];
        ld16_a16(blk + 16 + 32 * j + 16 * h, q);
        const float d = h2f_lo(dm), dmin = h2f_hi(dm);
        float sc1, m1, sc2, m2;
        scale_min_k4(s, 2 * j, sc1, m1);
        scale_min_k4(s, 2 * j + 1, sc2, m2);
        const float d1 = d * sc1, mm1 = dmin * m1, d2 = d * sc2, mm2 = dmin * m2;
        // d1 * q exactly by q_f7 and one FFMA (common.cuh), four weights of a word at a time; then - mm1
        const float s1 = 64.0f * d1, o1 = -128.0f * d1, s2 = 64.0f * d2, o2 = -128.0f * d2;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const u32 lo = q[c] & 0x0F0F0F0Fu, hi = (q[c] >> 4) & 0x0F0F0F0Fu;
            v[4 * c + 0] = fmaf(q_f7<0>(lo), s1, o1) - mm1; v[4 * c + 1] = fmaf(q_f7<1>(lo), s1, o1) - mm1;
            v[4 * c + 2] = fmaf(q_f7<2>(lo), s1, o1) - mm1; v[4 * c + 3] = fmaf(q_f7<3>(lo), s1, o1) - mm1;
            v[16 + 4 * c + 0] = fmaf(q_f7<0>(hi), s2, o2) - mm2; v[16 + 4 * c + 1] = fmaf(q_f7<1>(hi), s2, o2) - mm2;
            v[16 + 4 * c + 2] = fmaf(q_f7<2>(hi), s2, o2) - mm2; v[16 + 4 * c + 3] = fmaf(q_f7<3>(hi), s2, o2) - mm2;
        }
        x0 = 64 * j + 16 * h;
        x1 = x0 + 32;
    }
    // The int8-activation GEMV's part j (0..3): sub-blocks 2j and 2j + 1 (k4_dot_q8, below).
    static constexpr int Q8_PARTS = 4;
    template <int NT, int NR>
    __device__ static __forceinline__ void dot_q8(const u8* const* blk, int j, int e0, const Q8Row* x, int nt, float* out);
};

// ---- Q5_K: d, dmin | scales[12] | qh[32] | qs[128]; 176 bytes -----------------------------------------
// As Q4_K, plus a fifth bit per weight: qh[l] bit 2j (low-nibble weight) and bit 2j+1 (high-nibble weight)
// for position l = 16h + k of the 32-wide group.
struct FmtQ5_K {
    static constexpr int QK = 256, TS = 176, IPB = 8;
    __device__ static __forceinline__ void item(const u8* blk, int i, float v[32], int& x0, int& x1) {
        const int j = i >> 1, h = i & 1;
        const u32 dm = ld4(blk);
        const u32 s[3] = {ld4(blk + 4), ld4(blk + 8), ld4(blk + 12)};
        u32 hb[4], q[4];
        ld16_a16(blk + 16 + 16 * h, hb);
        ld16_a16(blk + 48 + 32 * j + 16 * h, q);
        const float d = h2f_lo(dm), dmin = h2f_hi(dm);
        float sc1, m1, sc2, m2;
        scale_min_k4(s, 2 * j, sc1, m1);
        scale_min_k4(s, 2 * j + 1, sc2, m2);
        const float d1 = d * sc1, mm1 = dmin * m1, d2 = d * sc2, mm2 = dmin * m2;
        const float s1 = 64.0f * d1, o1 = -128.0f * d1, s2 = 64.0f * d2, o2 = -128.0f * d2;  // as Q4_K
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const u32 lo = (q[c] & 0x0F0F0F0Fu) | (((hb[c] >> (2 * j)) & 0x01010101u) << 4);
            const u32 hi = ((q[c] >> 4) & 0x0F0F0F0Fu) | (((hb[c] >> (2 * j + 1)) & 0x01010101u) << 4);
            v[4 * c + 0] = fmaf(q_f7<0>(lo), s1, o1) - mm1; v[4 * c + 1] = fmaf(q_f7<1>(lo), s1, o1) - mm1;
            v[4 * c + 2] = fmaf(q_f7<2>(lo), s1, o1) - mm1; v[4 * c + 3] = fmaf(q_f7<3>(lo), s1, o1) - mm1;
            v[16 + 4 * c + 0] = fmaf(q_f7<0>(hi), s2, o2) - mm2; v[16 + 4 * c + 1] = fmaf(q_f7<1>(hi), s2, o2) - mm2;
            v[16 + 4 * c + 2] = fmaf(q_f7<2>(hi), s2, o2) - mm2; v[16 + 4 * c + 3] = fmaf(q_f7<3>(hi), s2, o2) - mm2;
        }
        x0 = 64 * j + 16 * h;
        x1 = x0 + 32;
    }
    // The int8-activation GEMV's part j (0..3), as Q4_K's with the fifth bits (k4_dot_q8, below).
    static constexpr int Q8_PARTS = 4;
    template <int NT, int NR>
    __device__ static __forceinline__ void dot_q8(const u8* const* blk, int j, int e0, const Q8Row* x, int nt, float* out);
};

// The int8-activation GEMVs' part j (0..3) of a Q4_K (FIVE false) or Q5_K (FIVE true) block: sub-blocks 2j
// and 2j + 1, whose 64 weights are the low and high nibbles of qs[32j, 32j + 32) (Q5_K: with qh[l] bit 2j,
// resp. 2j + 1, moved to bit 4 of each byte), against the int8 x (q8.cuh): 16 dp4a, one scale decode; per
// sub-block w = d sc q - dmin m, so sum w x = d sc d_x sum(q x_q) - dmin m s (s the group's sum).
template <bool FIVE, int NT, int NR>
__device__ __forceinline__ void k4_dot_q8(const u8* const* blk, int j, int e0, const Q8Row* x, int nt, float* out) {
    const int k = (e0 + 64 * j) >> 4, g = (e0 + 64 * j) >> 5;  // x chunk and group of sub-block 2j
    const u32 m4 = 0x0F0F0F0Fu, m1b = 0x01010101u;
    const int sl = 2 * j, sh = 2 * j + 1;
    int la[NR][8], hb8[NR][8];  // row r's codes of sub-blocks 2j (low nibbles) and 2j + 1 (high)
    float sc1[NR], m1[NR], sc2[NR], m2[NR], d[NR], dmin[NR];
#pragma unroll
    for (int r = 0; r < NR; ++r) {
        const uint4 h = ld16(blk[r]);  // d, dmin | scales[12]
        const u8* qs = blk[r] + (FIVE ? 48 : 16) + 32 * j;
        const uint4 qa = ld16(qs), qb = ld16(qs + 16);  // positions 0..15, 16..31
        const uint4 ha = FIVE ? ld16(blk[r] + 16) : make_uint4(0u, 0u, 0u, 0u), hb = FIVE ? ld16(blk[r] + 32) : ha;  // their qh
        auto lo = [&](u32 q, u32 hh) { return (int)((q & m4) | (FIVE ? ((hh >> sl) & m1b) << 4 : 0u)); };
        auto hi = [&](u32 q, u32 hh) { return (int)(((q >> 4) & m4) | (FIVE ? ((hh >> sh) & m1b) << 4 : 0u)); };
        const u32 qv[8] = {qa.x, qa.y, qa.z, qa.w, qb.x, qb.y, qb.z, qb.w};
        const u32 hv[8] = {ha.x, ha.y, ha.z, ha.w, hb.x, hb.y, hb.z, hb.w};
#pragma unroll
        for (int c = 0; c < 8; ++c) {
            la[r][c] = lo(qv[c], hv[c]);
            hb8[r][c] = hi(qv[c], hv[c]);
        }
        const u32 sv[3] = {h.y, h.z, h.w};
        scale_min_k4(sv, 2 * j, sc1[r], m1[r]);
        scale_min_k4(sv, 2 * j + 1, sc2[r], m2[r]);
        d[r] = h2f_lo(h.x);
        dmin[r] = h2f_hi(h.x);
    }
#pragma unroll
    for (int t = 0; t < NT; ++t) {
        if (t >= nt) {
#pragma unroll
            for (int r = 0; r < NR; ++r) out[r * NT + t] = 0.0f;
            continue;
        }
        const int4 xa0 = x[t].chunk(k), xa1 = x[t].chunk(k + 1), xb0 = x[t].chunk(k + 2), xb1 = x[t].chunk(k + 3);
        const float4 ga = x[t].meta(g), gb = x[t].meta(g + 1);
#pragma unroll
        for (int r = 0; r < NR; ++r) {
            int sa = 0, sb = 0;
            sa = dp4a(la[r][0], xa0.x, sa); sa = dp4a(la[r][1], xa0.y, sa); sa = dp4a(la[r][2], xa0.z, sa); sa = dp4a(la[r][3], xa0.w, sa);
            sa = dp4a(la[r][4], xa1.x, sa); sa = dp4a(la[r][5], xa1.y, sa); sa = dp4a(la[r][6], xa1.z, sa); sa = dp4a(la[r][7], xa1.w, sa);
            sb = dp4a(hb8[r][0], xb0.x, sb); sb = dp4a(hb8[r][1], xb0.y, sb); sb = dp4a(hb8[r][2], xb0.z, sb); sb = dp4a(hb8[r][3], xb0.w, sb);
            sb = dp4a(hb8[r][4], xb1.x, sb); sb = dp4a(hb8[r][5], xb1.y, sb); sb = dp4a(hb8[r][6], xb1.z, sb); sb = dp4a(hb8[r][7], xb1.w, sb);
            // (fused explicitly: the contraction nvcc/ptxas chose on main, now fixed in every kernel)
            out[r * NT + t] = fmaf(d[r], fmaf(sc1[r] * ga.x, (float)sa, sc2[r] * gb.x * (float)sb),
                                   -(dmin[r] * fmaf(m1[r], ga.w, m2[r] * gb.w)));
        }
    }
}
template <int NT, int NR>
__device__ __forceinline__ void FmtQ4_K::dot_q8(const u8* const* blk, int j, int e0, const Q8Row* x, int nt, float* out) {
    k4_dot_q8<false, NT, NR>(blk, j, e0, x, nt, out);
}
template <int NT, int NR>
__device__ __forceinline__ void FmtQ5_K::dot_q8(const u8* const* blk, int j, int e0, const Q8Row* x, int nt, float* out) {
    k4_dot_q8<true, NT, NR>(blk, j, e0, x, nt, out);
}

// ---- Q6_K: ql[128] | qh[64] | scales[16] (int8) | d (fp16); 210 bytes (blocks only 2-byte aligned) --
// Per half n (128 weights): ql[64n + l] and ql[64n + 32 + l] give the low nibbles, qh[32n + l] two high
// bits for each of the four weights l, l+32, l+64, l+96 (bits 0-1, 2-3, 4-5, 6-7); scale index 8n + l/16
// + {0, 2, 4, 6}. Item i = (n = i / 4, part = (i / 2) % 2, lh = i % 2), l = 16 lh + 0..15:
// part 0 -> weights 128n + l (low nibble of ql[64n + l]) and 128n + 64 + l (its high nibble);
// part 1 -> weights 128n + 32 + l and 128n + 96 + l from ql[64n + 32 + l].
struct FmtQ6_K {
    static constexpr int QK = 256, TS = 210, IPB = 8;
    __device__ static __forceinline__ void item(const u8* blk, int i, float v[32], int& x0, int& x1) {
        const int n = i >> 2, part = (i >> 1) & 1, lh = i & 1;
        u32 ql[4], qh[4];
        ld16_a2(blk + 64 * n + 32 * part + 16 * lh, ql);
        ld16_a2(blk + 128 + 32 * n + 16 * lh, qh);
        const float d = h2f(ld2(blk + 208));
        const signed char* sc = (const signed char*)(blk + 192);
        const float d0 = d * (float)sc[8 * n + lh + 2 * part];
        const float d1 = d * (float)sc[8 * n + lh + 4 + 2 * part];
        const int sh0 = 2 * part, sh1 = 4 + 2 * part;
        // d0 * (q - 32) by q_f7 and one FFMA (one rounding, as the product of d0 and the integer q - 32)
        const float s0 = 64.0f * d0, o0 = -160.0f * d0, s1 = 64.0f * d1, o1 = -160.0f * d1;  // (128 + 32) d
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const u32 lo = (ql[c] & 0x0F0F0F0Fu) | (((qh[c] >> sh0) & 0x03030303u) << 4);
            const u32 hi = ((ql[c] >> 4) & 0x0F0F0F0Fu) | (((qh[c] >> sh1) & 0x03030303u) << 4);
            v[4 * c + 0] = fmaf(q_f7<0>(lo), s0, o0); v[4 * c + 1] = fmaf(q_f7<1>(lo), s0, o0);
            v[4 * c + 2] = fmaf(q_f7<2>(lo), s0, o0); v[4 * c + 3] = fmaf(q_f7<3>(lo), s0, o0);
            v[16 + 4 * c + 0] = fmaf(q_f7<0>(hi), s1, o1); v[16 + 4 * c + 1] = fmaf(q_f7<1>(hi), s1, o1);
            v[16 + 4 * c + 2] = fmaf(q_f7<2>(hi), s1, o1); v[16 + 4 * c + 3] = fmaf(q_f7<3>(hi), s1, o1);
        }
        x0 = 128 * n + 32 * part + 16 * lh;
        x1 = x0 + 64;
    }
    // The int8-activation GEMV's part p (0..3) = (n = p / 2, lh = p % 2): positions l = 16 lh + 0..15 of half
    // n, whose four runs r of 16 weights are elements 128n + 32r + l: low nibbles of ql[64n + l] (r = 0)
    // and ql[64n + 32 + l] (r = 1), high nibbles of the same (r = 2, 3), qh[32n + l] bits 2r, 2r + 1 above
    // them; scale sc[8n + lh + 2r]. w = d sc (q - 32) with q the unsigned 6-bit code, so a run's sum of w x
    // is d sc (d_x sum(q x_q) - 32 s_half) (s_half: the sum of the group's half that the run is).
    static constexpr int Q8_PARTS = 4;
    template <int NT, int NR>
    __device__ static __forceinline__ void dot_q8(const u8* const* blk, int p, int e0, const Q8Row* x, int nt, float* out) {
        const int n = p >> 1, lh = p & 1;
        const int k = (e0 + 128 * n + 16 * lh) >> 4, g = (e0 + 128 * n) >> 5;  // run r: chunk k + 2r, group g + r
        u32 q[NR][4][4];  // row i's run r codes, four bytes a word
        float scr[NR][4], d[NR];
#pragma unroll
        for (int i = 0; i < NR; ++i) {
            u32 qa[4], qb[4], qh[4];
            ld16_a2(blk[i] + 64 * n + 16 * lh, qa);
            ld16_a2(blk[i] + 64 * n + 32 + 16 * lh, qb);
            ld16_a2(blk[i] + 128 + 32 * n + 16 * lh, qh);
            const signed char* sc = (const signed char*)(blk[i] + 192 + 8 * n + lh);  // run r's scale: sc[2r]
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                scr[i][r] = (float)__ldg(sc + 2 * r);
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const u32 ql = (r & 1) ? qb[c] : qa[c];
                    q[i][r][c] = (r < 2 ? (ql & 0x0F0F0F0Fu) : ((ql >> 4) & 0x0F0F0F0Fu)) | (((qh[c] >> (2 * r)) & 0x03030303u) << 4);
                }
            }
            d[i] = h2f(ld2(blk[i] + 208));
        }
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            if (t >= nt) {
#pragma unroll
                for (int i = 0; i < NR; ++i) out[i * NT + t] = 0.0f;
                continue;
            }
            int4 xv[4];
            float4 gm[4];
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                xv[r] = x[t].chunk(k + 2 * r);
                gm[r] = x[t].meta(g + r);
            }
#pragma unroll
            for (int i = 0; i < NR; ++i) {
                float acc = 0.0f;
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    const int xw[4] = {xv[r].x, xv[r].y, xv[r].z, xv[r].w};
                    int s = 0;
#pragma unroll
                    for (int c = 0; c < 4; ++c) s = dp4a((int)q[i][r][c], xw[c], s);
                    acc = fmaf(scr[i][r], fmaf(gm[r].x, (float)s, -32.0f * (lh ? gm[r].z : gm[r].y)), acc);
                }
                out[i * NT + t] = d[i] * acc;
            }
        }
    }
};

// The decode GEMVs' item dot for Q4_K, streamed: per half (sub-blocks 2j and 2j+1) each nibble q as
// the float 2 + q / 64 (q_f7: one PRMT for a weight, common.cuh), the sums of (2 + q / 64) x and of x per
// token, then the item's value with the weights' affine form folded in: w = d1 q - m1 = s1 (2 + q / 64) + o1
// for s1 = 64 d1, o1 = -(128 d1 + m1), so sum w x = s1 sum (2 + q / 64) x + o1 sum x (no 32-float array
// live; about 3 instructions a weight where the decode then the dot takes about 5).
template <>
struct ItemDot<FmtQ4_K> {
    template <int MAXT>
    __device__ static __forceinline__ void dot(const u8* blk, int i, const float4* __restrict__ xv, int xst, int eb,
                                               int T, float out[MAXT]) {
        const int j = i >> 1, h = i & 1;
        const u32 dm = ld4(blk);
        const u32 sv[3] = {ld4(blk + 4), ld4(blk + 8), ld4(blk + 12)};
        u32 q[4];
        ld16_a16(blk + 16 + 32 * j + 16 * h, q);
        const int x0 = eb + 64 * j + 16 * h;
        float s1[MAXT], s2[MAXT], t1[MAXT], t2[MAXT];  // per token: sum q_f7 x and sum x, low / high nibbles
#pragma unroll
        for (int t = 0; t < MAXT; ++t) s1[t] = s2[t] = t1[t] = t2[t] = 0.0f;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const u32 lo = q[c] & 0x0F0F0F0Fu, hi = (q[c] >> 4) & 0x0F0F0F0Fu;
            const float fl[4] = {q_f7<0>(lo), q_f7<1>(lo), q_f7<2>(lo), q_f7<3>(lo)};  // decoded once for every token
            const float fh[4] = {q_f7<0>(hi), q_f7<1>(hi), q_f7<2>(hi), q_f7<3>(hi)};
            const float4* __restrict__ pa = xv + xs_f4(x0 + 4 * c);  // token 0's slots; token t's xst further
            const float4* __restrict__ pb = xv + xs_f4(x0 + 32 + 4 * c);
#pragma unroll
            for (int t = 0; t < MAXT; ++t) {
                if (t < T) {
                    const float4 a = pa[t * xst], b = pb[t * xst];
                    const float xa[4] = {a.x, a.y, a.z, a.w}, xb[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
                    for (int u = 0; u < 4; ++u) {
                        s1[t] = fmaf(fl[u], xa[u], s1[t]);
                        s2[t] = fmaf(fh[u], xb[u], s2[t]);
                        t1[t] += xa[u];
                        t2[t] += xb[u];
                    }
                }
            }
        }
        float sc1, m1, sc2, m2;
        scale_min_k4(sv, 2 * j, sc1, m1);
        scale_min_k4(sv, 2 * j + 1, sc2, m2);
        const float d = h2f_lo(dm), dmin = h2f_hi(dm);
        const float d1 = d * sc1, d2 = d * sc2;
        const float a1 = 64.0f * d1, o1 = -(128.0f * d1 + dmin * m1), a2 = 64.0f * d2, o2 = -(128.0f * d2 + dmin * m2);
#pragma unroll
        for (int t = 0; t < MAXT; ++t) out[t] = fmaf(a1, s1[t], fmaf(o1, t1[t], fmaf(a2, s2[t], o2 * t2[t])));
    }
};

ORCD_QUANT_KERNELS(Q4_K, FmtQ4_K)
ORCD_QUANT_KERNELS(Q5_K, FmtQ5_K)
ORCD_QUANT_KERNELS(Q6_K, FmtQ6_K)
ORCD_QUANT_KERNELS_Q8(Q4_K, FmtQ4_K)
ORCD_QUANT_KERNELS_Q8(Q5_K, FmtQ5_K)
ORCD_QUANT_KERNELS_Q8(Q6_K, FmtQ6_K)
