"""Synthetic-model plans of the llama family for `orcd_core.testing.synth` (test support: imported
only when `Architecture.synth_spec()` is called, never on the serving path).

- `qwen2`   Qwen2.5-0.5B-Instruct Q4_K_M (24 layers, 896 wide, GQA 14/2, ff 4864, QKV biases, tied embeddings);
            untied, the plan reproduces the real Qwen2.5-Coder test file's tensor table exactly (a test checks)
- `llama`   SmolLM2-135M-Instruct Q4_1 (30 layers, 576 wide, GQA 9/3, ff 1536, tied embeddings)
- `phi3`    Phi-3-mini-4k-instruct Q4_K_M (32 layers, 3072 wide, 32 heads, fused attn_qkv, fused gate|up)

Tiny sizes keep head size, GQA ratio and rope dim; their widths keep the type mix's fall-backs (qwen2
224 and llama 192 are not multiples of 256, like 896 and 576; phi3 768 is).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from orcd_core import testmodels
from orcd_core.testing.synth import Dims, SynthSpec, TensorTable, layer_order

FULL = {
    "qwen2": Dims(24, 896, 4864, 14, 2, 64, 32768),
    "llama": Dims(30, 576, 1536, 9, 3, 64, 8192),
    "phi3": Dims(32, 3072, 8192, 32, 32, 96, 4096, rope_dim=96),
}
TINY = {
    "qwen2": Dims(2, 224, 1280, 14, 2, 16, 4096),
    "llama": Dims(2, 192, 512, 3, 1, 64, 2048),
    "phi3": Dims(2, 768, 512, 8, 8, 96, 4096, rope_dim=96),
}
MODEL_NAMES = {"qwen2": "Qwen2.5-0.5B-Instruct", "llama": "SmolLM2-135M-Instruct", "phi3": "Phi-3-mini-4k-instruct"}
RECIPES = {"qwen2": "Q4_K_M", "llama": "Q4_1", "phi3": "Q4_K_M"}
TIED = {"qwen2": True, "llama": True, "phi3": False}


def tensor_table(arch: str, d: Dims, n_vocab: int, tied: bool) -> TensorTable:
    """The converter's order: sorted by Hugging Face name."""
    E, F = d.n_embd, d.n_ff
    q_dim, kv_dim = d.n_head * d.head_dim, d.n_head_kv * d.head_dim
    t = TensorTable()
    if not tied:
        t.add("output.weight", (E, n_vocab))
    t.add("token_embd.weight", (E, n_vocab), fan_in=E)
    for i in layer_order(d.n_layer):
        b = f"blk.{i}."
        t.add(b + "attn_norm.weight", (E,), "norm")
        t.add(b + "ffn_down.weight", (F, E))
        if arch == "phi3":
            t.add(b + "ffn_up.weight", (E, 2 * F))  # gate | up fused by the checkpoint (gate_up_proj)
            t.add(b + "ffn_norm.weight", (E,), "norm")
            t.add(b + "attn_output.weight", (q_dim, E))
            t.add(b + "attn_qkv.weight", (E, q_dim + 2 * kv_dim))
            continue
        t.add(b + "ffn_gate.weight", (E, F))
        t.add(b + "ffn_up.weight", (E, F))
        t.add(b + "ffn_norm.weight", (E,), "norm")
        for proj, dim in (("k", kv_dim), ("output", E), ("q", q_dim), ("v", kv_dim)):
            if proj == "output":
                t.add(b + "attn_output.weight", (q_dim, E))
                continue
            if arch == "qwen2":
                t.add(b + f"attn_{proj}.bias", (dim,), "bias")
            t.add(b + f"attn_{proj}.weight", (E, dim))
    t.add("output_norm.weight", (E,), "norm")
    return t


def metadata(arch: str, d: Dims, n_vocab: int) -> list[tuple[str, object, str]]:
    md: list[tuple[str, object, str]] = [
        ("block_count", d.n_layer, "u32"),
        ("context_length", d.n_ctx, "u32"),
        ("embedding_length", d.n_embd, "u32"),
        ("feed_forward_length", d.n_ff, "u32"),
        ("attention.head_count", d.n_head, "u32"),
        ("attention.head_count_kv", d.n_head_kv, "u32"),
    ]
    if arch == "qwen2":
        md += [("rope.freq_base", 1_000_000.0, "f32"), ("attention.layer_norm_rms_epsilon", 1e-6, "f32")]
    elif arch == "llama":
        md += [
            ("rope.freq_base", 100_000.0, "f32"),
            ("attention.layer_norm_rms_epsilon", 1e-5, "f32"),
            ("vocab_size", n_vocab, "u32"),
            ("rope.dimension_count", d.head_dim, "u32"),
        ]
    elif arch == "phi3":
        md += [
            ("rope.scaling.original_context_length", d.n_ctx, "u32"),
            ("attention.layer_norm_rms_epsilon", 1e-5, "f32"),
            ("rope.dimension_count", d.rope_dim or d.head_dim, "u32"),
            ("rope.freq_base", 10_000.0, "f32"),
            ("attention.sliding_window", 2047, "u32"),
        ]
    return md


def default_vocab(arch: str, progress=None) -> Path:
    """SmolLM2's own file for llama; llama.cpp's vocab-only GGUFs for qwen2 and phi3."""
    if arch == "llama":
        return testmodels.fetch_model("smollm2", progress=progress)
    name = {"qwen2": "qwen2", "phi3": "phi-3"}[arch]
    return testmodels.llama_cpp_models_dir(progress=progress) / f"ggml-vocab-{name}.gguf"


def spec(arch: str) -> SynthSpec:
    return SynthSpec(
        model_name=MODEL_NAMES[arch],
        sizes={"full": FULL[arch], "tiny": TINY[arch]},
        recipe=RECIPES[arch],
        tied=TIED[arch],
        tensors=partial(tensor_table, arch),
        metadata=partial(metadata, arch),
        vocab=partial(default_vocab, arch),
    )
