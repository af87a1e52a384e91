"""The pre-norm decoder shared by qwen2, llama and phi3 (llama.cpp src/models/{qwen2,llama,phi3}.cpp):

    x = tok_embd[ids]
    for each block:
        x = x + attn(rms_norm(x))        # RoPE on q, k; causal GQA attention over the KV cache
        x = x + down(silu(gate(h)) * up(h)), h = rms_norm(x)
    logits = output(rms_norm(x))

The architectures differ only in their tensor maps, biases and RoPE flavour (see each module).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from orcd_core.device import Device, KVCache, RopeSpec, Step
from orcd_core.weights import Proj, TensorLoader

from .config import DecoderConfig

#: The file's tensors, by role. `{i}` is the block index. Fused variants in the file come first.
TENSORS = {
    "tok_embd": "token_embd.weight",
    "output_norm": "output_norm.weight",
    "output": "output.weight",  # absent: tied to tok_embd
    "output_b": "output.bias",
    "rope_freqs": "rope_freqs.weight",  # llama-3 rope scaling (written by the converter)
    "rope_long": "rope_factors_long.weight",  # longrope (phi3)
    "rope_short": "rope_factors_short.weight",
    "attn_norm": "blk.{i}.attn_norm.weight",
    "wqkv": "blk.{i}.attn_qkv.weight",
    "bqkv": "blk.{i}.attn_qkv.bias",
    "wq": "blk.{i}.attn_q.weight",
    "wk": "blk.{i}.attn_k.weight",
    "wv": "blk.{i}.attn_v.weight",
    "bq": "blk.{i}.attn_q.bias",
    "bk": "blk.{i}.attn_k.bias",
    "bv": "blk.{i}.attn_v.bias",
    "wo": "blk.{i}.attn_output.weight",
    "bo": "blk.{i}.attn_output.bias",
    "ffn_norm": "blk.{i}.ffn_norm.weight",
    "ffn_gate": "blk.{i}.ffn_gate.weight",
    "ffn_up": "blk.{i}.ffn_up.weight",  # phi3: gate|up fused in the file, [2F, D]
    "ffn_down": "blk.{i}.ffn_down.weight",
    "ffn_gate_b": "blk.{i}.ffn_gate.bias",
    "ffn_up_b": "blk.{i}.ffn_up.bias",
    "ffn_down_b": "blk.{i}.ffn_down.bias",
}


def tname(role: str, i: int | None = None) -> str:
    return TENSORS[role].format(i=i)


@dataclass
class Block:
    attn_norm: Any  # [D]
    qkv: Proj  # D -> q [Hq*hd] | k [Hkv*hd] | v [Hkv*hd]
    wo: Any  # [D, Hq*hd]
    bo: Any  # [D] or None
    ffn_norm: Any  # [D]
    gate_up: Proj  # D -> gate [F] | up [F]
    down: Any  # [D, F]
    down_b: Any  # [D] or None


@dataclass
class RopeFactors:
    """Per-pair frequency divisors the file provides: `freqs` (llama-3) or `long`/`short` (longrope)."""

    freqs: Any = None
    long: Any = None
    short: Any = None

    def pick(self, n_ctx: int, n_ctx_orig: int):
        """llama.cpp's llama_model::get_rope_factors: rope_freqs if present, else the long factors
        when the context exceeds the original training context, else the short ones."""
        if self.freqs is not None:
            return self.freqs
        return self.long if n_ctx > n_ctx_orig else self.short


def load_qkv(L: TensorLoader, c: DecoderConfig, i: int) -> Proj:
    """q|k|v: the file's fused attn_qkv when present, else q, k, v fused here when types agree."""
    if L.has(tname("wqkv", i)):
        total = c.n_q + 2 * c.n_kv
        bias = [tname("bqkv", i)] if L.has(tname("bqkv", i)) else None
        fused = L.proj(tname("wqkv", i), [(tname("wqkv", i), total)], c.n_embd, bias)
        return Proj(fused.weights, [c.n_q, c.n_kv, c.n_kv])
    parts = [(tname("wq", i), c.n_q), (tname("wk", i), c.n_kv), (tname("wv", i), c.n_kv)]
    return L.proj(f"blk.{i}.attn_qkv", parts, c.n_embd, [tname("bq", i), tname("bk", i), tname("bv", i)])


def load_gate_up(L: TensorLoader, c: DecoderConfig, i: int) -> Proj:
    """gate|up: the file's fused ffn_up [2F, D] (phi3) when there is no ffn_gate, else fused here."""
    if not L.has(tname("ffn_gate", i)):
        fused = L.proj(tname("ffn_up", i), [(tname("ffn_up", i), 2 * c.n_ff)], c.n_embd)
        return Proj(fused.weights, [c.n_ff, c.n_ff])
    parts = [(tname("ffn_gate", i), c.n_ff), (tname("ffn_up", i), c.n_ff)]
    return L.proj(f"blk.{i}.ffn_gate_up", parts, c.n_embd, [tname("ffn_gate_b", i), tname("ffn_up_b", i)])


class DecoderModel:
    """Weights of a llama-family model on a device, and its forward pass."""

    def __init__(self, config: DecoderConfig, device: Device, L: TensorLoader):
        c = self.config = config
        self.device = device
        D = c.n_embd
        self.tok_embd = L.weight(tname("tok_embd"), [c.n_vocab, D])
        self.output_norm = L.array(tname("output_norm"), [D])
        self.output = L.weight(tname("output"), [c.n_vocab, D]) if L.has(tname("output")) else self.tok_embd
        self.output_b = L.optional_array(tname("output_b"), [c.n_vocab])
        half = c.rope.n_rot // 2
        self.rope_factors = RopeFactors(*(L.optional_array(tname(r), [half]) for r in ("rope_freqs", "rope_long", "rope_short")))
        self.blocks = [
            Block(
                attn_norm=L.array(tname("attn_norm", i), [D]),
                qkv=load_qkv(L, c, i),
                wo=L.weight(tname("wo", i), [D, c.n_q]),
                bo=L.optional_array(tname("bo", i), [D]),
                ffn_norm=L.array(tname("ffn_norm", i), [D]),
                gate_up=load_gate_up(L, c, i),
                down=L.weight(tname("ffn_down", i), [D, c.n_ff]),
                down_b=L.optional_array(tname("ffn_down_b", i), [D]),
            )
            for i in range(c.n_layer)
        ]
        L.finish()

    def rope_spec(self, n_ctx: int) -> RopeSpec:
        ff = self.rope_factors.pick(n_ctx, self.config.rope.n_ctx_orig)
        return replace(self.config.rope, freq_factors=ff)

    def new_kv_cache(self, n_ctx: int) -> KVCache:
        c = self.config
        return self.device.new_kv_cache(c.n_layer, n_ctx, c.n_head_kv, c.head_dim)

    def forward(self, step: Step, cache: KVCache, *, all_logits: bool = False):
        """Logits of the step's tokens: [T, V] with `all_logits`, else [1, V] (the last token)."""
        c, dev = self.config, self.device
        rope = self.rope_spec(cache.n_ctx)
        x = dev.embedding(self.tok_embd, step.ids)  # [T, D]
        for il, B in enumerate(self.blocks):
            x = dev.add(x, self.attention(il, B, dev.rms_norm(x, B.attn_norm, c.norm_eps), step, cache, rope))
            x = dev.add(x, self.mlp(B, dev.rms_norm(x, B.ffn_norm, c.norm_eps)))
        if not all_logits:
            x = x[-1:]  # [1, D]
        return dev.linear(dev.rms_norm(x, self.output_norm, c.norm_eps), self.output, self.output_b)  # [T, V]

    def attention(self, il: int, B: Block, h, step: Step, cache: KVCache, rope: RopeSpec):
        c, dev, T = self.config, self.device, step.T
        q, k, v = B.qkv(dev, h)  # [T, Hq*hd], [T, Hkv*hd], [T, Hkv*hd]
        q = dev.rope(q.reshape(T, c.n_head, c.head_dim), step.positions, rope)  # [T, Hq, hd]
        k = dev.rope(k.reshape(T, c.n_head_kv, c.head_dim), step.positions, rope)  # [T, Hkv, hd]
        v = v.reshape(T, c.n_head_kv, c.head_dim)  # [T, Hkv, hd]
        o = dev.attention(q, k, v, cache, il, step, scale=1.0 / math.sqrt(c.head_dim))  # [T, Hq, hd]
        return dev.linear(o.reshape(T, c.n_q), B.wo, B.bo)  # [T, D]

    def mlp(self, B: Block, h):
        dev = self.device
        gate, up = B.gate_up(dev, h)  # [T, F] each
        return dev.linear(dev.silu_mul(gate, up), B.down, B.down_b)  # [T, D]
