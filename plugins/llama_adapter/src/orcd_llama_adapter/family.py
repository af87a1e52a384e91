"""The `Architecture` base of the llama family: config from metadata, strict build."""

from __future__ import annotations

from typing import ClassVar

from orcd_core.architecture import Architecture
from orcd_core.weights import TensorLoader

from .config import REQUIRED_METADATA, DecoderConfig
from .decoder import DecoderModel


class LlamaFamily(Architecture):
    #: GGML_ROPE_TYPE_NEOX (pairs i, i + n_rot/2) rather than NORMAL (pairs 2i, 2i+1)
    neox: ClassVar[bool]
    #: rope.dimension_count must equal the head size (llama.cpp checks this for `llama`)
    full_rotary: ClassVar[bool] = False
    required_metadata = REQUIRED_METADATA

    def config(self, gguf) -> DecoderConfig:
        return DecoderConfig.from_gguf(gguf, neox=self.neox, full_rotary=self.full_rotary)

    def build(self, gguf, device, registry=None) -> DecoderModel:
        return DecoderModel(self.config(gguf), device, TensorLoader(gguf, device, registry))

    def synth_spec(self):
        from .synth import spec  # test support: imported on demand only

        return spec(self.name)
