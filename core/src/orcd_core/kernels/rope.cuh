// orcd-worker core kernels: RoPE, and RoPE fused with the KV-cache write (part of core.cu, which includes every op family).
#pragma once
#include "common.cuh"
#include "kv.cuh"

// ================================================================================================
// RoPE (ggml_rope_ext semantics). x: [T, H, hd] with token stride x_stride (elements), y contiguous;
// one thread per pair of a head.
// neox: pairs (i, i + n_rot/2); normal: pairs (2i, 2i + 1). Dims >= n_rot pass through.
// theta = pos * base^(-2i/n_rot) / freq_factor[i], then YaRN mixing (ext_factor != 0) as rope_yarn.
// ================================================================================================
__device__ __forceinline__ float yarn_ramp(float low, float high, int i0) {
    const float y = ((float)(i0 / 2) - low) / fmaxf(0.001f, high - low);
    return 1.0f - fminf(1.0f, fmaxf(0.0f, y));
}

// The rotated pair (x0, x1) of pair index p (0 <= p < n_rot/2) at position pos.
__device__ __forceinline__ float2 rope_pair(float x0, float x1, int pos, int p, const float* __restrict__ freq_factors,
                                            float theta_scale, float freq_scale, float ext_factor, float attn_factor,
                                            float corr0, float corr1) {
    float theta_extrap = (float)pos * powf(theta_scale, (float)p);
    if (freq_factors) theta_extrap /= freq_factors[p];
    const float theta_interp = freq_scale * theta_extrap;
    float theta = theta_interp, mscale = attn_factor;
    if (ext_factor != 0.0f) {
        const float mix = yarn_ramp(corr0, corr1, 2 * p) * ext_factor;
        theta = theta_interp * (1.0f - mix) + theta_extrap * mix;
        mscale *= 1.0f + 0.1f * logf(1.0f / freq_scale);
    }
    const float c = cosf(theta) * mscale, s = sinf(theta) * mscale;
    return make_float2(x0 * c - x1 * s, x0 * s + x1 * c);
}

// Pair p of a head: its element indices a, b and its value, xr's pair rotated (p < n_rot/2) or the
// pass-through dims n_rot + 2(p - n_rot/2) + {0, 1} as they are.
struct RopedPair {
    int a, b;
    float2 o;
};
__device__ __forceinline__ RopedPair rope_head_pair_value(const float* __restrict__ xr, int p, int pos, int n_rot, int neox,
                                                          const float* __restrict__ freq_factors, float theta_scale,
                                                          float freq_scale, float ext_factor, float attn_factor,
                                                          float corr0, float corr1) {
    const int half_rot = n_rot >> 1;
    RopedPair r;
    if (p >= half_rot) {
        r.a = n_rot + 2 * (p - half_rot);
        r.b = r.a + 1;
        r.o = make_float2(xr[r.a], xr[r.b]);
    } else {
        r.a = neox ? p : 2 * p;
        r.b = neox ? p + half_rot : 2 * p + 1;
        r.o = rope_pair(xr[r.a], xr[r.b], pos, p, freq_factors, theta_scale, freq_scale, ext_factor, attn_factor, corr0,
                        corr1);
    }
    return r;
}

// Pair p of a head of hd dims rotated from xr into yr (rope_head_pair_value). OUT is float or half_bits.
template <class OUT>
__device__ __forceinline__ void rope_head_pair(const float* __restrict__ xr, OUT* __restrict__ yr, int p, int pos,
                                               int n_rot, int neox, const float* __restrict__ freq_factors,
                                               float theta_scale, float freq_scale, float ext_factor, float attn_factor,
                                               float corr0, float corr1) {
    const RopedPair r = rope_head_pair_value(xr, p, pos, n_rot, neox, freq_factors, theta_scale, freq_scale, ext_factor,
                                             attn_factor, corr0, corr1);
    if constexpr (sizeof(OUT) == 4) {
        yr[r.a] = r.o.x;
        yr[r.b] = r.o.y;
    } else {
        yr[r.a] = f2h(r.o.x);
        yr[r.b] = f2h(r.o.y);
    }
}

extern "C" __global__ void rope_f32(const float* __restrict__ x, i64 x_stride, float* __restrict__ y,
                                    const int* __restrict__ positions,
                                    const float* __restrict__ freq_factors, int T, int H, int hd, int n_rot, int neox,
                                    float theta_scale, float freq_scale, float ext_factor, float attn_factor,
                                    float corr0, float corr1) {
    const i64 g = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const int half_hd = hd >> 1;
    if (g >= (i64)T * H * half_hd) return;
    const int p = (int)(g % half_hd);
    const i64 row = g / half_hd;  // t * H + h
    const int t = (int)(row / H);
    const float* xr = x + (i64)t * x_stride + (row - (i64)t * H) * hd;  // x rows may be a column slice
    rope_head_pair(xr, y + row * hd, p, positions[t], n_rot, neox, freq_factors, theta_scale, freq_scale, ext_factor,
                   attn_factor, corr0, corr1);
}

// RoPE of q and k and the KV-cache write in one launch (the rope_f32 x2 + kv_write of an attention
// step, fused): q [T, Hq, hd] (token stride qs) -> q_out contiguous; k roped and v copied into the fp16
// cache rows positions[t] % n_rows (of token t's cache, kv_of). One thread per pair of dims of a q, k or v head.
// Launched by PDL (the launch overlaps the GEMVs' end; pdl_wait before any read).
extern "C" __global__ void rope_kv_write(const float* __restrict__ q, i64 qs, const float* __restrict__ k, i64 ks,
                                         const float* __restrict__ v, i64 vs, float* __restrict__ q_out,
                                         half_bits* kc, half_bits* vc, const unsigned long long* __restrict__ kvp, int kvs,
                                         const int* __restrict__ positions, const float* __restrict__ freq_factors,
                                         int T, int Hq, int Hkv, int hd, int n_rows, int n_rot, int neox,
                                         float theta_scale, float freq_scale, float ext_factor, float attn_factor,
                                         float corr0, float corr1) {
    pdl_trigger();  // (the attention behind it may take SMs now; it waits for this kernel's writes)
    pdl_wait();     // (launched early, by PDL: q, k and v come from the GEMVs ahead)
    const i64 g = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const int half_hd = hd >> 1, H = Hq + 2 * Hkv;
    if (g >= (i64)T * H * half_hd) return;
    const int p = (int)(g % half_hd);
    const i64 row = g / half_hd;  // t * H + head, heads q | k | v
    const int t = (int)(row / H), h = (int)(row - (i64)t * H);
    const int pos = positions[t];
    const i64 slot = (i64)(pos % n_rows) * Hkv * hd;
    if (h < Hq) {
        rope_head_pair(q + (i64)t * qs + (i64)h * hd, q_out + ((i64)t * Hq + h) * hd, p, pos, n_rot, neox,
                       freq_factors, theta_scale, freq_scale, ext_factor, attn_factor, corr0, corr1);
    } else if (h < Hq + Hkv) {
        const int hk = h - Hq;
        rope_head_pair(k + (i64)t * ks + (i64)hk * hd, kv_of(kc, kvp, kvs, t, 0) + slot + (i64)hk * hd, p, pos, n_rot,
                       neox, freq_factors, theta_scale, freq_scale, ext_factor, attn_factor, corr0, corr1);
    } else {
        const int hv = h - Hq - Hkv;
        const float* vr = v + (i64)t * vs + (i64)hv * hd;
        half_bits* o = kv_of(vc, kvp, kvs, t, 1) + slot + (i64)hv * hd;
        o[2 * p] = f2h(vr[2 * p]);
        o[2 * p + 1] = f2h(vr[2 * p + 1]);
    }
}
