"""gpt-oss (GGUF `general.architecture` = "gpt-oss"), as llama.cpp runs it (src/models/openai-moe.cpp).

A pre-norm transformer with RMSNorm; attention with q/k/v/o biases, GQA, NeoX RoPE with YaRN
scaling, learned per-head sinks in the softmax denominator and a sliding window on alternate layers;
the feed-forward is a mixture of experts: router (+ bias) -> top-k -> softmax over the chosen logits
-> per-expert gate|up (+ biases) -> swiglu_oai (alpha 1.702, clamp 7.0) -> down (+ bias) -> weighted
sum.

    x = x + attn(rms_norm(x))            # sinks; window on the layers llama.cpp marks SWA
    x = x + moe(rms_norm(x))             # post_attention_norm is the pre-MoE norm
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from orcd_core.architecture import Architecture
from orcd_core.device import Device, KVCache, RopeSpec, Step
from orcd_core.errors import GGUFMetadataError
from orcd_core.gguf_file import MAX_CONTEXT_LENGTH, embedding_rows
from orcd_core.hparams import uniform_per_layer
from orcd_core.rope import rope_freq_base, rope_spec_from_metadata
from orcd_core.shape import ModelShape
from orcd_core.weights import Proj, TensorLoader


ARCH = "gpt-oss"
SWIGLU_ALPHA = 1.702  # llama.cpp build_moe_ffn, LLM_FFN_SWIGLU_OAI_MOE
SWIGLU_LIMIT = 7.0
#: Largest width and expert count a file may claim (gpt-oss-120b: 128 experts, widths ~3k).
MAX_WIDTH = 1 << 20
MAX_EXPERTS = 1 << 12


@dataclass(frozen=True)
class GptOssConfig:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    norm_eps: float
    context_length: int | None  # None when the file does not say
    sliding_window: int
    swa_layers: tuple[bool, ...]  # True: layer il attends within the sliding window
    rope: RopeSpec  # full-attention layers
    rope_swa: RopeSpec  # sliding-window layers (freq_base_swa where the file sets it)

    def kv_windows(self) -> list[int]:
        """Per-layer sliding window of the KV cache (0 = the whole context)."""
        return [self.sliding_window if swa else 0 for swa in self.swa_layers]

    def shape(self) -> ModelShape:
        """The FFN width is the experts' times the experts used (the activations of one token)."""
        return ModelShape(
            n_layer=self.n_layer, n_embd=self.n_embd, n_vocab=self.n_vocab, context_length=self.context_length,
            n_head=self.n_head, n_head_kv=(self.n_head_kv,) * self.n_layer, head_dim_k=self.head_dim,
            head_dim_v=self.head_dim, kv_windows=tuple(self.kv_windows()),
            ffn_width=self.n_ff_exp * self.n_expert_used,
        )

    @classmethod
    def from_gguf(cls, model) -> "GptOssConfig":
        def count(suffix: str, hi: int, default: int | None = None) -> int:
            """A positive integer in 1..hi (one value, or a per-layer array of equal values)."""
            return uniform_per_layer(model, f"{ARCH}.{suffix}", default, hi=hi)

        # each value range-checked where it is read, against the file and the values before it
        n_layer = model.int_value(f"{ARCH}.block_count", lo=1, hi=max(1, len(model.tensors)))
        n_embd = count("embedding_length", MAX_WIDTH)
        n_head = count("attention.head_count", n_embd)
        n_head_kv = count("attention.head_count_kv", n_head, n_head)
        if n_head % n_head_kv:
            raise GGUFMetadataError(model.path, f"{ARCH}: {n_head} heads is not a multiple of {n_head_kv} KV heads")
        head_dim = count("attention.key_length", MAX_WIDTH, n_embd // n_head)
        if count("attention.value_length", MAX_WIDTH, head_dim) != head_dim:
            raise GGUFMetadataError(model.path, f"{ARCH}: value_length != key_length is not supported")
        n_ff_exp = count("expert_feed_forward_length", MAX_WIDTH)
        n_expert = count("expert_count", MAX_EXPERTS)
        n_expert_used = count("expert_used_count", n_expert)
        return cls(
            n_vocab=embedding_rows(model),
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            n_expert=n_expert,
            n_expert_used=n_expert_used,
            n_ff_exp=n_ff_exp,
            norm_eps=model.float_value(f"{ARCH}.attention.layer_norm_rms_epsilon", lo=0.0, hi=1.0, lo_open=True),
            context_length=model.int_value(f"{ARCH}.context_length", None, lo=1, hi=MAX_CONTEXT_LENGTH),
            sliding_window=count("attention.sliding_window", MAX_CONTEXT_LENGTH),
            swa_layers=swa_pattern(model, n_layer),
            **rope_specs(model, head_dim),
        )


def swa_pattern(model, n_layer: int) -> tuple[bool, ...]:
    """Which layers use the sliding window, as llama.cpp's load_swa_pattern(ml, 2): an array
    `attention.sliding_window_pattern` lists them; an integer n (default 2 for gpt-oss) makes layer
    il SWA when il % n < n - 1 (so layers 0, 2, 4, ... with n = 2); n = 0 makes every layer SWA."""
    value = model.metadata.get(f"{ARCH}.attention.sliding_window_pattern", 2)
    if isinstance(value, list):
        if len(value) < n_layer:
            raise GGUFMetadataError(model.path, f"{ARCH}.attention.sliding_window_pattern has {len(value)} entries "
                                                f"for {n_layer} layers")
        return tuple(bool(v) for v in value[:n_layer])
    n = model.int_value(f"{ARCH}.attention.sliding_window_pattern", 2, lo=0, hi=1 << 16)
    return tuple(n == 0 or il % n < n - 1 for il in range(n_layer))


#: rope keys llama.cpp does not read for gpt-oss: YaRN's betas stay 32 / 1, ext_factor follows the
#: scaling type, attn_factor starts at 1, and there is no legacy rope.scale_linear
ROPE_IGNORED = ("rope.scale_linear", "rope.scaling.yarn_ext_factor", "rope.scaling.yarn_attn_factor",
                "rope.scaling.yarn_beta_fast", "rope.scaling.yarn_beta_slow")


def rope_specs(model, head_dim: int) -> dict[str, RopeSpec]:
    """RoPE of the full and the SWA layers: `orcd_core.rope.rope_spec_from_metadata` (which derives
    YaRN's parameters as llama_context does) with gpt-oss's overrides (scaling none, linear or yarn;
    the keys of ROPE_IGNORED unread); the SWA layers use rope.freq_base_swa where the file sets it."""
    n_rot = model.int_value(f"{ARCH}.rope.dimension_count", head_dim, lo=2, hi=head_dim)
    if n_rot % 2:
        raise GGUFMetadataError(model.path, f"{ARCH}.rope.dimension_count is {n_rot}, expected an even number")
    rope = rope_spec_from_metadata(model, n_rot=n_rot, neox=True, arch=ARCH, scaling_types=("none", "linear", "yarn"),
                                   ignored=ROPE_IGNORED)
    return {"rope": rope, "rope_swa": replace(rope, base=rope_freq_base(model, f"{ARCH}.rope.freq_base_swa", rope.base))}


@dataclass
class Block:
    attn_norm: Any  # [D]
    qkv: Proj  # q|k|v with biases: [T, D] -> [T, Hq hd], [T, Hkv hd], [T, Hkv hd]
    wo: Any  # [D, Hq hd]
    bo: Any  # [D]
    sinks: Any  # [Hq]
    ffn_norm: Any  # [D] (GGUF: post_attention_norm)
    router: Any  # [E, D]
    router_b: Any  # [E]
    gate_up: Any  # [E, 2F, D]: rows [0, F) gate, [F, 2F) up
    gate_up_b: Any  # [E, 2F]
    down: Any  # [E, D, F]
    down_b: Any  # [E, D]


class GptOssModel:
    """gpt-oss weights on a device and its forward pass."""

    def __init__(self, config: GptOssConfig, device: Device, tensors: TensorLoader):
        c, t, dev = config, tensors, device
        self.config, self.device = c, device
        D, E, F, hd = c.n_embd, c.n_expert, c.n_ff_exp, c.head_dim
        nq, nkv = c.n_head * hd, c.n_head_kv * hd
        self.tok_embd = t.weight("token_embd.weight", [c.n_vocab, D])
        self.output_norm = t.array("output_norm.weight", [D])
        self.output = t.weight("output.weight", [c.n_vocab, D])
        self.blocks: list[Block] = []
        for il in range(c.n_layer):
            p = f"blk.{il}."
            if t.has(p + "attn_qkv.weight"):  # llama.cpp also accepts one fused tensor
                qkv = t.proj_split(p + "attn_qkv", [nq, nkv, nkv], D)
            else:
                parts = [(p + f"attn_{x}.weight", n) for x, n in (("q", nq), ("k", nkv), ("v", nkv))]
                qkv = t.proj(p + "attn_qkv.weight", parts, D, [p + f"attn_{x}.bias" for x in "qkv"])
            gate_up = [(p + "ffn_gate_exps.weight", [E, F, D]), (p + "ffn_up_exps.weight", [E, F, D])]
            self.blocks.append(Block(
                attn_norm=t.array(p + "attn_norm.weight", [D]),
                qkv=qkv,
                wo=t.weight(p + "attn_output.weight", [D, nq]),
                bo=t.array(p + "attn_output.bias", [D]),
                sinks=t.array(p + "attn_sinks.weight", [c.n_head]),
                ffn_norm=t.array(p + "post_attention_norm.weight", [D]),
                router=t.weight(p + "ffn_gate_inp.weight", [E, D]),
                router_b=t.array(p + "ffn_gate_inp.bias", [E]),
                # gate|up fused into the [E, 2F, D] layout of Device.moe (F16 if their types differ)
                gate_up=t.fused(p + "ffn_gate_up_exps.weight", gate_up)
                or t.fused_f16(p + "ffn_gate_up_exps.weight", gate_up),
                gate_up_b=dev.upload_array(p + "ffn_gate_up_exps.bias", np.concatenate(
                    [t.host(p + "ffn_gate_exps.bias", [E, F]), t.host(p + "ffn_up_exps.bias", [E, F])], axis=1)),
                down=t.weight(p + "ffn_down_exps.weight", [E, D, F]),
                down_b=t.array(p + "ffn_down_exps.bias", [E, D]),
            ))
        t.finish()

    # -- the cache this model needs ----------------------------------------------------------------

    def kv_windows(self) -> list[int]:
        """Per-layer sliding window of the KV cache (0 = the whole context)."""
        return self.config.kv_windows()

    def new_kv_cache(self, n_ctx: int) -> KVCache:
        c = self.config
        return self.device.new_kv_cache(c.n_layer, n_ctx, c.n_head_kv, c.head_dim, self.kv_windows())

    # -- forward -------------------------------------------------------------------------------

    def forward(self, step: Step, cache: KVCache, *, all_logits: bool = False):
        """Logits of the step's tokens: [T, V] with `all_logits`, else [1, V] (the last token)."""
        dev = self.device
        x = dev.embedding(self.tok_embd, step.ids)  # [T, D]
        for il, B in enumerate(self.blocks):
            x = dev.add(x, self.attention(il, B, dev.rms_norm(x, B.attn_norm, self.config.norm_eps), step, cache))
            x = dev.add(x, self.experts(B, dev.rms_norm(x, B.ffn_norm, self.config.norm_eps)))
        if not all_logits:
            x = x[-1:]  # [1, D]
        return dev.linear(dev.rms_norm(x, self.output_norm, self.config.norm_eps), self.output)  # [T, V]

    def attention(self, il: int, B: Block, h, step: Step, cache: KVCache):
        c, dev, T = self.config, self.device, step.T
        hd, nq = c.head_dim, c.n_head * c.head_dim
        q, k, v = B.qkv(dev, h)  # [T, nq], [T, nkv], [T, nkv]
        swa = c.swa_layers[il]
        rope = c.rope_swa if swa else c.rope
        q = dev.rope(q.reshape(T, c.n_head, hd), step.positions, rope)  # [T, Hq, hd]
        k = dev.rope(k.reshape(T, c.n_head_kv, hd), step.positions, rope)  # [T, Hkv, hd]
        v = v.reshape(T, c.n_head_kv, hd)  # [T, Hkv, hd]
        o = dev.attention(q, k, v, cache, il, step, scale=1.0 / math.sqrt(hd), sinks=B.sinks,
                          window=c.sliding_window if swa else 0)  # [T, Hq, hd]
        return dev.linear(o.reshape(T, nq), B.wo, B.bo)  # [T, D]

    def experts(self, B: Block, h):
        return self.device.moe(h, B.router, B.router_b, B.gate_up, B.gate_up_b, B.down, B.down_b,
                               top_k=self.config.n_expert_used, act="swiglu_oai",
                               alpha=SWIGLU_ALPHA, limit=SWIGLU_LIMIT)  # [T, D]


class GptOss(Architecture):
    name = ARCH
    required_metadata = {
        "embedding_length": int,
        "block_count": int,
        "attention.head_count": int,
        "attention.layer_norm_rms_epsilon": float,
        "attention.sliding_window": int,
        "expert_count": int,
        "expert_used_count": (int, list),
        "expert_feed_forward_length": (int, list),
    }

    def config(self, gguf) -> GptOssConfig:
        return GptOssConfig.from_gguf(gguf)

    def build(self, gguf, device, registry=None) -> GptOssModel:
        return GptOssModel(self.config(gguf), device, TensorLoader(gguf, device, registry))

    def synth_spec(self):
        from .synth import GPT_OSS  # test support: imported on demand only

        return GPT_OSS
