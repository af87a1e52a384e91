"""Q4_K, Q5_K, Q6_K against the oracle gguf-py (`gguf.quants.dequantize`), bit-exact in float32.

The checks themselves are core's conformance kit (`orcd_core.testing.quant`); this file gives the
formats' layout facts."""

from __future__ import annotations

from orcd_core.testing.quant import QuantFormatConformance
from orcd_quant_q4k import FORMATS


class TestKQuantFormats(QuantFormatConformance):
    formats = FORMATS
    entry_point = "quant-q4k"
    package = "orcd_quant_q4k"
    types = ["Q4_K", "Q5_K", "Q6_K"]
    # byte offsets of each format's fp16 fields (d, dmin) -- the only bytes that can encode NaN/inf
    f16_fields = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
    # the fp16 scale fields random_blocks keeps positive
    scale_fields = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
