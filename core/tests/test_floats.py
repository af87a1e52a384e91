"""The core's float tensor types F32, F16, BF16 against the oracle gguf-py (`gguf.quants.dequantize`),
bit-exact in float32 (NaN and inf bit patterns included)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from orcd_core.floats import BF16, F16, F32, FORMATS
from orcd_core.plugins import CORE_PLUGIN, load_plugins

by_name = pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)


def oracle(fmt, blocks: np.ndarray) -> np.ndarray:
    return np.asarray(gguf_dequantize(blocks, GGMLQuantizationType(fmt.ggml_type))).reshape(-1, 1)


def assert_bit_equal(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    diff = np.flatnonzero(ours.view(np.uint32) != ref.view(np.uint32))
    assert diff.size == 0, f"{diff.size} of {ours.size} values differ, first at {diff[0]}"


@by_name
def test_geometry_matches_gguf(fmt):
    qtype = GGMLQuantizationType(fmt.ggml_type)
    assert qtype.name == fmt.name
    assert (fmt.block_size, fmt.type_size) == GGML_QUANT_SIZES[qtype]


@by_name
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scale", [1.0, 0.01, 100.0])
def test_random_blocks_bit_exact(fmt, seed, scale):
    blocks = fmt.random_blocks(np.random.default_rng(seed), 4099, scale)
    assert blocks.dtype == np.uint8 and blocks.shape == (4099, fmt.type_size)
    assert_bit_equal(fmt.dequantize_blocks(blocks), oracle(fmt, blocks))


@by_name
def test_random_bytes_bit_exact_including_nan_and_inf(fmt):
    # every bit pattern, NaN and inf included, must come out exactly as gguf-py gives it
    blocks = np.random.default_rng(100).integers(0, 256, size=(1 << 16, fmt.type_size), dtype=np.uint8)
    if fmt.type_size == 2:  # make sure the specials are there
        blocks[:6] = np.array([0x7C00, 0xFC00, 0x7E00, 0x7F80, 0xFF80, 0x7FC1], dtype=np.uint16).view(np.uint8).reshape(6, 2)
    ours = fmt.dequantize_blocks(blocks)
    with np.errstate(invalid="ignore"):
        assert_bit_equal(ours, oracle(fmt, blocks))


@by_name
@pytest.mark.parametrize("scale", [1.0, 0.05, 20.0])
def test_random_blocks_finite_with_magnitude_of_scale(fmt, scale):
    values = fmt.dequantize_blocks(fmt.random_blocks(np.random.default_rng(5), 10_000, scale))
    assert np.isfinite(values).all()
    rms = float(np.sqrt(np.mean(values.astype(np.float64) ** 2)))
    assert 0.9 * scale < rms < 1.1 * scale, rms  # standard normal times scale


@by_name
def test_random_blocks_deterministic(fmt):
    a = fmt.random_blocks(np.random.default_rng(11), 64, 1.0)
    assert np.array_equal(a, fmt.random_blocks(np.random.default_rng(11), 64, 1.0))
    assert not np.array_equal(a, fmt.random_blocks(np.random.default_rng(12), 64, 1.0))


def test_bf16_random_blocks_round_to_nearest():
    # BF16 keeps float32's top 16 bits, rounded to nearest even: within half a bf16 ulp (2**-8 relative)
    rng = np.random.default_rng(3)
    expected = rng.standard_normal(1000, dtype=np.float32) * np.float32(2.0)
    got = BF16().dequantize_blocks(BF16().random_blocks(np.random.default_rng(3), 1000, 2.0)).reshape(-1)
    assert np.all(np.abs(got - expected) <= np.abs(expected) * 2.0**-8)
    assert np.any(got != expected)  # it did round


def test_core_registers_exactly_the_float_types():
    registry = load_plugins(allow=[CORE_PLUGIN])
    assert registry.failed == []
    core = [p for p in registry.plugins if p.name == CORE_PLUGIN]
    assert len(core) == 1 and core[0].quant_types == ["F32", "F16", "BF16"]
    assert {t: type(registry.quant_format(t)) for t in (0, 1, 30)} == {0: F32, 1: F16, 30: BF16}
