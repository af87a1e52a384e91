"""Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 against the oracle gguf-py (`gguf.quants.dequantize`), bit-exact in float32."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from orcd_core.plugins import load_plugins
from orcd_quant_legacy import FORMATS

ENTRY_POINT = "quant-legacy"
TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
# byte offsets of each format's fp16 fields (d, m) -- the only bytes that can encode NaN/inf
F16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,)}
# the fp16 scale fields random_blocks keeps positive (Q4_1/Q5_1 `m` is a signed offset)
SCALE_FIELDS = {"Q4_0": (0,), "Q4_1": (0,), "Q5_0": (0,), "Q5_1": (0,), "Q8_0": (0,)}
SEEDS = (0, 1, 2, 3)

by_name = pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)


def oracle(fmt, blocks: np.ndarray) -> np.ndarray:
    return gguf_dequantize(blocks, GGMLQuantizationType(fmt.ggml_type)).reshape(-1, fmt.block_size)


def assert_bit_equal(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    diff = np.flatnonzero(ours.view(np.uint32) != ref.view(np.uint32))
    assert diff.size == 0, f"{diff.size} of {ours.size} values differ, first at {diff[0]}: {ours.flat[diff[0]]} != {ref.flat[diff[0]]}"


def sanitize_f16(fmt, blocks: np.ndarray) -> np.ndarray:
    """Random bytes with every fp16 field made finite (an all-ones exponent loses its top bit)."""
    blocks = blocks.copy()
    for off in F16_FIELDS[fmt.name]:
        h = blocks[:, off : off + 2].copy().view(np.uint16)
        h = np.where((h & 0x7C00) == 0x7C00, h & 0xBFFF, h).astype(np.uint16)
        blocks[:, off : off + 2] = h.view(np.uint8)
    return blocks


@by_name
def test_geometry_matches_gguf(fmt):
    qtype = GGMLQuantizationType(fmt.ggml_type)
    assert qtype.name == fmt.name
    assert (fmt.block_size, fmt.type_size) == GGML_QUANT_SIZES[qtype]


@by_name
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("scale", [1.0, 0.02, 40.0])
def test_random_valid_blocks_bit_exact(fmt, seed, scale):
    blocks = fmt.random_blocks(np.random.default_rng(seed), 257, scale)
    assert_bit_equal(fmt.dequantize_blocks(blocks), oracle(fmt, blocks))


@by_name
def test_random_bytes_bit_exact_across_chunks(fmt):
    # no encoding of these formats is invalid except a NaN/inf fp16 scale; negative scales included.
    # More blocks than one internal chunk (2**20 outputs), so the chunk seam is checked too.
    n = (1 << 20) // fmt.block_size + 5
    raw = np.random.default_rng(100).integers(0, 256, size=(n, fmt.type_size), dtype=np.uint8)
    blocks = sanitize_f16(fmt, raw)
    ours = fmt.dequantize_blocks(blocks)
    assert np.isfinite(ours).all()
    assert_bit_equal(ours, oracle(fmt, blocks))


@by_name
def test_dequantize_tensor_rows(fmt):
    # a [3, 64] tensor stored row-major as GGML writes it: 2 blocks per row
    raw = fmt.quantize_random(np.random.default_rng(7), (3, 2 * fmt.block_size), 0.5)
    assert raw.shape == (3, 2 * fmt.type_size)
    ours = fmt.dequantize(raw, (3, 2 * fmt.block_size))
    ref = gguf_dequantize(raw, GGMLQuantizationType(fmt.ggml_type))
    assert ref.shape == (3, 2 * fmt.block_size)
    assert_bit_equal(ours, ref)


@by_name
@pytest.mark.parametrize("scale", [1.0, 0.05, 20.0])
def test_random_blocks_finite_with_magnitude_of_scale(fmt, scale):
    values = fmt.dequantize_blocks(fmt.random_blocks(np.random.default_rng(5), 400, scale))
    assert np.isfinite(values).all()
    rms = float(np.sqrt(np.mean(values.astype(np.float64) ** 2)))
    # "magnitude about scale": rms between a tenth and the whole scale, nothing beyond 3x
    assert 0.1 * scale < rms < 1.0 * scale, rms
    assert float(np.abs(values).max()) <= 3.0 * scale
    assert float(np.abs(values).max()) >= 0.5 * scale


@by_name
def test_random_blocks_deterministic_and_quant_bits_random(fmt):
    a = fmt.random_blocks(np.random.default_rng(11), 512, 1.0)
    b = fmt.random_blocks(np.random.default_rng(11), 512, 1.0)
    c = fmt.random_blocks(np.random.default_rng(12), 512, 1.0)
    assert a.dtype == np.uint8 and a.shape == (512, fmt.type_size)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    scale_bytes = {o + k for o in F16_FIELDS[fmt.name] for k in (0, 1)}
    quant_cols = [i for i in range(fmt.type_size) if i not in scale_bytes]
    # every bit of every non-scale byte takes both values somewhere among 512 blocks
    assert (np.bitwise_or.reduce(a[:, quant_cols], axis=0) == 0xFF).all()
    assert (np.bitwise_and.reduce(a[:, quant_cols], axis=0) == 0x00).all()
    # every fp16 field is finite, the scales positive
    for off in F16_FIELDS[fmt.name]:
        h = a[:, off : off + 2].copy().view(np.float16).astype(np.float32)
        assert np.isfinite(h).all()
        assert off not in SCALE_FIELDS[fmt.name] or (h > 0).all()


@by_name
@pytest.mark.parametrize("scale", [0.0, -1.0, float("inf"), float("nan"), 1e12, 1e-12])
def test_random_blocks_refuses_scales_fp16_cannot_hold(fmt, scale):
    with pytest.raises(ValueError, match=fmt.name):
        fmt.random_blocks(np.random.default_rng(0), 64, scale)


@by_name
def test_rejects_wrong_block_shape(fmt):
    with pytest.raises(ValueError, match=fmt.name):
        fmt.dequantize_blocks(np.zeros((2, fmt.type_size + 1), dtype=np.uint8))
    with pytest.raises(TypeError, match=fmt.name):
        fmt.dequantize_blocks(np.zeros((2, fmt.type_size), dtype=np.int8))


def test_plugin_registers_exactly_its_types():
    registry = load_plugins(allow=[ENTRY_POINT])
    assert registry.failed == []
    mine = [p for p in registry.plugins if p.name == ENTRY_POINT]
    assert len(mine) == 1 and mine[0].quant_types == TYPES
    for fmt in FORMATS:
        assert registry.quant_format(fmt.ggml_type) is fmt
        assert registry.owner("quant", fmt.ggml_type) == ENTRY_POINT
        assert fmt.cuda_source is None or isinstance(fmt.cuda_source, tuple)


def test_import_does_not_import_cupy():
    code = "import sys, orcd_quant_legacy; assert 'cupy' not in sys.modules, 'cupy imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
