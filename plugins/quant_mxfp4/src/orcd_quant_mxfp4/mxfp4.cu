// orcd-quant-mxfp4: CUDA kernels for MXFP4 (OCP microscaling FP4, gpt-oss's expert weights).
//
// Block (llama.cpp's block_mxfp4, 17 bytes, 32 weights): e (E8M0 scale) | qs[16] (E2M1 codes).
// Weight j < 16 is the low nibble of qs[j], weight 16 + j its high nibble;
// value = E2M1_DOUBLED[code] * 2^(e - 128) (the table holds doubled values, so they are integers).
//
// One block is one 32-weight item; the GEMV, dequantize-to-fp16 and row gather come from the core's
// templates (quant_kernels.cuh: gemv_MXFP4, dequant_f16_MXFP4, get_rows_MXFP4), the expert-indexed
// GEMVs of the mixture of experts from moe_kernels.cuh (moe_gemv_MXFP4, moe_gemv_swiglu_MXFP4,
// moe_down_MXFP4).
#include "moe_kernels.cuh"

// ---- loading a 17-byte block ---------------------------------------------------------------------
// Blocks are only byte aligned (17-byte stride). The five aligned 32-bit words from (blk & ~3) always
// cover the block's 17 bytes and never reach past the word holding its last byte, so no load leaves
// the allocation. qs word j (qs bytes 4j..4j+3) starts one byte after the block: a funnel shift of
// two neighbouring words by 8 * (1 + blk % 4) bits, clamped so a shift of 32 takes the upper word.
__device__ __forceinline__ u32 mxfp4_load(const u8* blk, u32 q[4]) {
    const unsigned long long a = (unsigned long long)blk;
    const u32* base = (const u32*)(a & ~3ull);
    const u32 s = (u32)(a & 3ull);
    u32 r[5];
#pragma unroll
    for (int j = 0; j < 5; ++j) r[j] = __ldg(base + j);
    const u32 sh = 8u * (s + 1u);
#pragma unroll
    for (int j = 0; j < 4; ++j) q[j] = __funnelshift_rc(r[j], r[j + 1], sh);
    return (r[0] >> (8u * s)) & 0xFFu;  // e
}

// Half of the E8M0 scale, 2^(e - 128), exactly as ggml_e8m0_to_fp32_half: the normal float with
// biased exponent e - 1 for e >= 2, the subnormals 2^-128 (0x00200000) and 2^-127 (0x00400000) below.
__device__ __forceinline__ float e8m0_half(u32 e) {
    return __uint_as_float(e < 2u ? (0x00200000u << e) : ((e - 1u) << 23));
}

// Two E2M1 codes (bits 0-3 and 16-19 of p; other bits ignored) -> two fp16 bit patterns whose
// values are the codes' E2M1 values times 2^-14: sign bit 3 -> fp16 bit 15; exponent/mantissa bits
// 0-2 -> fp16 bits 9-11 (the top of the exponent field stays 0, so E2M1's exponent bias 1 becomes
// fp16's bias 15 and its subnormal (exponent 0: 0.5 * m) fp16's subnormal m * 2^-15).
// So h2f(.) * 2^15 is the doubled integer of E2M1_DOUBLED, exactly.
__device__ __forceinline__ u32 e2m1x2_to_h2(u32 p) { return ((p << 12) & 0x80008000u) | ((p << 9) & 0x0E000E00u); }

// v[0..16) = low nibbles of qs[0..16), v[16..32) = high nibbles, each its E2M1 value * 2^-14 * s
// (so s = 2^15 gives the doubled integers).
__device__ __forceinline__ void e2m1_decode(const u32 q[4], float s, float v[32]) {
#pragma unroll
    for (int w = 0; w < 4; ++w) {
        // bytes 4w+0..3 of qs -> pairs (byte 4w, byte 4w+1) and (4w+2, 4w+3) at bits 0-7 / 16-23
        const u32 p01 = __byte_perm(q[w], 0u, 0x4140u), p23 = __byte_perm(q[w], 0u, 0x4342u);
        const u32 c[4] = {e2m1x2_to_h2(p01), e2m1x2_to_h2(p23),              // low nibbles: weights 4w..
                          e2m1x2_to_h2(p01 >> 4), e2m1x2_to_h2(p23 >> 4)};  // high nibbles: 16 + 4w..
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            v[16 * h + 4 * w + 0] = h2f_lo(c[2 * h]) * s;
            v[16 * h + 4 * w + 1] = h2f_hi(c[2 * h]) * s;
            v[16 * h + 4 * w + 2] = h2f_lo(c[2 * h + 1]) * s;
            v[16 * h + 4 * w + 3] = h2f_hi(c[2 * h + 1]) * s;
        }
    }
}

struct FmtMXFP4 {
    static constexpr int QK = 32, TS = 17, IPB = 1;
    __device__ static __forceinline__ void item(const u8* blk, int, float v[32], int& x0, int& x1) {
        u32 q[4];
        const u32 e = mxfp4_load(blk, q);
        const float d = e8m0_half(e);
        if (e < 241u) {
            // doubled * 2^(e-128) = (E2M1 value * 2^14) * 2^(e-113) in one multiply while 2^(e-113) is
            // finite: the fp16 value is a multiple of 2^-15 with a 2-bit significand, so the product is
            // exact (also where it is subnormal), bit-identical to the reference.
            // 2^(e-113) built as a normal float (biased exponent e + 14): d itself is subnormal for
            // e < 2, and the H100 flushed it to zero as a multiply operand
            e2m1_decode(q, __uint_as_float((e + 14u) << 23), v);
        } else {  // 2^(e-113) would overflow: the doubled integer times half the scale, as the reference
            e2m1_decode(q, 32768.0f, v);
#pragma unroll
            for (int k = 0; k < 32; ++k) v[k] *= d;
        }
        x0 = 0; x1 = 16;
    }
    // The int8-activation GEMVs' part (the whole block): each code to its doubled E2M1 value as an int8
    // by PRMT from the 8-byte table of magnitudes {0, 1, 2, 3, 4, 6, 8, 12}, its sign by PRMT's sign mode:
    // a selector nibble's bit 3 (the code's sign) makes PRMT write the selected byte's sign, 0 for these
    // positive bytes. So a PRMT with the codes as selectors gives the positive weights (negatives 0),
    // with the sign bits flipped the negatives' magnitudes (positives 0): two dp4a sums, subtracted. A
    // qs word's low half selects elements 4w, 16 + 4w, 4w + 1, 17 + 4w (low and high nibbles of bytes 4w,
    // 4w + 1), its high half 4w + 2, 18 + 4w, 4w + 3, 19 + 4w: the x bytes are permuted to match.
    // sum w x = 2^(e - 128) d_x (sum+ - sum-).
    static constexpr int Q8_PARTS = 1;
    __device__ static __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
        u32 r;
        asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
        return r;
    }
    template <int NT, int NR>
    __device__ static __forceinline__ void dot_q8(const u8* const* blk, int, int e0, const Q8Row* x, int nt, float* out) {
        constexpr u32 M0 = 0x03020100u, M1 = 0x0C080604u;  // doubled E2M1 magnitudes of codes 0..7
        if constexpr (NT == 1 && NR == 1) {  // one row: each code decoded beside its products (measured faster
            // alone: gpt-oss tg128 465 against 444 tok/s decoded first, H100); the same integer sums, so the
            // same value as a row of a batch
            u32 q[4];
            const u32 e = mxfp4_load(blk[0], q);
            const int4 xa = x[0].chunk(e0 >> 4), xb = x[0].chunk((e0 >> 4) + 1);
            const u32 xl[4] = {(u32)xa.x, (u32)xa.y, (u32)xa.z, (u32)xa.w}, xh[4] = {(u32)xb.x, (u32)xb.y, (u32)xb.z, (u32)xb.w};
            int sp = 0, sn = 0;
#pragma unroll
            for (int w = 0; w < 4; ++w) {
                const u32 s0 = q[w], s1 = q[w] >> 16;
                const int x0 = (int)prmt(xl[w], xh[w], 0x5140u), x1 = (int)prmt(xl[w], xh[w], 0x7362u);
                sp = dp4a((int)prmt(M0, M1, s0), x0, sp);
                sp = dp4a((int)prmt(M0, M1, s1), x1, sp);
                sn = dp4a((int)prmt(M0, M1, s0 ^ 0x8888u), x0, sn);
                sn = dp4a((int)prmt(M0, M1, s1 ^ 0x8888u), x1, sn);
            }
            out[0] = (float)(sp - sn) * x[0].meta(e0 >> 5).x * e8m0_half(e);
        } else {
            int wp[NR][8], wn[NR][8];  // word w's halves (2w, 2w + 1): the positive weights, the negatives' magnitudes
            float sc[NR];
#pragma unroll
            for (int r = 0; r < NR; ++r) {
                u32 q[4];
                const u32 e = mxfp4_load(blk[r], q);
#pragma unroll
                for (int w = 0; w < 4; ++w) {
                    const u32 s0 = q[w], s1 = q[w] >> 16;
                    wp[r][2 * w] = (int)prmt(M0, M1, s0);
                    wp[r][2 * w + 1] = (int)prmt(M0, M1, s1);
                    wn[r][2 * w] = (int)prmt(M0, M1, s0 ^ 0x8888u);
                    wn[r][2 * w + 1] = (int)prmt(M0, M1, s1 ^ 0x8888u);
                }
                sc[r] = e8m0_half(e);
            }
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                if (t >= nt) {
#pragma unroll
                    for (int r = 0; r < NR; ++r) out[r * NT + t] = 0.0f;
                    continue;
                }
                const int4 xa = x[t].chunk(e0 >> 4), xb = x[t].chunk((e0 >> 4) + 1);  // elements 0..15, 16..31
                const u32 xl[4] = {(u32)xa.x, (u32)xa.y, (u32)xa.z, (u32)xa.w}, xh[4] = {(u32)xb.x, (u32)xb.y, (u32)xb.z, (u32)xb.w};
                const float dx = x[t].meta(e0 >> 5).x;
                int x0[4], x1[4];
#pragma unroll
                for (int w = 0; w < 4; ++w) {
                    x0[w] = (int)prmt(xl[w], xh[w], 0x5140u);
                    x1[w] = (int)prmt(xl[w], xh[w], 0x7362u);
                }
#pragma unroll
                for (int r = 0; r < NR; ++r) {
                    int sp = 0, sn = 0;
#pragma unroll
                    for (int w = 0; w < 4; ++w) {
                        sp = dp4a(wp[r][2 * w], x0[w], sp);
                        sp = dp4a(wp[r][2 * w + 1], x1[w], sp);
                        sn = dp4a(wn[r][2 * w], x0[w], sn);
                        sn = dp4a(wn[r][2 * w + 1], x1[w], sn);
                    }
                    out[r * NT + t] = (float)(sp - sn) * dx * sc[r];
                }
            }
        }
    }
};

// The expert GEMVs' item dot, streamed: each qs word's 8 weights are decoded and multiplied into the
// sum at once (no 32-float array live), the block's scale applied to the sum. Scaling by a power of two
// is exact, so this equals the sum of the dequantized products except where they under/overflow.
template <>
struct ItemDot<FmtMXFP4> {
    template <int MAXT>
    __device__ static __forceinline__ void dot(const u8* blk, int, const float4* __restrict__ xv, int xst, int eb,
                                               int T, float out[MAXT]) {
        u32 q[4];
        const u32 e = mxfp4_load(blk, q);
        float s[MAXT];
#pragma unroll
        for (int t = 0; t < MAXT; ++t) s[t] = 0.0f;
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            const u32 p01 = __byte_perm(q[w], 0u, 0x4140u), p23 = __byte_perm(q[w], 0u, 0x4342u);
            const u32 lo0 = e2m1x2_to_h2(p01), lo1 = e2m1x2_to_h2(p23);            // weights 4w..4w+3
            const u32 hi0 = e2m1x2_to_h2(p01 >> 4), hi1 = e2m1x2_to_h2(p23 >> 4);  // weights 16+4w..
            const float l0 = h2f_lo(lo0), l1 = h2f_hi(lo0), l2 = h2f_lo(lo1), l3 = h2f_hi(lo1);
            const float g0 = h2f_lo(hi0), g1 = h2f_hi(hi0), g2 = h2f_lo(hi1), g3 = h2f_hi(hi1);
            const float4* __restrict__ pa = xv + xs_f4(eb + 4 * w);  // token 0's slots; token t's xst further
            const float4* __restrict__ pb = xv + xs_f4(eb + 16 + 4 * w);
#pragma unroll
            for (int t = 0; t < MAXT; ++t) {
                if (t < T) {
                    const float4 a = pa[t * xst], b = pb[t * xst];
                    s[t] = fmaf(l3, a.w, fmaf(l2, a.z, fmaf(l1, a.y, fmaf(l0, a.x, s[t]))));
                    s[t] = fmaf(g3, b.w, fmaf(g2, b.z, fmaf(g1, b.y, fmaf(g0, b.x, s[t]))));
                }
            }
        }
        // values are code * 2^-14 * 2^(e - 113) (see FmtMXFP4::item)
#pragma unroll
        for (int t = 0; t < MAXT; ++t)
            out[t] = e < 241u ? s[t] * __uint_as_float((e + 14u) << 23) : s[t] * 32768.0f * e8m0_half(e);
    }
};

ORCD_QUANT_KERNELS(MXFP4, FmtMXFP4)
ORCD_QUANT_KERNELS_Q8(MXFP4, FmtMXFP4)
ORCD_MOE_KERNELS(MXFP4, FmtMXFP4)
ORCD_MOE_KERNELS_Q8(MXFP4, FmtMXFP4)
