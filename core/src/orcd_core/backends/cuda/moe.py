"""Mixture of experts on the GPU: `CudaDevice.moe` (semantics: `Device.moe`, llama.cpp's build_moe_ffn).

    logits = x @ router + bias                      # [T, E]   float32 (moe_router_f32) for an F32 router,
                                                    #          else the device's linear
    ids, wts = top_k(logits), softmax(chosen)       # [T, k]   moe_topk_softmax: ids stay on the GPU
    decode (T <= DECODE_MAX_T):                     # fixed grids: a decode step stays graph-capturable
        a   = act(gate_up[ids] @ x + b)             # [T k, F] moe_gemv_glu_<fmt>: gate and up rows of the
                                                    #          chosen expert in one pass, GLU fused
        out = sum_s wts * (down[ids] @ a + b)       # [T, D]   moe_down_<fmt>: the weighted sum fused
        (decode_gemv "q8", the default: x quantized to int8 by quantize_q8 first, and the _q8_ kernels
        of the same two, dp4a products, where the experts' format has them; moe_gemv_glu_q8 also writes
        a quantized, each group of 32 by the warp that completes it). The down launch
        is deferred as a "gemv" record (fusion.py): the residual add that reads it (x + moe(norm(x)))
        is added in its store instead of by an add_f32 launch (the same bits)
    prefill (more tokens):                          # each expert's weights read once per tile of its pairs
        stable counting sort of the T k (token, slot) pairs by expert (moe_sort: offsets and order stay
        on the GPU); the pairs' tokens as fp16 rows in that order (moe_gather_f16); h = the gate|up
        GEMM of every expert's rows (moe_gemm_<fmt>: tensor cores, weights decoded as they are read,
        tiles found from the offsets on the device); GLU + bias -> fp16 (moe_glu_f16); y = the down
        GEMM the same way; out = weighted sum over slots + bias (moe_combine). Seven launches a layer,
        none reading anything back: the prefill chunk can be captured as a graph (prefill.py).

Expert stacks are `Weight`s of shape [E, N, K] stored as E * N rows (row e * N + n is expert e's row n).
"""

from __future__ import annotations

import numpy as np

from ...device import MAX_BATCH
from ...generation import CudaError
from ...kernels.constants import (MOE_ACT_SILU, MOE_ACT_SWIGLU_OAI, MOE_GEMM_BM, MOE_GEMM_BN, MOE_GEMM_SMEM_BYTES,
                                  MOE_MAX_E_PER_LANE, MOE_MAX_K, MOE_WARPS, Q8_WARPS)
from .kernels import NULL, blocks, f32, i32, i64, launch, q8_row_bytes, xs_bytes

MAX_EXPERTS = MOE_MAX_E_PER_LANE * 32  # moe_topk_softmax: one warp over the experts
DECODE_MAX_T = MAX_BATCH  # up to this many tokens (a batched decode step's rows): expert-indexed GEMVs,
#                          each token's computed as it would be alone; more: grouped by expert
ACTS = {"silu": MOE_ACT_SILU, "swiglu_oai": MOE_ACT_SWIGLU_OAI}
GLU_COUNTERS = DECODE_MAX_T * MOE_MAX_K * 512  # moe_gemv_glu_q8's group counters: GLU widths up to 16,384
_SOURCE = "moe.cu"


def _fmt_fn(dev, w, kind: str, smem: int = 0):
    """The format's `<kind>_<NAME>` kernel (its dynamic shared memory limit raised to `smem`), or
    NotImplementedError naming the type."""
    ks = dev.format_kernels(w.fmt)
    try:
        return ks.fn(f"{kind}_{w.fmt.name}", max_dynamic_smem=smem)
    except CudaError:
        raise NotImplementedError(f"moe: expert weight {w.name!r} is {w.fmt.name}, which has no expert-indexed "
                                  f"GEMV ({kind}_{w.fmt.name}) in its CUDA source") from None


def _bias(b, shape, what):
    if b is None:
        return NULL
    if tuple(b.shape) != shape or b.dtype != np.float32 or not b.flags.c_contiguous:
        raise ValueError(f"moe: {what} bias is {b.dtype} {tuple(b.shape)}, expected contiguous float32 {shape}")
    return b


def moe(dev, x, router, router_bias, gate_up, gate_up_bias, down, down_bias, *, top_k: int, act: str,
        alpha: float = 1.702, limit: float = 7.0):
    T = int(x.shape[0])
    q8 = T <= DECODE_MAX_T and dev.decode_gemv == "q8" and all(
        dev.has_kernel(w.fmt, k) for w, k in ((gate_up, "moe_gemv_glu_q8"), (down, "moe_down_q8")))
    # x the decode's deferred RMS norm: one quantize_q8_xf writes both x (the router's floats) and its int8
    # rows (the experts'), instead of rms_norm_rows and a quantize_q8 of its output
    xq = dev.quantize_norm_rows(x) if q8 else None
    x = dev.contiguous(x)
    T, D = x.shape
    if len(gate_up.shape) != 3 or len(down.shape) != 3:
        raise ValueError(f"moe: expert weights {gate_up.shape}, {down.shape} are not [E, N, K] stacks")
    E, two_f, Dg = gate_up.shape
    F = two_f // 2
    if Dg != D or two_f != 2 * F or tuple(down.shape) != (E, D, F) or tuple(router.shape) != (E, D):
        raise ValueError(f"moe: x {x.shape}, router {router.shape}, gate_up {gate_up.shape}, down {down.shape}")
    if act not in ACTS:
        raise ValueError(f"moe: unknown activation {act!r} (expected one of {sorted(ACTS)})")
    if not 1 <= top_k <= min(E, MOE_MAX_K) or E > MAX_EXPERTS:
        raise NotImplementedError(f"moe: {E} experts, top {top_k} (supported: up to {MAX_EXPERTS} experts, "
                                  f"top 1..{MOE_MAX_K})")
    if D % 32 or F % 32:
        raise NotImplementedError(f"moe: widths D {D}, F {F} must be multiples of 32")
    gub = _bias(gate_up_bias, (E, 2 * F), "gate|up")
    dnb = _bias(down_bias, (E, D), "down")
    mk = dev.core_kernels(_SOURCE)
    if router.fmt.name == "F32":  # gpt-oss's: float32 logits for any T (the GEMM path rounds to fp16)
        logits = dev.step_array((T, E))  # [T, E]
        launch(mk.fn("moe_router_f32"), (blocks(E, MOE_WARPS), T), (32 * MOE_WARPS,),
               (router.data.data, x, _bias(router_bias, (E,), "router"), logits, i32(E), i32(D)))
    else:
        logits = dev.contiguous(dev.linear(x, router, router_bias))  # [T, E] (launched: read below by our kernel)
    ids = dev.step_array((T, top_k), np.int32)
    wts = dev.step_array((T, top_k))
    launch(mk.fn("moe_topk_softmax"), (T,), (32,), (logits, i32(E), i32(top_k), ids, wts))
    if T > DECODE_MAX_T and int(dev.sm) < 80:
        raise NotImplementedError(f"moe: the grouped prefill GEMM runs on tensor cores (compute capability 8.0 "
                                  f"or later; this GPU: {dev.sm[:-1]}.{dev.sm[-1]})")
    if q8:
        return _decode_q8(dev, x, xq, ids, wts, gate_up, gub, down, dnb, T, D, F, top_k, E, ACTS[act], alpha, limit)
    if T <= DECODE_MAX_T:
        P = T * top_k
        a = dev.step_array((P, F))  # [T k, F]
        launch(_fmt_fn(dev, gate_up, "moe_gemv_glu"), (blocks(F, MOE_WARPS), P), (32 * MOE_WARPS,),
               (gate_up.data.data, i64(gate_up.data.row_bytes), ids, x, i32(top_k), gub, a, i32(F), i32(D), i32(E),
                i32(ACTS[act]), f32(alpha), f32(limit)), shared_mem=xs_bytes(1, D))
        fn = _fmt_fn(dev, down, "moe_down")

        def run(out, res=NULL):
            if res is not NULL:
                dev.deferred.ready(res)
            launch(fn, (blocks(D, MOE_WARPS), T), (32 * MOE_WARPS,),
                   (down.data.data, i64(down.data.row_bytes), ids, wts, a, dnb, res, out, i32(D), i32(F), i32(top_k),
                    i32(E)), shared_mem=xs_bytes(top_k, F))

        return dev.deferred.defer("gemv", dev.step_array((T, D)), run)
    return _grouped(dev, mk, x, ids, wts, gate_up, gub, down, dnb, T, D, E, F, top_k, ACTS[act], alpha, limit)


def _glu_counters(dev, n: int):
    """moe_gemv_glu_q8's group counters ([P, F / 32] of a launch, each reset by the warp that completes its
    group): the device's, with room for GLU_COUNTERS."""
    if n > GLU_COUNTERS:
        raise NotImplementedError(f"moe: {n} groups of 32 GLU outputs a step (at most {GLU_COUNTERS})")
    return dev.counters("moe_gemv_glu_q8", GLU_COUNTERS)


def _decode_q8(dev, x, xq, ids, wts, gate_up, gub, down, dnb, T, D, F, k, E, act, alpha, limit):
    """The decode path on the int8-activation expert GEMVs (decode_gemv "q8"): x quantized (quantize_q8;
    xq: done already, with the norm), moe_gemv_glu_q8_<fmt> (which also writes its output quantized: aq),
    moe_down_q8_<fmt>; every launch by PDL."""
    P = T * k
    xq = xq if xq is not None else dev.quantize_rows(x, T, D)
    aq = dev.step_array((P, q8_row_bytes(F)), np.uint8)
    a = dev.step_array((P, F))  # [T k, F]
    counters = _glu_counters(dev, P * (F // 32))
    launch(_fmt_fn(dev, gate_up, "moe_gemv_glu_q8", q8_row_bytes(D)), (blocks(F, Q8_WARPS), P), (32 * Q8_WARPS,),
           (gate_up.data.data, i64(gate_up.data.row_bytes), ids, xq, i32(k), gub, a, i32(F), i32(D), i32(E),
            i32(act), f32(alpha), f32(limit), aq, counters), shared_mem=q8_row_bytes(D), pdl=True)
    fn = _fmt_fn(dev, down, "moe_down_q8", k * q8_row_bytes(F))

    def run(out, res=NULL):  # (deferred: a residual add takes it, see moe())
        if res is not NULL:  # (a residual may itself be deferred)
            dev.deferred.ready(res)
        launch(fn, (blocks(D, Q8_WARPS), T), (32 * Q8_WARPS,),
               (down.data.data, i64(down.data.row_bytes), ids, wts, aq, dnb, res, out, i32(D), i32(F), i32(k), i32(E)),
               shared_mem=k * q8_row_bytes(F), pdl=True)

    return dev.deferred.defer("gemv", dev.step_array((T, D)), run)


def _grouped(dev, mk, x, ids, wts, gate_up, gub, down, dnb, T, D, E, F, k, act, alpha, limit):
    P = T * k
    order = dev.step_array((P,), np.int32)
    pos = dev.step_array((P,), np.int32)
    offsets = dev.step_array((E + 1,), np.int32)
    launch(mk.fn("moe_sort"), (1,), (max(32, -(-E // 32) * 32),), (ids, i32(P), i32(E), offsets, order, pos))
    x16 = dev.step_array((P, D), np.float16)  # the pairs' tokens, sorted by expert
    launch(mk.fn("moe_gather_f16"), (blocks(P * D, 256),), (256,), (x, order, offsets, i32(E), i32(k), i32(D), x16, i32(P)))
    h = dev.step_array((P, 2 * F))
    _expert_gemm(dev, gate_up, offsets, E, x16, h, 2 * F, D, P)
    a16 = dev.step_array((P, F), np.float16)
    launch(mk.fn("moe_glu_f16"), (blocks(P * F, 256),), (256,),
           (h, ids, order, offsets, i32(E), gub, a16, i32(P), i32(F), i32(act), f32(alpha), f32(limit)))
    y = dev.step_array((P, D))
    _expert_gemm(dev, down, offsets, E, a16, y, D, F, P)
    out = dev.step_array((T, D))
    launch(mk.fn("moe_combine"), (blocks(T * D, 256),), (256,),
           (y, ids, pos, wts, dnb, out, i32(T), i32(k), i32(D), i32(E)))
    return out


def _expert_gemm(dev, w, offsets, E, x16, y, N, K, P):
    """y[r] = W_e x16[r] for each expert e's rows r (offsets[e] .. offsets[e + 1] - 1) of the sorted pairs:
    one launch whose grid bounds the tiles any routing of P pairs can have (moe_kernels.cuh, moe_gemm)."""
    tiles = -(-P // MOE_GEMM_BM) + min(E, P) - 1
    launch(_fmt_fn(dev, w, "moe_gemm", MOE_GEMM_SMEM_BYTES), (tiles, blocks(N, MOE_GEMM_BN)), (2 * MOE_GEMM_BN,),
           (w.data.data, i64(w.data.row_bytes), offsets, i32(E), x16, y, i32(N), i32(K)), shared_mem=MOE_GEMM_SMEM_BYTES)
