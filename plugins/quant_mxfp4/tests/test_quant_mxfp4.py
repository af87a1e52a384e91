"""MXFP4 against the oracle gguf-py (`gguf.quants.dequantize`), bit-exact in float32."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from orcd_core.plugins import load_plugins
from orcd_core.testing.quant import assert_bit_equal, assert_import_does_not_import_cupy, gguf_oracle
from orcd_quant_mxfp4 import FORMATS, MXFP4
from orcd_quant_mxfp4.formats import e8m0_to_f32_half

ENTRY_POINT = "quant-mxfp4"
FMT = MXFP4()
SEEDS = (0, 1, 2, 3)


def oracle(blocks: np.ndarray) -> np.ndarray:
    return gguf_oracle(FMT, blocks)


def test_geometry_matches_gguf():
    assert GGMLQuantizationType(FMT.ggml_type).name == FMT.name == "MXFP4"
    assert (FMT.block_size, FMT.type_size) == GGML_QUANT_SIZES[GGMLQuantizationType.MXFP4] == (32, 17)


def test_half_scale_of_every_e8m0_value():
    # 2**(e - 128) for every byte, subnormals (e = 0, 1) included; exact powers of two in float64
    e = np.arange(256)
    assert np.array_equal(e8m0_to_f32_half(e.astype(np.uint8)).astype(np.float64), np.ldexp(1.0, e - 128))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("scale", [1.0, 0.003, 250.0])
def test_random_valid_blocks_bit_exact(seed, scale):
    blocks = FMT.random_blocks(np.random.default_rng(seed), 257, scale)
    assert_bit_equal(FMT.dequantize_blocks(blocks), oracle(blocks))


@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")  # gguf-py
def test_random_bytes_bit_exact_across_chunks():
    # every byte string is a valid MXFP4 block (e = 253..255 overflow to +-inf in float32, in both);
    # more blocks than one internal chunk (2**20 outputs), so the chunk seam is checked too
    n = (1 << 20) // FMT.block_size + 5
    blocks = np.random.default_rng(100).integers(0, 256, size=(n, FMT.type_size), dtype=np.uint8)
    blocks[:5, 0] = [0, 1, 2, 254, 255]  # the subnormal and the largest scales for sure
    ours = FMT.dequantize_blocks(blocks)
    assert not np.isnan(ours).any()
    assert_bit_equal(ours, oracle(blocks))


def test_dequantize_tensor_rows():
    raw = FMT.quantize_random(np.random.default_rng(7), (3, 64), 0.5)
    assert raw.shape == (3, 2 * FMT.type_size)
    ref = gguf_dequantize(raw, GGMLQuantizationType.MXFP4)
    assert ref.shape == (3, 64)
    assert_bit_equal(FMT.dequantize(raw, (3, 64)), ref)


@pytest.mark.parametrize("scale", [1.0, 0.05, 20.0])
def test_random_blocks_finite_with_magnitude_of_scale(scale):
    values = FMT.dequantize_blocks(FMT.random_blocks(np.random.default_rng(5), 400, scale))
    assert np.isfinite(values).all()
    rms = float(np.sqrt(np.mean(values.astype(np.float64) ** 2)))
    # "magnitude about scale": rms between a tenth and the whole scale, the largest in [scale/2, scale]
    assert 0.1 * scale < rms < 1.0 * scale, rms
    assert 0.5 * scale <= float(np.abs(values).max()) <= scale


def test_random_blocks_deterministic_and_quant_bits_random():
    a = FMT.random_blocks(np.random.default_rng(11), 512, 1.0)
    b = FMT.random_blocks(np.random.default_rng(11), 512, 1.0)
    c = FMT.random_blocks(np.random.default_rng(12), 512, 1.0)
    assert a.dtype == np.uint8 and a.shape == (512, 17)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert (np.bitwise_or.reduce(a[:, 1:], axis=0) == 0xFF).all()
    assert (np.bitwise_and.reduce(a[:, 1:], axis=0) == 0x00).all()
    assert ((a[:, 0] >= 2) & (a[:, 0] <= 254)).all()  # normal, finite scales


@pytest.mark.parametrize("scale", [0.0, -1.0, float("inf"), float("nan"), 1e40, 1e-40])
def test_random_blocks_refuses_scales_e8m0_cannot_hold(scale):
    with pytest.raises(ValueError, match="MXFP4"):
        FMT.random_blocks(np.random.default_rng(0), 64, scale)


def test_rejects_wrong_block_shape():
    with pytest.raises(ValueError, match="MXFP4"):
        FMT.dequantize_blocks(np.zeros((2, 18), dtype=np.uint8))
    with pytest.raises(TypeError, match="MXFP4"):
        FMT.dequantize_blocks(np.zeros((2, 17), dtype=np.float32))


def test_plugin_registers_exactly_its_types():
    registry = load_plugins(allow=[ENTRY_POINT])
    assert registry.failed == []
    mine = [p for p in registry.plugins if p.name == ENTRY_POINT]
    assert len(mine) == 1 and mine[0].quant_types == ["MXFP4"]
    assert len(FORMATS) == 1
    assert registry.quant_format(39) is FORMATS[0]
    assert registry.owner("quant", 39) == ENTRY_POINT


def test_import_does_not_import_cupy():
    assert_import_does_not_import_cupy("orcd_quant_mxfp4")
