"""Tiny gpt-oss and gpt2 GGUF files for the adapter tests, written with gguf-py's GGUFWriter.

Real tensor names, layouts and metadata keys, scaled dims that keep every feature (GQA, sinks, a
sliding window shorter than the test sequences, YaRN, MoE top-k with biases, fused c_attn, tied or
separate output), random weights from a seed in the types the real files use (MXFP4 experts, Q8_0
and F16 matrices, F32 norms and biases). The vocabulary is a small byte-level BPE (the 256 GPT-2
byte symbols, a few merges, two control tokens), enough for llama.cpp and our tokenizer to load.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter


def _byte_symbols() -> list[str]:
    """GPT-2's bytes_to_unicode: the printable symbol standing for each byte 0..255."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = dict(zip(keep, keep))
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = 256 + extra
            extra += 1
    return [chr(symbols[b]) for b in range(256)]


def _add_vocab(w: GGUFWriter, n_vocab: int) -> None:
    tokens = _byte_symbols()
    merges = []
    letters = "etaoinshrdlu"
    for a in letters:
        for b in letters:
            if len(tokens) < n_vocab - 2:
                tokens.append(a + b)
                merges.append(f"{a} {b}")
    tokens += [f"<|reserved_{i}|>" for i in range(len(tokens), n_vocab - 2)]
    tokens += ["<|endoftext|>", "<|return|>"]
    types = [1] * (n_vocab - 2) + [3, 3]  # normal, then two control tokens
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(n_vocab - 2)
    w.add_eos_token_id(n_vocab - 2)
    w.add_add_bos_token(False)


class _Weights:
    def __init__(self, w: GGUFWriter, seed: int):
        self.w, self.rng = w, np.random.default_rng(seed)

    def normal(self, *shape: int, scale: float = 1.0) -> np.ndarray:
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)

    def f32(self, name: str, *shape: int, scale: float = 1.0, offset: float = 0.0) -> None:
        self.w.add_tensor(name, offset + self.normal(*shape, scale=scale))

    def matrix(self, name: str, rows: int, cols: int, qtype: T, scale: float | None = None) -> None:
        """A [rows, cols] matrix with entries of std `scale` (1/sqrt(cols)), stored as `qtype`."""
        data = self.normal(rows, cols, scale=cols**-0.5 if scale is None else scale)
        if qtype == T.F32:
            self.w.add_tensor(name, data)
        elif qtype == T.F16:
            self.w.add_tensor(name, data.astype(np.float16))
        else:
            self.w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    def mxfp4(self, name: str, *shape: int, gain: float = 1.0) -> None:
        """Random valid MXFP4 blocks: random E2M1 codes (|value| up to 6) under an E8M0 scale chosen
        so that a row dotted with a unit-RMS input gives about `gain` (RMS of the codes is ~3.3)."""
        n_blocks = int(np.prod(shape)) // 32
        blocks = np.empty((n_blocks, 17), np.uint8)
        k = shape[-1]
        e = int(round(127 + np.log2(gain / (3.3 * np.sqrt(k)))))
        blocks[:, 0] = self.rng.integers(e - 1, e + 2, n_blocks)
        blocks[:, 1:] = self.rng.integers(0, 256, (n_blocks, 16))
        self.w.add_tensor(name, blocks.reshape(*shape[:-1], k // 32 * 17), raw_dtype=T.MXFP4)


def write_gpt_oss(path: Path, *, seed: int, n_layer: int = 3, n_embd: int = 128, n_head: int = 8,
                  n_head_kv: int = 2, head_dim: int = 32, n_expert: int = 8, n_expert_used: int = 4,
                  n_ff_exp: int = 64, n_vocab: int = 384, context_length: int = 4096,
                  sliding_window: int = 8, attn_type: T = T.Q8_0, expert_gain: float = 1.0,
                  up_exps_type: T = T.MXFP4) -> Path:
    """A gpt-oss file: GQA 4:1, sinks, SWA on even layers, YaRN factor 32 from 256 original
    positions, top-4 of 8 experts in MXFP4 with biases. `expert_gain` scales the gate/up experts'
    outputs (at 8, many exceed swiglu_oai's clamp of 7, which random 1/sqrt(fan-in) weights never do).
    `up_exps_type` other than MXFP4 stores the up experts in that type (gate and up then differ)."""
    w = GGUFWriter(path, "gpt-oss")
    w.add_name(f"tiny-gpt-oss-s{seed}")
    w.add_context_length(context_length)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff_exp)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_sliding_window(sliding_window)
    w.add_expert_count(n_expert)
    w.add_expert_used_count(n_expert_used)
    w.add_expert_feed_forward_length(n_ff_exp)
    w.add_rope_freq_base(150000.0)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(32.0)
    w.add_rope_scaling_orig_ctx_len(256)
    _add_vocab(w, n_vocab)
    g = _Weights(w, seed)
    D, E, F, nq, nkv = n_embd, n_expert, n_ff_exp, n_head * head_dim, n_head_kv * head_dim
    g.matrix("token_embd.weight", n_vocab, D, T.F16, scale=1.0)  # a residual stream of RMS ~1
    g.f32("output_norm.weight", D, scale=0.1, offset=1.0)
    g.matrix("output.weight", n_vocab, D, T.F16)
    for il in range(n_layer):
        p = f"blk.{il}."
        g.f32(p + "attn_norm.weight", D, scale=0.1, offset=1.0)
        for x, rows in (("q", nq), ("k", nkv), ("v", nkv)):
            g.matrix(p + f"attn_{x}.weight", rows, D, attn_type)
            g.f32(p + f"attn_{x}.bias", rows, scale=0.2)
        g.matrix(p + "attn_output.weight", D, nq, attn_type)
        g.f32(p + "attn_output.bias", D, scale=0.2)
        g.f32(p + "attn_sinks.weight", n_head, scale=1.0)
        g.f32(p + "post_attention_norm.weight", D, scale=0.1, offset=1.0)
        g.matrix(p + "ffn_gate_inp.weight", E, D, T.F32)
        g.f32(p + "ffn_gate_inp.bias", E, scale=0.5)
        g.mxfp4(p + "ffn_gate_exps.weight", E, F, D, gain=expert_gain)
        g.f32(p + "ffn_gate_exps.bias", E, F, scale=0.2)
        if up_exps_type == T.MXFP4:
            g.mxfp4(p + "ffn_up_exps.weight", E, F, D, gain=expert_gain)
        else:
            data = g.normal(E, F, D, scale=expert_gain / np.sqrt(D))
            w.add_tensor(p + "ffn_up_exps.weight", data.astype(np.float16) if up_exps_type == T.F16 else data)
        g.f32(p + "ffn_up_exps.bias", E, F, scale=0.2)
        g.mxfp4(p + "ffn_down_exps.weight", E, D, F, gain=1.0 / expert_gain)
        g.f32(p + "ffn_down_exps.bias", E, D, scale=0.2)
    _finish(w)
    return path


def write_gpt2(path: Path, *, seed: int, n_layer: int = 2, n_embd: int = 128, n_head: int = 4,
               n_ff: int = 512, n_vocab: int = 384, context_length: int = 128, tied: bool = False,
               matrix_type: T = T.F16) -> Path:
    """A gpt2 file: learned positions, LayerNorms with bias, fused c_attn with bias, GELU MLP."""
    w = GGUFWriter(path, "gpt2")
    w.add_name(f"tiny-gpt2-s{seed}")
    w.add_context_length(context_length)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_layer_norm_eps(1e-5)
    _add_vocab(w, n_vocab)
    g = _Weights(w, seed)
    D, F = n_embd, n_ff
    g.matrix("token_embd.weight", n_vocab, D, T.F16, scale=1.0)
    g.f32("position_embd.weight", context_length, D, scale=0.3)
    g.f32("output_norm.weight", D, scale=0.1, offset=1.0)
    g.f32("output_norm.bias", D, scale=0.1)
    if not tied:
        g.matrix("output.weight", n_vocab, D, T.F16)
    for il in range(n_layer):
        p = f"blk.{il}."
        for norm in ("attn_norm", "ffn_norm"):
            g.f32(p + norm + ".weight", D, scale=0.1, offset=1.0)
            g.f32(p + norm + ".bias", D, scale=0.1)
        g.matrix(p + "attn_qkv.weight", 3 * D, D, matrix_type)
        g.f32(p + "attn_qkv.bias", 3 * D, scale=0.2)
        g.matrix(p + "attn_output.weight", D, D, matrix_type)
        g.f32(p + "attn_output.bias", D, scale=0.2)
        g.matrix(p + "ffn_up.weight", F, D, matrix_type)
        g.f32(p + "ffn_up.bias", F, scale=0.2)
        g.matrix(p + "ffn_down.weight", D, F, matrix_type)
        g.f32(p + "ffn_down.bias", D, scale=0.2)
    _finish(w)
    return path


def _finish(w: GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
