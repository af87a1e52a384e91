"""The CUDA backend's VRAM plan for a model, made before anything is allocated (no CuPy here, so the
plan is computed and tested anywhere): the weight arena (every tensor aligned; 1-D tensors also as
float32 copies), the KV caches (`orcd_core.shape.kv_bytes` per sequence slot), the decode workspace (a
captured step keeps every op's output), the prefill pool, the captured prefill chunks' own pool (the
same estimate: prefill.py) and the dequantize scratch of prefill GEMMs.
`CudaDevice.prepare_load` reserves exactly these parts, or refuses the model naming them. Also the
shapes of the captured prefill chunks (prefill.py): the lengths they are padded to and their layout."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...device import MAX_STEP_TOKENS
from ...kernels.constants import (AD_CHUNK, AD_CHUNK_MIN, AD_SPLITS, AP_TC_KT, AP_TC_PAD, AP_TC_QT, GEMV_MAX_T,
                                  GEMV_TC_WARPS)
from ...shape import align, kv_bytes

DEQUANT_SCRATCH_BYTES = 64 << 20  # fp16 rows dequantized per cuBLAS call in prefill
PREFILL_CHUNK = MAX_STEP_TOKENS  # tokens per prefill step the pool estimate plans for
ARENA_SLACK_BYTES = 1 << 20  # the weight arena's margin beyond its aligned tensors


@dataclass(frozen=True)
class LoadPlan:
    """Bytes of each part a model's load reserves; `tensor_bytes` (the file's tensor data, unaligned)
    is what load progress counts."""

    weights: int
    kv: int
    workspace: int
    prefill_pool: int
    prefill_graphs: int
    scratch: int
    tensor_bytes: int
    n_ctx: int
    n_seq: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.workspace + self.prefill_pool + self.prefill_graphs + self.scratch

    def describe(self) -> str:
        return (f"weights {self.weights}, KV cache {self.kv} for {self.n_seq} x {self.n_ctx} positions, "
                f"workspace {self.workspace + self.prefill_pool + self.prefill_graphs + self.scratch}")


def _activation_floats_per_token(shape) -> int:
    """Floats one token's ops of one layer write: hidden x 8 + FFN x 5 + q|k|v x 3 (FFN: the experts'
    width times the experts used, for a mixture)."""
    return 8 * shape.n_embd + 5 * shape.ffn_width + 3 * shape.qkv_width


def workspace_bytes(shape) -> int:
    """The decode workspace: the bump allocator keeps every op's output of a step (it is captured into
    a graph), for up to GEMV_MAX_T rows (a batched step), plus the logits and the sampler's scratch."""
    per_tok = _activation_floats_per_token(shape) * 4 * max(shape.n_layer, 1)
    return align(GEMV_MAX_T * per_tok + 4 * shape.n_vocab * 4 + (8 << 20))


def prefill_pool_bytes(shape, chunk: int = PREFILL_CHUNK) -> int:
    """Prefill activations: arrays are reused once dropped, so the live set is about one layer's (twice,
    for the residual and the layer being built), the last token's logits and the GEMM operands' fp16
    copies."""
    per_tok = _activation_floats_per_token(shape) * 4
    return align(2 * chunk * per_tok + 2 * shape.n_vocab * 4 + (8 << 20))


def scratch_bytes(tensors) -> int:
    """The dequantize scratch: the largest matrix as fp16, at most DEQUANT_SCRATCH_BYTES (bigger ones
    are dequantized in row chunks). Expert stacks take none: their prefill GEMM decodes as it reads."""
    return align(min(max((t.n_elements * 2 for t in tensors if len(t.shape) == 2), default=0), DEQUANT_SCRATCH_BYTES))


def weight_arena_bytes(tensors) -> int:
    """Every tensor aligned, 1-D tensors (norms, biases) also as the float32 copies the kernels read."""
    return (sum(align(t.nbytes) for t in tensors)
            + sum(align(t.n_elements * 4) for t in tensors if len(t.shape) == 1) + ARENA_SLACK_BYTES)


def plan_load(tensors, shape, *, n_ctx: int, n_seq: int = 1) -> LoadPlan:
    """The plan for a model's tensors (`GGUFModel.tensors.values()`) of `shape` (`ModelShape`), with a
    KV cache of `n_ctx` positions for each of `n_seq` sequences decoding together."""
    tensors = list(tensors)
    n_seq = max(1, int(n_seq))
    return LoadPlan(weights=weight_arena_bytes(tensors), kv=kv_bytes(shape, n_ctx) * n_seq,
                    workspace=workspace_bytes(shape), prefill_pool=prefill_pool_bytes(shape),
                    prefill_graphs=prefill_pool_bytes(shape),
                    scratch=scratch_bytes(tensors), tensor_bytes=sum(t.nbytes for t in tensors),
                    n_ctx=int(n_ctx), n_seq=n_seq)


# The lengths captured prefill chunks are padded to: GEMV_MAX_T (chunks that short run the decode
# GEMVs), then doubling, with a step of 1.5x from 64 on (a chunk pads to less than 1.5x its length there)
PREFILL_BUCKETS = (GEMV_MAX_T, 16, 32, 64, 96, 128, 192, 256, 384, MAX_STEP_TOKENS)
assert list(PREFILL_BUCKETS) == sorted(set(PREFILL_BUCKETS)) and PREFILL_BUCKETS[-1] == MAX_STEP_TOKENS


def bucket(n: int) -> int:
    """The captured length a chunk of n tokens runs as (n <= MAX_STEP_TOKENS)."""
    for b in PREFILL_BUCKETS:
        if n <= b:
            return b
    raise ValueError(f"a prefill chunk holds at most {MAX_STEP_TOKENS} tokens, got {n}")


def layout(ids, start: int, Tb: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, positions) of a chunk of R = len(ids) real tokens from position `start`, padded to Tb:
    real tokens 0..R-2 at indices 0..R-2, pads (copies of the last id) at the positions after the last
    real token, the last real token at index Tb - 1."""
    R = len(ids)
    if not 0 < R <= Tb:
        raise ValueError(f"a chunk of {R} tokens does not fit a captured length of {Tb}")
    tok = np.empty(Tb, np.int32)
    pos = np.empty(Tb, np.int32)
    tok[: R - 1] = ids[: R - 1]
    pos[: R - 1] = np.arange(start, start + R - 1)
    tok[R - 1 :] = ids[R - 1]
    pos[R - 1 : Tb - 1] = np.arange(start + R, start + Tb)
    pos[Tb - 1] = start + R - 1
    return tok, pos


def graph_key(Tb: int, start: int, n_ctx: int, rows, windows) -> tuple | None:
    """What the captured graph of a Tb-token chunk depends on (a cache layout: context, rows and window
    of each layer), or None when such a chunk cannot be padded into that cache from `start`: past its
    context, or through a sliding-window ring shorter than the window plus the step (the pads would
    overwrite keys the next tokens read; `shape.kv_rows` sizes rings for any step)."""
    rows, windows = tuple(int(r) for r in rows), tuple(int(w) for w in windows)
    if start + Tb > n_ctx:
        return None
    if any(w > 0 and r < min(Tb + w - 1, n_ctx) for r, w in zip(rows, windows)):
        return None
    return (Tb, int(n_ctx), len(rows), rows, windows)


# ---- the prefill attention (CudaDevice.attention, steps of more than one token) -------------------------
PREFILL_ATTENTION_TC_DIMS = (64, 96, 128)  # head dims with an attn_prefill_tc_<hd> kernel (attention.cuh)


def prefill_attention_tc(sm: int, hd: int) -> bool:
    """Whether a prefill step's attention runs on the tensor cores (attn_prefill_tc_<hd>: sm_80 on, the
    head dims it is instantiated for); else the FMA kernel attn_prefill, for any head dim."""
    return sm >= 80 and hd in PREFILL_ATTENTION_TC_DIMS


def prefill_attention_tc_smem(hd: int) -> int:
    """attn_prefill_tc_<hd>'s dynamic shared memory: Q [AP_TC_QT] and two buffers of K and V [AP_TC_KT]
    rows of hd + AP_TC_PAD halves."""
    return (AP_TC_QT + 4 * AP_TC_KT) * (hd + AP_TC_PAD) * 2


# ---- the decode GEMV (CudaDevice._gemv) ---------------------------------------------------------------
# q8: rows through quantize_q8 and gemv_q8_* / gemv_q8_t8_* (int8 x, dp4a; a row's values alone or batched
# the same) where the weight's format has them, the rest as ffma | gemv_tc_* (tensor cores, sm_80 on) |
# gemv_/gemv_t4_/gemv_t8_* (FMA per weight)
DECODE_GEMVS = ("tc", "ffma", "q8")


def decode_splits(span: int) -> tuple[int, int]:
    """(keys per split, splits) of the decode attention of a query that sees `span` keys: the smallest
    AD_CHUNK_MIN * 2^k keys (at most AD_CHUNK) that take at most AD_SPLITS splits. attention.cuh's
    ad_chunk computes the same on the device, per row."""
    chunk = AD_CHUNK_MIN
    while chunk < AD_CHUNK and -(-span // chunk) > AD_SPLITS:
        chunk *= 2
    return chunk, -(-span // chunk)


def decode_grid_splits(bound: int) -> int:
    """The splits a decode-attention launch needs for rows that see at most `bound` keys each: the most
    that any span <= bound takes (a span just past a doubling of the split takes up to AD_SPLITS)."""
    chunk, S = decode_splits(max(1, bound))
    return S if chunk == AD_CHUNK_MIN else max(S, AD_SPLITS)


SPAN_MIN = 512  # the smallest bound of the rows' positions a batched decode graph is captured for


def decode_span_bound(need: int, n_ctx: int) -> int:
    """The bound of a decode graph whose rows' positions + 1 reach `need`: a power of two from SPAN_MIN,
    at most the context (few bounds, so few graphs; backends/cuda/graph.py)."""
    span = SPAN_MIN
    while span < need:
        span *= 2
    return min(span, n_ctx)


def decode_gemv(sm: int, override: str | None = None) -> str:
    """The decode GEMV kernel of a device (of compute capability `sm`, as 90), for one row or a batch.

    Every kind gives a row the same bits whatever rows share its step, so a sequence decodes the same
    alone or batched within one engine. "q8" (the default, one row or a batch): x quantized to int8 once
    per GEMV input and the weights' integer codes by dp4a, decoded once for all of a step's rows, where
    the weight's format has that kernel (the others: "ffma"); its x rounded as llama.cpp's MMVQ rounds
    it. On an H100 it beats the tensor-core kernels ("tc") at 8 rows (tg128 x 8: qwen2 +14%, phi3 +22%,
    gpt-oss +65%) and alone (qwen2 +45%), and the FMA kernels ("ffma", the exact reference: the GPU
    tests pin it) alone by 17-50% (docs/perf-notes.md). `override`: ORCD_DECODE_GEMV, to compare them on
    one GPU; ValueError if it names no kernel, or "tc" on a GPU without tf32 tensor cores."""
    if override:
        if override not in DECODE_GEMVS:
            raise ValueError(f"ORCD_DECODE_GEMV={override!r}: one of {', '.join(DECODE_GEMVS)}")
        if override == "tc" and sm < 80:
            raise ValueError(f"ORCD_DECODE_GEMV=tc needs compute capability 8.0 or later (this GPU: {sm // 10}.{sm % 10})")
        return override
    return "q8"


def gemv_tc_k_split(N: int, K: int) -> int:
    """The tensor-core GEMV's KS: warps that share a 16-row tile's K (1, 2, 4 or GEMV_TC_WARPS): as many
    as the tile has 128-element slabs (a warp's first slab is decoded while x is staged), halved while
    the launch holds more than 2,048 warps (measured, docs/perf-notes.md: short matrices are fastest
    with 8, qwen2's gate|up with 1-2, its output head with 1). From N and K only: a row's sums are then
    the same for every row count."""
    slabs, tiles = -(-K // 128), -(-N // 16)
    ks = 1
    while ks < GEMV_TC_WARPS and ks < slabs:
        ks *= 2
    while ks > 1 and tiles * ks > 2048:
        ks //= 2
    return ks

