"""The example plugin's tests: the format matches gguf-py's reference, and the worker discovers it
through its entry point once the distribution is installed."""

from __future__ import annotations

import numpy as np
import pytest

from orcd_quant_example import IQ4_NL
from orcd_quant_example.iq4_nl import KVALUES


def test_dequantize_matches_gguf_py_bit_exactly():
    gguf_quants = pytest.importorskip("gguf.quants")
    from gguf import GGMLQuantizationType

    fmt = IQ4_NL()
    rng = np.random.default_rng(1234)
    blocks = fmt.random_blocks(rng, 4096, scale=0.1)
    ours = fmt.dequantize(blocks, (64, 64 * 32))
    ref = gguf_quants.dequantize(blocks.reshape(64, -1), GGMLQuantizationType.IQ4_NL)
    assert ref.shape == ours.shape and np.any(ours != 0)
    np.testing.assert_array_equal(ours, ref)  # bit-exact in fp32


def test_random_blocks_are_valid_and_scaled():
    fmt = IQ4_NL()
    values = fmt.dequantize(fmt.random_blocks(np.random.default_rng(7), 1000, scale=2.0), (1000 * 32,))
    assert np.all(np.isfinite(values))
    assert 0.5 < np.abs(values).max() / 2.0 < 3.0  # magnitude about `scale`
    assert len(np.unique(values)) > 1000  # not degenerate


def test_discovered_through_the_entry_point():
    from orcd_core.plugins import load_plugins

    registry = load_plugins()
    assert registry.failed == [], registry.describe_installed()
    fmt = registry.quant_format_by_name("IQ4_NL")
    assert isinstance(fmt, IQ4_NL) and registry.owner("quant", 20) == "quant-example"
    info = next(p for p in registry.plugins if p.name == "quant-example")
    assert (info.distribution, info.version, info.quant_types) == ("orcd-quant-example", "0.1.0", ["IQ4_NL"])


def test_cuda_source_table_is_kvalues():
    """The four packed words of iq4_nl.cu are KVALUES + 128, byte i = level i (little-endian)."""
    import re

    fmt = IQ4_NL()
    source = fmt.cuda_source_text()
    assert source is not None and "ORCD_QUANT_KERNELS(IQ4_NL, FmtIQ4_NL)" in source
    words = [int(re.search(rf"#define IQ4NL_T{i} 0x([0-9A-Fa-f]{{8}})u", source).group(1), 16) for i in range(4)]
    levels = np.frombuffer(np.array(words, dtype="<u4").tobytes(), dtype=np.uint8).astype(np.int32) - 128
    np.testing.assert_array_equal(levels, KVALUES.astype(np.int32))
