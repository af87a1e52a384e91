"""Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 against the oracle gguf-py (`gguf.quants.dequantize`), bit-exact in float32.

The checks themselves are core's conformance kit (`orcd_core.testing.quant`); this file gives the
formats' layout facts."""

from __future__ import annotations

from orcd_core.testing.quant import QuantFormatConformance
from orcd_quant_legacy import FORMATS


class TestLegacyFormats(QuantFormatConformance):
    formats = FORMATS
    entry_point = "quant-legacy"
    package = "orcd_quant_legacy"
    types = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
    # byte offsets of each format's fp16 fields (d, m) -- the only bytes that can encode NaN/inf
    f16_fields = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,)}
    # the fp16 scale fields random_blocks keeps positive (Q4_1/Q5_1 `m` is a signed offset)
    scale_fields = {"Q4_0": (0,), "Q4_1": (0,), "Q5_0": (0,), "Q5_1": (0,), "Q8_0": (0,)}
