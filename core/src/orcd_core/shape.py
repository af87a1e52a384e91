"""The shape facts of a model that memory planning needs, in one typed record, and the one function
that turns them into KV-cache bytes.

Every architecture's config returns its `ModelShape` (`config.shape()`, see
`orcd_core.architecture.ModelConfig`); the CUDA load planner (`backends/cuda/planner.py`),
`orcd-worker inspect` and `orcd-worker serve --kv-cache-size-mb` all count through `kv_bytes`, so
they agree on sliding windows and per-layer KV heads. Nothing here reads GGUF metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

from .device import MAX_STEP_TOKENS

#: The context a model gets when neither the file (`{arch}.context_length`) nor the caller says.
DEFAULT_CONTEXT = 4096
#: The KV cache holds fp16 keys and values.
KV_BYTES_PER_ELEMENT = 2
#: The CUDA backend's allocation granularity (its allocators in backends/cuda/memory.py take it from
#: here): each layer's K and V buffer, each weight in the arena and each activation of a step start on
#: a 256-byte boundary.
ALLOCATION_ALIGNMENT = 256


@dataclass(frozen=True)
class ModelShape:
    """Per-model sizes (GGUF metadata names in comments). Per-layer facts are tuples of n_layer."""

    n_layer: int  # block_count
    n_embd: int  # embedding_length (the hidden width)
    n_vocab: int  # rows of token_embd
    context_length: int | None  # context_length; None when the file does not say
    n_head: int  # attention.head_count (query heads)
    n_head_kv: tuple[int, ...]  # attention.head_count_kv, per layer
    head_dim_k: int  # attention.key_length
    head_dim_v: int  # attention.value_length
    kv_windows: tuple[int, ...]  # per layer: the sliding window of its KV cache, 0 = the whole context
    ffn_width: int  # feed_forward_length; for a mixture, the experts' width times the experts used

    def __post_init__(self) -> None:
        if len(self.n_head_kv) != self.n_layer or len(self.kv_windows) != self.n_layer:
            raise ValueError(f"ModelShape: {self.n_layer} layers but {len(self.n_head_kv)} KV head counts "
                             f"and {len(self.kv_windows)} windows")

    @property
    def qkv_width(self) -> int:
        """Width of the fused q|k|v activation of the widest layer."""
        return (self.n_head + 2 * max(self.n_head_kv, default=0)) * self.head_dim_k


def kv_rows(window: int, n_ctx: int) -> int:
    """Rows of one layer's KV cache: the whole context, or for a sliding-window layer a ring of the
    window plus the keys one step writes before its queries read (MAX_STEP_TOKENS - 1 more)."""
    return min(int(window) + MAX_STEP_TOKENS - 1, int(n_ctx)) if window > 0 else int(n_ctx)


def align(n: int) -> int:
    """`n` bytes rounded up to a multiple of ALLOCATION_ALIGNMENT."""
    return -(-int(n) // ALLOCATION_ALIGNMENT) * ALLOCATION_ALIGNMENT


def kv_bytes(shape: ModelShape, n_ctx: int) -> int:
    """Bytes of one KV cache of `n_ctx` positions as the CUDA backend allocates it: per layer, fp16 K
    and V of `kv_rows(window, n_ctx)` rows of that layer's KV heads, each buffer 256-byte aligned."""
    total = 0
    for n_kv, window in zip(shape.n_head_kv, shape.kv_windows, strict=True):
        rows = kv_rows(window, n_ctx)
        total += align(rows * n_kv * shape.head_dim_k * KV_BYTES_PER_ELEMENT)
        total += align(rows * n_kv * shape.head_dim_v * KV_BYTES_PER_ELEMENT)
    return total


def max_context_for(shape: ModelShape, budget_bytes: int, *, limit: int = 1 << 31) -> int:
    """The most positions whose KV cache (`kv_bytes`) fits in `budget_bytes` (0 when not even one
    fits), at most `limit` (a model whose every layer is windowed fits any context)."""
    if kv_bytes(shape, 1) > budget_bytes:
        return 0
    lo, hi = 1, int(limit)
    while lo < hi:  # kv_bytes is non-decreasing in n_ctx
        mid = (lo + hi + 1) // 2
        if kv_bytes(shape, mid) <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


def resolve_context(max_context: int | None, context_length: int | None) -> int:
    """The context the engine plans for: the caller's cap, the file's context length, the smaller of
    the two when both are given, else DEFAULT_CONTEXT."""
    if max_context and context_length:
        return min(max_context, context_length)
    return int(max_context or context_length or DEFAULT_CONTEXT)
