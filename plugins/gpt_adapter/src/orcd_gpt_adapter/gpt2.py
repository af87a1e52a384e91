"""GPT-2 (GGUF `general.architecture` = "gpt2"), as llama.cpp runs it (src/models/gpt2.cpp).

Learned absolute position embeddings, pre-norm LayerNorm (weight + bias), one fused c_attn
projection (`attn_qkv`, with bias), no RoPE, a GELU MLP with biases; the output projection is
`output.weight` or, when the file has none, the token embedding (tied).

    x = tok_embd[ids] + pos_embd[positions]
    x = x + attn(layer_norm(x))
    x = x + down(gelu(up(layer_norm(x))))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from orcd_core.architecture import Architecture
from orcd_core.device import Device, KVCache, Step
from orcd_core.errors import GGUFMetadataError, GGUFTensorError
from orcd_core.generation import InvalidRequest
from orcd_core.gguf_file import MAX_CONTEXT_LENGTH, embedding_rows
from orcd_core.hparams import uniform_per_layer
from orcd_core.shape import ModelShape
from orcd_core.weights import Proj, TensorLoader


ARCH = "gpt2"
#: Largest embedding or feed-forward width a file may claim.
MAX_WIDTH = 1 << 20


@dataclass(frozen=True)
class Gpt2Config:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    norm_eps: float
    n_positions: int  # rows of position_embd: the longest sequence the model can see
    context_length: int | None  # gpt2.context_length; None when the file does not say

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def shape(self) -> ModelShape:
        return ModelShape(
            n_layer=self.n_layer, n_embd=self.n_embd, n_vocab=self.n_vocab, context_length=self.context_length,
            n_head=self.n_head, n_head_kv=(self.n_head_kv,) * self.n_layer, head_dim_k=self.head_dim,
            head_dim_v=self.head_dim, kv_windows=(0,) * self.n_layer, ffn_width=self.n_ff,
        )

    @classmethod
    def from_gguf(cls, model) -> "Gpt2Config":
        # each value range-checked where it is read, against the file and the values before it
        n_embd = model.int_value(f"{ARCH}.embedding_length", lo=1, hi=MAX_WIDTH)
        # head counts and the FFN width: one value or a per-layer array of equal values (as llama.cpp reads them)
        n_head = uniform_per_layer(model, f"{ARCH}.attention.head_count", hi=n_embd)
        if n_embd % n_head:
            raise GGUFMetadataError(model.path, f"{ARCH}.attention.head_count {n_head} does not divide embedding_length {n_embd}")
        n_head_kv = uniform_per_layer(model, f"{ARCH}.attention.head_count_kv", n_head, hi=n_head)
        if n_head % n_head_kv:
            raise GGUFMetadataError(model.path, f"{ARCH}: {n_head} heads is not a multiple of {n_head_kv} KV heads")
        context_length = model.int_value(f"{ARCH}.context_length", None, lo=1, hi=MAX_CONTEXT_LENGTH)
        pos = model.tensors.get("position_embd.weight")
        if pos is None:
            raise GGUFTensorError(model.path, "tensor 'position_embd.weight' is missing")
        return cls(
            n_vocab=embedding_rows(model),
            n_embd=n_embd,
            n_layer=model.int_value(f"{ARCH}.block_count", lo=1, hi=max(1, len(model.tensors))),
            n_head=n_head,
            n_head_kv=n_head_kv,
            n_ff=uniform_per_layer(model, f"{ARCH}.feed_forward_length", hi=MAX_WIDTH),
            norm_eps=model.float_value(f"{ARCH}.attention.layer_norm_epsilon", lo=0.0, hi=1.0, lo_open=True),
            # llama.cpp sizes position_embd by context_length; without the key, the table's rows
            n_positions=int(context_length or pos.np_shape[0]),
            context_length=context_length,
        )


@dataclass
class Block:
    attn_norm: Any  # [D]
    attn_norm_b: Any  # [D]
    qkv: Proj  # c_attn: [T, D] -> [T, D], [T, Dkv], [T, Dkv] (one matmul, with bias)
    wo: Any  # [D, D] (c_proj)
    bo: Any  # [D]
    ffn_norm: Any  # [D]
    ffn_norm_b: Any  # [D]
    up: Any  # [F, D] (c_fc)
    up_b: Any  # [F]
    down: Any  # [D, F] (mlp.c_proj)
    down_b: Any  # [D]


class Gpt2Model:
    """GPT-2 weights on a device and its forward pass."""

    def __init__(self, config: Gpt2Config, device: Device, tensors: TensorLoader):
        c, t = config, tensors
        self.config, self.device = c, device
        D, F, dkv = c.n_embd, c.n_ff, c.n_head_kv * c.head_dim
        self.tok_embd = t.weight("token_embd.weight", [c.n_vocab, D])
        self.pos_embd = t.weight("position_embd.weight", [c.n_positions, D])
        self.output_norm = t.array("output_norm.weight", [D])
        self.output_norm_b = t.array("output_norm.bias", [D])
        # tied: without output.weight, llama.cpp multiplies by the token embedding
        self.output = t.weight("output.weight", [c.n_vocab, D]) if t.has("output.weight") else self.tok_embd
        self.blocks = []
        for il in range(c.n_layer):
            p = f"blk.{il}."
            self.blocks.append(Block(
                attn_norm=t.array(p + "attn_norm.weight", [D]),
                attn_norm_b=t.array(p + "attn_norm.bias", [D]),
                qkv=t.proj_split(p + "attn_qkv", [D, dkv, dkv], D),
                wo=t.weight(p + "attn_output.weight", [D, D]),
                bo=t.array(p + "attn_output.bias", [D]),
                ffn_norm=t.array(p + "ffn_norm.weight", [D]),
                ffn_norm_b=t.array(p + "ffn_norm.bias", [D]),
                up=t.weight(p + "ffn_up.weight", [F, D]),
                up_b=t.array(p + "ffn_up.bias", [F]),
                down=t.weight(p + "ffn_down.weight", [D, F]),
                down_b=t.array(p + "ffn_down.bias", [D]),
            ))
        t.finish()

    def kv_windows(self) -> list[int]:
        return [0] * self.config.n_layer

    def new_kv_cache(self, n_ctx: int) -> KVCache:
        c = self.config
        if n_ctx > c.n_positions:
            raise InvalidRequest(f"gpt2: a context of {n_ctx} exceeds the {c.n_positions} learned positions "
                                 f"(position_embd); use a max context <= {c.n_positions}")
        return self.device.new_kv_cache(c.n_layer, n_ctx, c.n_head_kv, c.head_dim, self.kv_windows())

    def forward(self, step: Step, cache: KVCache, *, all_logits: bool = False):
        """Logits of the step's tokens: [T, V] with `all_logits`, else [1, V] (the last token)."""
        c, dev = self.config, self.device
        x = dev.add(dev.embedding(self.tok_embd, step.ids), dev.embedding(self.pos_embd, step.positions))  # [T, D]
        for il, B in enumerate(self.blocks):
            x = dev.add(x, self.attention(il, B, dev.layer_norm(x, B.attn_norm, B.attn_norm_b, c.norm_eps), step, cache))
            x = dev.add(x, self.mlp(B, dev.layer_norm(x, B.ffn_norm, B.ffn_norm_b, c.norm_eps)))
        if not all_logits:
            x = x[-1:]  # [1, D]
        return dev.linear(dev.layer_norm(x, self.output_norm, self.output_norm_b, c.norm_eps), self.output)  # [T, V]

    def attention(self, il: int, B: Block, h, step: Step, cache: KVCache):
        c, dev, T = self.config, self.device, step.T
        hd = c.head_dim
        q, k, v = B.qkv(dev, h)  # [T, D], [T, Dkv], [T, Dkv]
        q = q.reshape(T, c.n_head, hd)  # [T, H, hd]
        k = k.reshape(T, c.n_head_kv, hd)  # [T, Hkv, hd]
        v = v.reshape(T, c.n_head_kv, hd)  # [T, Hkv, hd]
        o = dev.attention(q, k, v, cache, il, step, scale=1.0 / math.sqrt(hd))  # [T, H, hd]
        return dev.linear(o.reshape(T, c.n_embd), B.wo, B.bo)  # [T, D]

    def mlp(self, B: Block, h):
        dev = self.device
        return dev.linear(dev.gelu(dev.linear(h, B.up, B.up_b)), B.down, B.down_b)  # [T, D]


class Gpt2(Architecture):
    name = ARCH
    required_metadata = {
        "embedding_length": int,
        "block_count": int,
        "feed_forward_length": int,
        "attention.head_count": int,
        "attention.layer_norm_epsilon": float,
    }

    def config(self, gguf) -> Gpt2Config:
        return Gpt2Config.from_gguf(gguf)

    def build(self, gguf, device, registry=None) -> Gpt2Model:
        return Gpt2Model(self.config(gguf), device, TensorLoader(gguf, device, registry))

    def synth_spec(self):
        from .synth import GPT2  # test support: imported on demand only

        return GPT2
