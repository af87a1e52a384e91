"""The typed config of the llama family (qwen2, llama, phi3), read from GGUF metadata with the
defaults llama.cpp applies (src/llama-model.cpp load_hparams)."""

from __future__ import annotations

from dataclasses import dataclass

from orcd_core.device import RopeSpec
from orcd_core.errors import GGUFMetadataError
from orcd_core.gguf_file import MAX_CONTEXT_LENGTH, embedding_rows
from orcd_core.hparams import uniform_per_layer
from orcd_core.rope import rope_scaling_type, rope_spec_from_metadata
from orcd_core.shape import ModelShape

#: Metadata every file of the family must have (without the "{arch}." prefix).
REQUIRED_METADATA: dict[str, type | tuple[type, ...]] = {
    "block_count": int,
    "embedding_length": int,
    "feed_forward_length": int,
    "attention.head_count": int,
    "attention.layer_norm_rms_epsilon": float,
}


#: Largest embedding, feed-forward or head width a file may claim (real models: up to ~50k).
MAX_WIDTH = 1 << 20


@dataclass(frozen=True)
class DecoderConfig:
    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    norm_eps: float
    context_length: int | None  # None when the file does not say
    rope: RopeSpec  # without freq factors (see the model: they are per file / per context)
    rope_scaling: str  # "none" | "linear" | "yarn" | "longrope"

    @property
    def n_q(self) -> int:
        return self.n_head * self.head_dim

    @property
    def n_kv(self) -> int:
        return self.n_head_kv * self.head_dim

    def shape(self) -> ModelShape:
        """Every layer alike, no sliding window (the family's KV cache spans the whole context)."""
        return ModelShape(
            n_layer=self.n_layer, n_embd=self.n_embd, n_vocab=self.n_vocab, context_length=self.context_length,
            n_head=self.n_head, n_head_kv=(self.n_head_kv,) * self.n_layer, head_dim_k=self.head_dim,
            head_dim_v=self.head_dim, kv_windows=(0,) * self.n_layer, ffn_width=self.n_ff,
        )

    @classmethod
    def from_gguf(cls, model, *, neox: bool, full_rotary: bool = False) -> "DecoderConfig":
        """`full_rotary`: the architecture requires rope.dimension_count == head_dim (llama)."""
        arch = model.architecture

        def uniform_int(suffix: str, default, hi: int) -> int:  # per-layer arrays: all equal in this family
            return uniform_per_layer(model, f"{arch}.{suffix}", default, hi=hi)

        # every value is range-checked here, where it is read: against the file (a block has at
        # least one tensor) and against the values read before it
        n_layer = model.int_value(f"{arch}.block_count", lo=1, hi=max(1, len(model.tensors)))
        n_embd = model.int_value(f"{arch}.embedding_length", lo=1, hi=MAX_WIDTH)
        n_head = uniform_int("attention.head_count", None, n_embd)
        if n_embd % n_head:
            raise GGUFMetadataError(model.path, f"{arch}.attention.head_count {n_head} does not divide embedding_length {n_embd}")
        head_dim = uniform_int("attention.key_length", n_embd // n_head, MAX_WIDTH)
        if uniform_int("attention.value_length", head_dim, MAX_WIDTH) != head_dim:
            raise GGUFMetadataError(model.path, f"{arch}: key and value head sizes differ")
        n_head_kv = uniform_int("attention.head_count_kv", n_head, n_head)
        if n_head % n_head_kv:
            raise GGUFMetadataError(model.path, f"{arch}: {n_head} heads is not a multiple of {n_head_kv} KV heads")
        n_rot = uniform_int("rope.dimension_count", head_dim, head_dim)
        if n_rot % 2 or (full_rotary and n_rot != head_dim):
            raise GGUFMetadataError(model.path, f"{arch}.rope.dimension_count is {n_rot}, head size {head_dim}")
        n_ff = uniform_int("feed_forward_length", None, MAX_WIDTH)
        norm_eps = model.float_value(f"{arch}.attention.layer_norm_rms_epsilon", lo=0.0, hi=1.0, lo_open=True)
        ctx = model.int_value(f"{arch}.context_length", None, lo=1, hi=MAX_CONTEXT_LENGTH)
        return cls(
            arch=arch,
            n_vocab=embedding_rows(model),
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            n_ff=n_ff,
            norm_eps=norm_eps,
            context_length=ctx,
            rope=rope_spec_from_metadata(model, n_rot=n_rot, neox=neox),
            rope_scaling=rope_scaling_type(model),
        )
