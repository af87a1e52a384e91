"""Llama (GGUF `llama`; llama.cpp src/models/llama.cpp): SmolLM2, Llama-2/3. Normal (adjacent
pair) RoPE over the full head. Llama-3's rope scaling arrives as the `rope_freqs.weight` tensor the
converter computes from `rope_scaling` (low/high frequency factors), which the decoder divides the
angles by, as llama.cpp does; `rope.scaling.type`/`factor` (linear, yarn) come from the metadata.
Optional attn_output / ffn biases are honoured."""

from __future__ import annotations

from .family import LlamaFamily


class Llama(LlamaFamily):
    name = "llama"
    neox = False
    full_rotary = True
