// orcd-worker: helpers shared by every CUDA source (core kernels and the quant plugins' formats).
//
// Self-contained on purpose: no CUDA headers, so the same text compiles with NVRTC (no include
// path needed) and with nvcc. fp16 values are carried as their 16-bit patterns (`half_bits`) and
// converted with PTX `cvt`, which is what cuda_fp16.h does underneath.
#pragma once

typedef unsigned char u8;
typedef unsigned short half_bits;
typedef unsigned int u32;
typedef long long i64;

#define ORCD_WARP 32

// The sizes and codes shared with the Python launchers are -D options of every compile, from one table
// (orcd_core/kernels/constants.py); no source defines them. A compile without them stops here.
#if !defined(GEMV_MAX_T) || !defined(GEMV_WARPS) || !defined(GEMV_MAX_R) || !defined(GEMV_TC_WARPS) ||    \
    !defined(XS_MAX_BYTES) || !defined(XS_TC_MAX_BYTES) || !defined(XS_CHUNK_ALIGN) ||                     \
    !defined(GEMV_X_PLAIN) || !defined(GEMV_X_RMS) || !defined(GEMV_X_SILU) || !defined(AP_MAXD) ||     \
    !defined(Q8_GROUP) || !defined(Q8_META_BYTES) || !defined(Q8_WARPS) || !defined(Q8_QUANT_THREADS) ||    \
    !defined(Q8_T8_ROWS) ||                                                                                 \
    !defined(AD_CHUNK) || !defined(AD_CHUNK_MIN) || !defined(AD_SPLITS) || !defined(AD_MAX_SPLITS) ||      \
    !defined(AP_TC_QT) || !defined(AP_TC_KT) || !defined(AP_TC_PAD) ||                                      \
    !defined(MOE_WARPS) || !defined(MOE_MAX_K) || !defined(MOE_GEMM_BN) || !defined(MOE_GEMM_BM) ||        \
    !defined(MOE_GEMM_SMEM_BYTES) ||                                                                        \
    !defined(MOE_MAX_E_PER_LANE) || !defined(MOE_ACT_SILU) || !defined(MOE_ACT_SWIGLU_OAI)
#error "compile with the -D options of orcd_core.kernels.constants.define_options()"
#endif
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

// ---- fp16 / bf16 -------------------------------------------------------------------------------
__device__ __forceinline__ float h2f(half_bits h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ half_bits f2h(float f) {
    half_bits h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ float bf2f(half_bits b) { return __uint_as_float(((u32)b) << 16); }
// the low / high half of a 32-bit word as fp16 -> f32
__device__ __forceinline__ float h2f_lo(u32 w) { return h2f((half_bits)(w & 0xFFFFu)); }
__device__ __forceinline__ float h2f_hi(u32 w) { return h2f((half_bits)(w >> 16)); }
__device__ __forceinline__ u32 pack_h2(float a, float b) { return (u32)f2h(a) | ((u32)f2h(b) << 16); }

// ---- tensor cores (sm_80 and later) --------------------------------------------------------------
// An fp32 value as an mma operand of type tf32 (fp32's sign and exponent, 10 mantissa bits): the tensor
// cores read the register's upper 19 bits, so adding half a tf32 unit (bit 12) first rounds the value
// to the nearest tf32 (ties away from zero) for one integer add (cvt.rna.tf32.f32 costs several
// instructions on sm_90). Finite values only: the largest ones round to inf.
__device__ __forceinline__ u32 tf32_bits(float f) { return __float_as_uint(f) + 0x1000u; }
// The tf32 value tf32_bits(f) stands for, as an fp32 (its low 13 bits zero: an exact tf32 operand).
__device__ __forceinline__ float tf32_round(float f) { return __uint_as_float(tf32_bits(f) & 0xFFFFE000u); }
// d += A B for one warp: A 16 x 8 (row major), B 8 x 8 (column major), d 16 x 8 fp32. With g = lane / 4
// and c = lane % 4 a lane holds a0 = A[g][c], a1 = A[g + 8][c], a2 = A[g][c + 4], a3 = A[g + 8][c + 4];
// b0 = B[c][g], b1 = B[c + 4][g]; d0 = D[g][2c], d1 = D[g][2c + 1], d2 = D[g + 8][2c], d3 = D[g + 8][2c + 1]
// (PTX ISA, "Matrix fragments for mma.m16n8k8", .tf32). Each element of D is the dot of its row of A
// with its column of B: a column's value does not depend on what the other columns hold.
__device__ __forceinline__ void mma_tf32_16x8x8(float d[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
#if __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    __trap();  // the launcher picks the tensor-core kernels on sm_80 and later only
#endif
}

// d += A B for one warp over fp16 operands: A 16 x 16 (row major), B 16 x 8 (column major), d 16 x 8 fp32.
// With g = lane / 4 and c = lane % 4 each register holds two fp16 (the lower index in the low half):
// a0 = A[g][2c..2c+1], a1 = A[g + 8][2c..], a2 = A[g][2c + 8..], a3 = A[g + 8][2c + 8..]; b0 = B[2c..2c+1][g],
// b1 = B[2c + 8..][g]; d as in mma_tf32_16x8x8 (PTX ISA, "Matrix fragments for mma.m16n8k16", .f16).
__device__ __forceinline__ void mma_f16_16x8x16(float d[4], const u32 a[4], u32 b0, u32 b1) {
#if __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();  // the launchers take the tensor-core kernels on sm_80 and later only
#endif
}
// A shared-memory address as the 32-bit operand of the shared-space instructions (ldmatrix, cp.async).
__device__ __forceinline__ unsigned smem_u32(const void* p) {
    unsigned s;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(s) : "l"(p));
    return s;
}
// Four 8 x 8 fp16 matrices from shared memory: lane l gives the address of row l % 8 of matrix l / 8 (16
// bytes, 16-byte aligned); r[j] of lane l then holds matrix j's row l / 4, elements 2 (l % 4) and
// 2 (l % 4) + 1 (PTX ISA, ldmatrix): the fragment layout of mma_f16_16x8x16's operands.
__device__ __forceinline__ void ldmatrix_x4(u32 r[4], const void* row) {
#if __CUDA_ARCH__ >= 800
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(row)));
#else
    __trap();
#endif
}
// The same four matrices transposed: r[j] of lane l holds matrix j's elements (2 (l % 4), l / 4) and
// (2 (l % 4) + 1, l / 4): a B operand of mma_f16_16x8x16 from a row-major [k][n] tile (k down the rows).
__device__ __forceinline__ void ldmatrix_x4_trans(u32 r[4], const void* row) {
#if __CUDA_ARCH__ >= 800
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(row)));
#else
    __trap();
#endif
}
// Two floats as two fp16 (round to nearest even) in one word, lo in the low half: one cvt instruction.
__device__ __forceinline__ u32 pack_h2_rn(float lo, float hi) {
#if __CUDA_ARCH__ >= 800
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#else
    return pack_h2(lo, hi);
#endif
}

// ---- small integers to float without a conversion instruction ------------------------------------
// 0x4B000000 | q is the float 2^23 + q for q < 2^23, so (2^23 + q) - (2^23 + off) is q - off exactly:
// one LOP and one FADD at full rate instead of an I2F, which runs at a fraction of the FMA rate and
// bounds the dequantizing GEMVs otherwise.
#define ORCD_MAGIC 8388608.0f
__device__ __forceinline__ float small_u2f(u32 q, float magic_plus_off) {
    return __int_as_float(0x4B000000u | q) - magic_plus_off;
}

// Byte U of w as a float in one PRMT, for decoding four weights of a word at a time: below,
// q_f7 gives 2 + q / 64 for a byte q < 128 (q in the top 7 mantissa bits of 2.0) and q_f8 gives
// 2 + q / 2^14 for any byte (q in mantissa bits 8-15). An FFMA then maps the float to s * (q - o)
// for a scale s with few significant bits: FFMA(q_f7, 64 s, -(128 + o) s) is that product exactly
// (64 s and (128 + o) s are exact, and the FFMA rounds once), so where s * (q - o) is exact in fp32 the
// value is bit for bit the one a multiply of s by the integer q - o gives (up to the sign of a zero).
template <int U>
__device__ __forceinline__ float q_f7(u32 w) { return __uint_as_float(__byte_perm(w, 0x40000000u, 0x7054 | (U << 8))); }
template <int U>
__device__ __forceinline__ float q_f8(u32 w) { return __uint_as_float(__byte_perm(w, 0x40000000u, 0x7504 | (U << 4))); }
// Bits 0..3 of b, each moved to bit 8i + 4 (bit 4 of byte i): the fifth bits of four 4-bit values.
__device__ __forceinline__ u32 bits4_to_bytes_bit4(u32 b) { return ((b & 0xFu) * 0x00204081u & 0x01010101u) << 4; }

// ---- int8 dot products ---------------------------------------------------------------------------
// c + the dot of the four signed bytes of a and of b: one IDP.4A (dp4a) from sm_61 on, bytes and
// multiply-adds before (the same integer).
__device__ __forceinline__ int dp4a(int a, int b, int c) {
#if __CUDA_ARCH__ >= 610
    return __dp4a(a, b, c);
#else
#pragma unroll
    for (int i = 0; i < 4; ++i) c += (int)(signed char)(a >> (8 * i)) * (int)(signed char)(b >> (8 * i));
    return c;
#endif
}

// ---- loads ---------------------------------------------------------------------------------------
// 16 bytes from a 16-byte aligned address, read-only path.
__device__ __forceinline__ uint4 ld16(const void* p) { return __ldg((const uint4*)p); }
__device__ __forceinline__ u32 ld4(const void* p) { return __ldg((const u32*)p); }
// A request of the 128-byte line holding p into L2 (no register written, nothing waits for it).
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }
// Programmatic dependent launch (sm_90 on). A kernel launched with the PDL attribute (kernels.py
// `launch(..., pdl=True)`) may start before the kernel ahead of it on the stream has ended: pdl_wait()
// returns once that kernel has ended and its writes are visible, so it comes before the first read of
// anything an earlier kernel wrote and before the first write. pdl_trigger() lets the kernel behind this
// one start (its blocks take the SMs this grid leaves free; it still waits where it must). Both do nothing
// in a kernel launched without the attribute, and on older GPUs.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}
// 16 bytes global -> shared (both 16-byte aligned) with no register holding them: cp.async on sm_80
// and later (complete for the calling thread after cp_async_wait_all), a load and a store before.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_u32(smem)), "l"(gmem) : "memory");
#else
    *(float4*)smem = *(const float4*)gmem;
#endif
}
__device__ __forceinline__ void cp_async_wait_all() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_all;" ::: "memory");
#endif
}
__device__ __forceinline__ half_bits ld2(const void* p) { return __ldg((const unsigned short*)p); }

// 16 bytes from an address that is only 2-byte aligned (blocks of 18, 22, 34 or 210 bytes):
// five aligned 32-bit loads and funnel shifts instead of eight 16-bit loads.
__device__ __forceinline__ void ld16_a2(const u8* p, u32 w[4]) {
    const unsigned long long a = (unsigned long long)p;
    const u32* base = (const u32*)(a & ~3ull);
    if ((a & 3ull) == 0) {
        uint4 v;  // may still be only 4-aligned: four separate words
        v.x = __ldg(base); v.y = __ldg(base + 1); v.z = __ldg(base + 2); v.w = __ldg(base + 3);
        w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
    } else {  // 2 mod 4
        const u32 r0 = __ldg(base), r1 = __ldg(base + 1), r2 = __ldg(base + 2), r3 = __ldg(base + 3), r4 = __ldg(base + 4);
        w[0] = __funnelshift_r(r0, r1, 16); w[1] = __funnelshift_r(r1, r2, 16);
        w[2] = __funnelshift_r(r2, r3, 16); w[3] = __funnelshift_r(r3, r4, 16);
    }
}
__device__ __forceinline__ void ld16_a4(const u8* p, u32 w[4]) {
    const u32* q = (const u32*)p;
    w[0] = __ldg(q); w[1] = __ldg(q + 1); w[2] = __ldg(q + 2); w[3] = __ldg(q + 3);
}
__device__ __forceinline__ void ld16_a16(const u8* p, u32 w[4]) {
    const uint4 v = ld16(p);
    w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
}
// byte i (0..15) of four packed words
__device__ __forceinline__ u32 byte_of(const u32 w[4], int i) { return (w[i >> 2] >> (8 * (i & 3))) & 0xFFu; }

// ---- reductions ---------------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
// The warp sums of 8 values a lane (a[t]: this lane's term of sum t) in 9 shuffles instead of 8 x 5: at
// the first three steps (xor 16, 8, 4) each lane keeps half of the sums it still holds and sends the other
// half to its partner, so it ends with one sum, that of t = (lane >> 2) & 7. Each step adds the same two
// partial sums in the same order (the lane's own, then its partner's) as warp_sum's, so the result is
// bitwise warp_sum(a[t]).
__device__ __forceinline__ float warp_sum8(const float a[8]) {
    const int lane = threadIdx.x & 31;
    const bool h4 = lane & 16, h3 = lane & 8, h2 = lane & 4;
    float b[4], c[2];
#pragma unroll
    for (int i = 0; i < 4; ++i) b[i] = (h4 ? a[4 + i] : a[i]) + __shfl_xor_sync(0xffffffffu, h4 ? a[i] : a[4 + i], 16);
#pragma unroll
    for (int i = 0; i < 2; ++i) c[i] = (h3 ? b[2 + i] : b[i]) + __shfl_xor_sync(0xffffffffu, h3 ? b[i] : b[2 + i], 8);
    float d = (h2 ? c[1] : c[0]) + __shfl_xor_sync(0xffffffffu, h2 ? c[0] : c[1], 4);
    d += __shfl_xor_sync(0xffffffffu, d, 2);
    d += __shfl_xor_sync(0xffffffffu, d, 1);
    return d;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// Sum over the whole block (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* scratch /* >= 32 floats */) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : 0.0f;
    return warp_sum(v);
}
// The RMS norm's pieces, written once for the two places that compute it on decode rows (the GEMV's
// fused staging, stage_x1, and rms_norm_rows): the same expressions in the same order, so that a row
// normalized by either, with the same block size, gets the same values.
__device__ __forceinline__ float sumsq4(float4 v) { return v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w; }
__device__ __forceinline__ float rms_scale(float ss, int K, float eps) { return 1.0f / sqrtf(ss / (float)K + eps); }
__device__ __forceinline__ float4 rms_apply4(float4 v, float r, float4 w) {
    return make_float4(v.x * r * w.x, v.y * r * w.y, v.z * r * w.z, v.w * r * w.w);
}
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : -INFINITY;
    return warp_max(v);
}
