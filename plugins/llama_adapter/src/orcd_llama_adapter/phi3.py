"""Phi-3 (GGUF `phi3`; llama.cpp src/models/phi3.cpp): fused `attn_qkv`, fused gate|up in
`ffn_up` [2F, D] (gate first), NeoX RoPE over `rope.dimension_count` dims (partial rotary when
smaller than the head). Long-context files carry `rope_factors_long/short`: the long factors are
used when the served context exceeds `rope.scaling.original_context_length` (else the context
length), as llama.cpp's get_rope_factors; `rope.scaling.attn_factor` scales cos/sin.
llama.cpp disables Phi's sliding window (phi3.cpp), and so do we: every layer sees the full context.
Phi-3 scales q by 1/sqrt(hd) before attention with kq_scale 1: the same product as ours."""

from __future__ import annotations

from .family import LlamaFamily


class Phi3(LlamaFamily):
    name = "phi3"
    neox = True
