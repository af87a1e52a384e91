"""Mixture of experts on the GPU: `CudaDevice.moe` (semantics: `Device.moe`, llama.cpp's build_moe_ffn).

    logits = x @ router + bias                      # [T, E]   float32 (moe_router_f32) for an F32 router,
                                                    #          else the device's linear
    ids, wts = top_k(logits), softmax(chosen)       # [T, k]   moe_topk_softmax: ids stay on the GPU
    decode (T <= DECODE_MAX_T):                     # fixed grids: a decode step stays graph-capturable
        a   = act(gate_up[ids] @ x + b)             # [T k, F] moe_gemv_glu_<fmt>: gate and up rows of the
                                                    #          chosen expert in one pass, GLU fused
        out = sum_s wts * (down[ids] @ a + b)       # [T, D]   moe_down_<fmt>: the weighted sum fused
    prefill (more tokens):                          # each expert's weights read once per batch
        stable counting sort of the T k (token, slot) pairs by expert (moe_sort); one host read: the
        experts' token counts. Expert e's pairs then take rows e M .. of a padded layout, M the largest
        count (moe_pad_rows), the tokens as fp16 rows (moe_gather_f16); for each run of experts that the
        dequantize scratch holds: their gate|up to fp16 in one launch, one strided-batched cuBLAS GEMM
        (`CudaDevice.dequant_gemm_experts`); GLU + bias -> fp16 (moe_glu_f16); down the same way;
        out = weighted sum over slots + bias (moe_combine). A few launches a layer where one GEMM per
        expert took two per expert (host bound: ~20 us of Python each). When the padding would cost
        more than MOE_PAD_LIMIT times the pairs' rows (a skewed routing), or one expert's matrix does not
        fit the scratch, the pairs stay in sorted order and each expert with tokens gets its own GEMM.

Expert stacks are `Weight`s of shape [E, N, K] stored as E * N rows (row e * N + n is expert e's row n).
"""

from __future__ import annotations

import numpy as np

from ...device import MAX_BATCH
from ...generation import CudaError
from ...kernels.constants import MOE_ACT_SILU, MOE_ACT_SWIGLU_OAI, MOE_MAX_E_PER_LANE, MOE_MAX_K, MOE_WARPS
from .kernels import NULL, blocks, f32, i32, i64, launch, xs_bytes
from .planner import MOE_PAD_LIMIT

MAX_EXPERTS = MOE_MAX_E_PER_LANE * 32  # moe_topk_softmax: one warp over the experts
DECODE_MAX_T = MAX_BATCH  # up to this many tokens (a batched decode step's rows): expert-indexed GEMVs,
#                          each token's computed as it would be alone; more: grouped by expert
ACTS = {"silu": MOE_ACT_SILU, "swiglu_oai": MOE_ACT_SWIGLU_OAI}
_SOURCE = "moe.cu"


def _fmt_fn(dev, w, kind: str):
    """The format's `<kind>_<NAME>` kernel, or NotImplementedError naming the type."""
    ks = dev.format_kernels(w.fmt)
    try:
        return ks.fn(f"{kind}_{w.fmt.name}")
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
    if T <= DECODE_MAX_T:
        P = T * top_k
        a = dev.step_array((P, F))  # [T k, F]
        launch(_fmt_fn(dev, gate_up, "moe_gemv_glu"), (blocks(F, MOE_WARPS), P), (32 * MOE_WARPS,),
               (gate_up.data.data, i64(gate_up.data.row_bytes), ids, x, i32(top_k), gub, a, i32(F), i32(D), i32(E),
                i32(ACTS[act]), f32(alpha), f32(limit)), shared_mem=xs_bytes(1, D))
        out = dev.step_array((T, D))
        launch(_fmt_fn(dev, down, "moe_down"), (blocks(D, MOE_WARPS), T), (32 * MOE_WARPS,),
               (down.data.data, i64(down.data.row_bytes), ids, wts, a, dnb, out, i32(D), i32(F), i32(top_k), i32(E)),
               shared_mem=xs_bytes(top_k, F))
        return out
    return _grouped(dev, mk, x, ids, wts, gate_up, gub, down, dnb, T, D, E, F, top_k, ACTS[act], alpha, limit)


def _grouped(dev, mk, x, ids, wts, gate_up, gub, down, dnb, T, D, E, F, k, act, alpha, limit):
    if dev.stream.is_capturing():
        raise CudaError(f"moe over {T} tokens inside a captured step (only decode steps are captured)")
    P = T * k
    order = dev.step_array((P,), np.int32)
    pos = dev.step_array((P,), np.int32)
    offsets = dev.step_array((E + 1,), np.int32)
    launch(mk.fn("moe_sort"), (1,), (max(32, -(-E // 32) * 32),), (ids, i32(P), i32(E), offsets, order, pos))
    offs = [int(v) for v in dev.to_host(offsets)]  # the experts' token counts size the GEMMs
    counts = [offs[e + 1] - offs[e] for e in range(E)]
    M = max(counts)
    g_up, g_dn = dev.experts_per_gemm(2 * F, D), dev.experts_per_gemm(D, F)
    if M and E * M <= MOE_PAD_LIMIT * P and min(g_up, g_dn) >= 1:
        # padded: expert e's pairs at rows e M .., one dequantize launch and one strided-batched GEMM for
        # each group of experts that the scratch holds (a few launches a layer, not two per expert)
        rows = dev.step_array((P,), np.int32)
        launch(mk.fn("moe_pad_rows"), (blocks(P, 256),), (256,), (ids, order, offsets, i32(E), i32(M), i32(P), rows))
        n_rows = E * M
    else:  # the sorted order, one GEMM per expert (a skewed routing would pad too much)
        rows, n_rows = NULL, P
    x16 = dev.step_array((n_rows, D), np.float16)  # the pairs' tokens
    launch(mk.fn("moe_gather_f16"), (blocks(P * D, 256),), (256,), (x, order, rows, i32(k), i32(D), x16, i32(P)))
    h = dev.step_array((n_rows, 2 * F))
    _expert_gemms(dev, gate_up, 2 * F, D, x16, h, offs, counts, M if rows is not NULL else 0, g_up)
    a16 = dev.step_array((n_rows, F), np.float16)
    launch(mk.fn("moe_glu_f16"), (blocks(P * F, 256),), (256,),
           (h, ids, order, rows, gub, a16, i32(P), i32(F), i32(act), f32(alpha), f32(limit)))
    y = dev.step_array((n_rows, D))
    _expert_gemms(dev, down, D, F, a16, y, offs, counts, M if rows is not NULL else 0, g_dn)
    out = dev.step_array((T, D))
    launch(mk.fn("moe_combine"), (blocks(T * D, 256),), (256,),
           (y, ids, pos, rows, wts, dnb, out, i32(T), i32(k), i32(D), i32(E)))
    return out


def _expert_gemms(dev, w, N, K, x16, y, offs, counts, M, per_gemm):
    """y = x16 @ W_e^T for every expert's rows: padded (M > 0: expert e's at rows e M .. e M + M - 1, runs
    of up to `per_gemm` experts from the first to the last one with tokens in one call each), or the
    sorted order (M = 0: expert e's at rows offs[e] .., one call per expert with tokens)."""
    E = len(counts)
    if M:
        used = [e for e in range(E) if counts[e]]
        e0 = used[0]
        while e0 <= used[-1]:
            G = min(per_gemm, used[-1] + 1 - e0)
            dev.dequant_gemm_experts(w, e0, G, N, K, x16.data.ptr, M, y.data.ptr)
            e0 += G
            while e0 <= used[-1] and not counts[e0]:
                e0 += 1
        return
    for e in range(E):
        if counts[e]:
            dev.dequant_gemm(w, e * N, N, K, x16.data.ptr + 2 * K * offs[e], counts[e], y.data.ptr + 4 * N * offs[e])
