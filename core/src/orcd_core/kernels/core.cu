// orcd-worker core kernels: normalization, RoPE, element-wise ops, KV-cache writes, attention, argmax,
// decode-step bookkeeping, sampling.
//
// Every kernel that runs during a decode step reads positions and lengths from device memory, so a
// whole step can be captured once as a CUDA graph and replayed. Activations are float32; the KV cache
// is fp16. Launch geometry is chosen by the Python launchers in backends/cuda/ (device.py; sampler.py
// for sampling, graph.py for advance_step) and validated by kernels.py's launch().
#include "common.cuh"

// ================================================================================================
// Normalization: one block per row.
// ================================================================================================
// y = x / sqrt(mean(x^2) + eps) * w        (ggml_rms_norm followed by the weight multiply)
extern "C" __global__ void rms_norm_f32(const float* __restrict__ x, const float* __restrict__ w,
                                        float* __restrict__ y, int D, float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (i64)blockIdx.x * D;
    float* yr = y + (i64)blockIdx.x * D;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, scratch);
    const float r = 1.0f / sqrtf(ss / (float)D + eps);
    for (int i = threadIdx.x; i < D; i += blockDim.x) yr[i] = xr[i] * r * w[i];
}

// rms_norm_f32 for decode rows (D % 4 == 0), launched with the GEMV's block size: the arithmetic of
// the GEMV's fused RMS staging (stage_x1), so a row's normalized values are the same whether a GEMV
// stages the norm itself (one token, short rows) or reads this kernel's output (more rows).
extern "C" __global__ void rms_norm_rows(const float* __restrict__ x, const float* __restrict__ w,
                                         float* __restrict__ y, int D, float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (i64)blockIdx.x * D;
    float* yr = y + (i64)blockIdx.x * D;
    const int n4 = D >> 2;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n4; i += blockDim.x) ss += sumsq4(*(const float4*)(xr + 4 * i));
    const float r = rms_scale(block_sum(ss, scratch), D, eps);
    for (int i = threadIdx.x; i < n4; i += blockDim.x)
        *(float4*)(yr + 4 * i) = rms_apply4(*(const float4*)(xr + 4 * i), r, *(const float4*)(w + 4 * i));
}

// y = (x - mean) / sqrt(var + eps) * w + b  (ggml_norm followed by weight and bias; either may be null)
extern "C" __global__ void layer_norm_f32(const float* __restrict__ x, const float* __restrict__ w,
                                          const float* __restrict__ b, float* __restrict__ y, int D, float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (i64)blockIdx.x * D;
    float* yr = y + (i64)blockIdx.x * D;
    float s = 0.0f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) s += xr[i];
    const float mean = block_sum(s, scratch) / (float)D;
    float v = 0.0f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        const float c = xr[i] - mean;
        v += c * c;
    }
    const float r = 1.0f / sqrtf(block_sum(v, scratch) / (float)D + eps);
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        float o = (xr[i] - mean) * r;
        if (w) o *= w[i];
        if (b) o += b[i];
        yr[i] = o;
    }
}

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

// Pair p of a head of hd dims: rotate xr's pair into yr (the element indices a, b of the pair), or
// copy the pass-through dims n_rot + 2(p - n_rot/2) + {0, 1}. OUT is float or half_bits.
template <class OUT>
__device__ __forceinline__ void rope_head_pair(const float* __restrict__ xr, OUT* __restrict__ yr, int p, int pos,
                                               int n_rot, int neox, const float* __restrict__ freq_factors,
                                               float theta_scale, float freq_scale, float ext_factor, float attn_factor,
                                               float corr0, float corr1) {
    const int half_rot = n_rot >> 1;
    int a, b;
    float2 o;
    if (p >= half_rot) {
        a = n_rot + 2 * (p - half_rot);
        b = a + 1;
        o = make_float2(xr[a], xr[b]);
    } else {
        a = neox ? p : 2 * p;
        b = neox ? p + half_rot : 2 * p + 1;
        o = rope_pair(xr[a], xr[b], pos, p, freq_factors, theta_scale, freq_scale, ext_factor, attn_factor, corr0, corr1);
    }
    if constexpr (sizeof(OUT) == 4) {
        yr[a] = o.x;
        yr[b] = o.y;
    } else {
        yr[a] = f2h(o.x);
        yr[b] = f2h(o.y);
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

// The cache of token t: kc / vc, or in a batched decode step (kvp non-null) the row's own, whose K and V
// addresses are kvp[t] and kvp[kvs + t] (the layer's slice of the decoder's table).
__device__ __forceinline__ half_bits* kv_of(half_bits* c, const unsigned long long* kvp, int kvs, int t, int which) {
    return kvp ? (half_bits*)kvp[which * kvs + t] : c;
}

// RoPE of q and k and the KV-cache write in one launch (the rope_f32 x2 + kv_write of an attention
// step, fused): q [T, Hq, hd] (token stride qs) -> q_out contiguous; k roped and v copied into the fp16
// cache rows positions[t] % n_rows (of token t's cache, kv_of). One thread per pair of dims of a q, k or v head.
extern "C" __global__ void rope_kv_write(const float* __restrict__ q, i64 qs, const float* __restrict__ k, i64 ks,
                                         const float* __restrict__ v, i64 vs, float* __restrict__ q_out,
                                         half_bits* kc, half_bits* vc, const unsigned long long* __restrict__ kvp, int kvs,
                                         const int* __restrict__ positions, const float* __restrict__ freq_factors,
                                         int T, int Hq, int Hkv, int hd, int n_rows, int n_rot, int neox,
                                         float theta_scale, float freq_scale, float ext_factor, float attn_factor,
                                         float corr0, float corr1) {
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

// ================================================================================================
// Element-wise
// ================================================================================================
// y = a + b, b broadcast with period nb (nb == n for a plain add, D for a bias over rows)
extern "C" __global__ void add_f32(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ y,
                                   i64 n, i64 nb) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a[i] + b[nb == n ? i : i % nb];
}

// y[r, c] = silu(g[r * gs + c]) * u[r * us + c]: gate and up may be column slices of one gate|up output
extern "C" __global__ void silu_mul_f32(const float* __restrict__ g, i64 gs, const float* __restrict__ u, i64 us,
                                        float* __restrict__ y, int rows, int cols) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (i64)rows * cols) {
        const i64 r = i / cols, c = i - r * cols;
        const float v = g[r * gs + c];
        y[i] = v / (1.0f + expf(-v)) * u[r * us + c];
    }
}

// tanh approximation, as ggml_gelu
extern "C" __global__ void gelu_f32(const float* __restrict__ x, float* __restrict__ y, i64 n) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        const float v = x[i];
        y[i] = 0.5f * v * (1.0f + tanhf(0.7978845608028654f * v * (1.0f + 0.044715f * v * v)));
    }
}

extern "C" __global__ void f32_to_f16(const float* __restrict__ x, half_bits* __restrict__ y, i64 n) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = f2h(x[i]);
}

// y[r, c] = x[r * row_stride + c]: a row-strided view (a column slice) made contiguous
extern "C" __global__ void copy_rows_f32(const float* __restrict__ x, float* __restrict__ y, int rows, int cols,
                                         i64 row_stride) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (i64)rows * cols) {
        const i64 r = i / cols, c = i - r * cols;
        y[i] = x[r * row_stride + c];
    }
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

// ================================================================================================
// Attention for prefill (and any step with T > 1): flash-style, O(T) memory.
// grid (ceil(T / 16), Hq), 128 threads: each warp owns 4 queries; key tiles of 32 keys staged in
// shared memory; online softmax per query. A query at position p sees keys kp <= p with
// kp > p - window (window > 0). `sinks` [Hq] (or null) adds exp(sink) to each denominator.
// Keys are read from the cache (the step's own k/v were written by kv_write first).
// ================================================================================================
#define AP_QT 16
#define AP_KT 32
// AP_MAXD (head dim at most): a -D option (kernels/constants.py)

extern "C" __global__ void __launch_bounds__(128)
    attn_prefill(const float* __restrict__ q, const half_bits* __restrict__ kc, const half_bits* __restrict__ vc,
                 const int* __restrict__ positions, const float* __restrict__ sinks, float* __restrict__ out, int T,
                 int Hq, int Hkv, int hd, int n_rows, float scale, int window) {
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
// Attention for decode tokens, one per sequence (a batched step: row b's cache is kv_of(.., b)), split
// over the sequence (flash-decoding). Grid (Hq, S, B), 128 threads; row b = blockIdx.z computes exactly
// what a lone token computes. The query at p = positions[b] sees keys [lo, p] (lo = p - window + 1 for
// a sliding window, else 0); split s covers keys [lo + s*chunk, lo + (s+1)*chunk) of them, and only the
// first S_eff = ceil((p + 1 - lo) / chunk) splits run (the others exit at once: S is sized for the
// longest span, the context or the window). A split writes its unnormalized output, max and
// denominator; the head's last split to finish combines the S_eff partials (and the sink) into out.
// chunk <= AD_CHUNK; hd a multiple of 8, <= 128.
// Scores: one thread per key (16-byte K loads). Values: a thread owns a pair of dims (4-byte loads)
// and one of G = 128 / (hd/2) key groups; its loop is unrolled so several V loads are in flight.
// ================================================================================================
// AD_CHUNK: a -D option (kernels/constants.py)

__device__ void attn_decode_combine_head(const float* part_o, const float* part_ml, const float* sinks, float* out,
                                         int hh, int sh, int S, int n, int hd);

extern "C" __global__ void __launch_bounds__(128)
    attn_decode_part(const float* __restrict__ q, half_bits* kc0, half_bits* vc0, const unsigned long long* __restrict__ kvp,
                     int kvs, const int* __restrict__ positions, float* __restrict__ part_o, float* __restrict__ part_ml,
                     int Hq, int Hkv, int hd, int n_rows, float scale, int window, int chunk,
                     unsigned int* __restrict__ counters, const float* __restrict__ sinks, float* __restrict__ out) {
    __shared__ float qsh[AP_MAXD];
    __shared__ float sc[AD_CHUNK];
    __shared__ float red[32];
    __shared__ float2 accs[128];
    const int b = blockIdx.z;
    const int h = blockIdx.x, s = blockIdx.y, S = gridDim.y, kvh = h / (Hq / Hkv);
    const int hh = b * Hq + h;  // (row, head): the partials', counters' and output's index
    const half_bits* __restrict__ kc = kv_of(kc0, kvp, kvs, b, 0);
    const half_bits* __restrict__ vc = kv_of(vc0, kvp, kvs, b, 1);
    const int p = positions[b];
    const int lo = window > 0 ? max(0, p - window + 1) : 0;
    const int S_eff = min(S, (p + 1 - lo + chunk - 1) / chunk);
    if (s >= S_eff) return;  // (block-uniform) beyond the visible keys: no partial, no count
    const int kb = lo + s * chunk, ke = min(lo + (s + 1) * chunk, p + 1);
    float* po = part_o + ((i64)hh * S + s) * hd;
    float* pml = part_ml + ((i64)hh * S + s) * 2;
    __shared__ bool last;
    {
        for (int d = threadIdx.x; d < hd; d += blockDim.x) qsh[d] = q[(i64)hh * hd + d] * scale;
        __syncthreads();
        const int n = ke - kb;
        const i64 row = (i64)Hkv * hd;  // elements per cache position
        float mx = -INFINITY;
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            const half_bits* kr = kc + (i64)((kb + j) % n_rows) * row + (i64)kvh * hd;
            float dot = 0.0f;
            for (int d = 0; d < hd; d += 8) {
                const uint4 w = ld16(kr + d);
                dot += qsh[d] * h2f_lo(w.x) + qsh[d + 1] * h2f_hi(w.x) + qsh[d + 2] * h2f_lo(w.y) + qsh[d + 3] * h2f_hi(w.y) +
                       qsh[d + 4] * h2f_lo(w.z) + qsh[d + 5] * h2f_hi(w.z) + qsh[d + 6] * h2f_lo(w.w) + qsh[d + 7] * h2f_hi(w.w);
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
        const int P = hd >> 1;          // threads per key group: one pair of dims each
        const int G = blockDim.x / P;   // key groups
        const int g = threadIdx.x / P, t = threadIdx.x - g * P;
        float2 a = make_float2(0.0f, 0.0f);
        if (g < G) {
            const half_bits* vb = vc + (i64)kvh * hd + 2 * t;
    #pragma unroll 4
            for (int j = g; j < n; j += G) {
                const u32 w = ld4(vb + (i64)((kb + j) % n_rows) * row);
                const float pj = sc[j];
                a.x += pj * h2f_lo(w);
                a.y += pj * h2f_hi(w);
            }
        }
        accs[threadIdx.x] = a;
        __syncthreads();
        if (threadIdx.x < P) {
            float2 o = make_float2(0.0f, 0.0f);
            for (int gg = 0; gg < G; ++gg) {
                o.x += accs[gg * P + threadIdx.x].x;
                o.y += accs[gg * P + threadIdx.x].y;
            }
            po[2 * threadIdx.x] = o.x;
            po[2 * threadIdx.x + 1] = o.y;
        }
        if (threadIdx.x == 0) { pml[0] = mx; pml[1] = sum; }
    }
    // The last split of this head to finish combines all S (no second launch); it resets the
    // head's counter to 0, so a replayed graph finds it zeroed.
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(&counters[hh], 1u) == (unsigned)(S_eff - 1);
    __syncthreads();
    if (last) {
        __threadfence();
        attn_decode_combine_head(part_o, part_ml, sinks, out, hh, h, S, S_eff, hd);
        if (threadIdx.x == 0) counters[hh] = 0u;
    }
}

// Reads go through L2 (__ldcg): the partials were written by other blocks of the same launch. The
// partials of (row, head) hh are the first n of its S slots; sh is the head's sink.
__device__ void attn_decode_combine_head(const float* part_o, const float* part_ml, const float* sinks, float* out,
                                         int hh, int sh, int S, int n, int hd) {
    const int h = hh;
    const float* ml = part_ml + (i64)h * S * 2;
    float M = sinks ? sinks[sh] : -INFINITY;
    for (int s = 0; s < n; ++s) M = fmaxf(M, __ldcg(ml + 2 * s));
    float L = sinks ? expf(sinks[sh] - M) : 0.0f;
    for (int s = 0; s < n; ++s) {
        const float m = __ldcg(ml + 2 * s);
        if (m > -INFINITY) L += __ldcg(ml + 2 * s + 1) * expf(m - M);
    }
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float o = 0.0f;
        for (int s = 0; s < n; ++s) {
            const float m = __ldcg(ml + 2 * s);
            if (m > -INFINITY) o += __ldcg(part_o + ((i64)h * S + s) * hd + d) * expf(m - M);
        }
        out[(i64)h * hd + d] = L > 0.0f ? o / L : 0.0f;
    }
}

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
// Decode-loop bookkeeping, run at the end of a captured step so the next replay needs no host copy:
// row b's chosen token becomes its next input id, its position and step index advance by one, and the
// token replaces the oldest id of its repetition window (a ring of windows[b] ids: slot step % W).
// ================================================================================================
extern "C" __global__ void advance_rows(const int* __restrict__ token, int* __restrict__ ids, int* __restrict__ positions,
                                        int* __restrict__ step_index, int* __restrict__ recent, int rs,
                                        const int* __restrict__ windows, int B) {
    const int b = threadIdx.x;
    if (b < B) {
        const int t = token[b], W = windows[b];
        ids[b] = t;
        positions[b] += 1;
        if (W > 0) recent[(i64)b * rs + step_index[b] % W] = t;
        step_index[b] += 1;
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
    const int b = blockIdx.y, i = blockIdx.x * blockDim.x + threadIdx.x;
    const float temperature = temps[b];
    if (i < V) l[(i64)b * V + i] = temperature > 0.0f ? logits[b * ls + i] / temperature : logits[b * ls + i];
}

extern "C" __global__ void sample_penalty(float* __restrict__ l, int V, const int* __restrict__ recent, int rs,
                                          const int* __restrict__ windows, const float* __restrict__ penalties,
                                          const float* __restrict__ freqs, const float* __restrict__ presences) {
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
