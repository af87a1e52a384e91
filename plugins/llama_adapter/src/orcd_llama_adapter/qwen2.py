"""Qwen2 (GGUF `qwen2`; llama.cpp src/models/qwen2.cpp): the llama decoder with q/k/v biases and
NeoX RoPE (theta 1e6 for Qwen2.5). The biases ride with the fused q|k|v projection."""

from __future__ import annotations

from .family import LlamaFamily


class Qwen2(LlamaFamily):
    name = "qwen2"
    neox = True
