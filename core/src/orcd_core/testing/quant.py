"""Conformance kit for quant-format plugins: the checks every `QuantFormat` must pass against the
oracle gguf-py (`gguf.quants.dequantize`), bit-exact in float32.

Use it from a plugin's tests by subclassing `QuantFormatConformance` in a class named `Test...` and
filling in the class attributes; the format-specific cases stay in the plugin's own test file:

    from orcd_core.testing.quant import QuantFormatConformance
    from orcd_quant_yours import FORMATS

    class TestYourFormats(QuantFormatConformance):
        formats = FORMATS
        entry_point = "quant-yours"
        package = "orcd_quant_yours"
        types = ["Q4_0"]
        f16_fields = {"Q4_0": (0,)}
        scale_fields = {"Q4_0": (0,)}

The class suite assumes blocks whose only invalid encodings are NaN/inf fp16 fields (`f16_fields`)
and whose `random_blocks` keeps the `scale_fields` positive. gguf-py is imported lazily (it is an
`orcd-core` dependency, but only tests need it).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np
import pytest

from orcd_core.quant import QuantFormat


def gguf_oracle(fmt: QuantFormat, blocks: np.ndarray) -> np.ndarray:
    """gguf-py's dequantization of `blocks`, as `float32 [n_blocks, block_size]`."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return dequantize(blocks, GGMLQuantizationType(fmt.ggml_type)).reshape(-1, fmt.block_size)


def assert_bit_equal(ours: np.ndarray, ref: np.ndarray) -> None:
    """Same dtype (float32), shape and bit pattern of every value; the message names the first miss."""
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    diff = np.flatnonzero(ours.view(np.uint32) != ref.view(np.uint32))
    assert diff.size == 0, f"{diff.size} of {ours.size} values differ, first at {diff[0]}: {ours.flat[diff[0]]} != {ref.flat[diff[0]]}"


def sanitize_f16(blocks: np.ndarray, f16_fields: Sequence[int]) -> np.ndarray:
    """Random bytes with every fp16 field (byte offsets `f16_fields`) made finite (an all-ones
    exponent loses its top bit)."""
    blocks = blocks.copy()
    for off in f16_fields:
        h = blocks[:, off : off + 2].copy().view(np.uint16)
        h = np.where((h & 0x7C00) == 0x7C00, h & 0xBFFF, h).astype(np.uint16)
        blocks[:, off : off + 2] = h.view(np.uint8)
    return blocks


def assert_import_does_not_import_cupy(package: str) -> None:
    """Importing `package` in a fresh interpreter leaves CuPy unimported."""
    code = f"import sys, {package}; assert 'cupy' not in sys.modules, 'cupy imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def assert_plugin_registers_exactly(entry_point: str, types: Sequence[str], formats: Sequence[QuantFormat]) -> None:
    """Loading only `entry_point` registers exactly `types`, each as the given format object."""
    from orcd_core.plugins import load_plugins

    registry = load_plugins(allow=[entry_point])
    assert registry.failed == []
    mine = [p for p in registry.plugins if p.name == entry_point]
    assert len(mine) == 1 and mine[0].quant_types == list(types)
    for fmt in formats:
        assert registry.quant_format(fmt.ggml_type) is fmt
        assert registry.owner("quant", fmt.ggml_type) == entry_point
        assert fmt.cuda_source is None or isinstance(fmt.cuda_source, tuple)


class QuantFormatConformance:
    """The shared suite; every test taking `fmt` runs once per entry of `formats`."""

    formats: ClassVar[Sequence[QuantFormat]] = ()
    entry_point: ClassVar[str] = ""  # the plugin's entry-point name
    package: ClassVar[str] = ""  # its import name
    types: ClassVar[Sequence[str]] = ()  # the type names it must register, in order
    # byte offsets of each format's fp16 fields -- the only bytes that can encode NaN/inf
    f16_fields: ClassVar[Mapping[str, Sequence[int]]] = {}
    # the fp16 fields random_blocks keeps positive (a signed offset such as Q4_1's `m` is not one)
    scale_fields: ClassVar[Mapping[str, Sequence[int]]] = {}

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "fmt" in metafunc.fixturenames:
            metafunc.parametrize("fmt", self.formats, ids=lambda f: f.name)

    def test_geometry_matches_gguf(self, fmt):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        qtype = GGMLQuantizationType(fmt.ggml_type)
        assert qtype.name == fmt.name
        assert (fmt.block_size, fmt.type_size) == GGML_QUANT_SIZES[qtype]

    @pytest.mark.parametrize("seed", (0, 1, 2, 3))
    @pytest.mark.parametrize("scale", [1.0, 0.02, 40.0])
    def test_random_valid_blocks_bit_exact(self, fmt, seed, scale):
        blocks = fmt.random_blocks(np.random.default_rng(seed), 257, scale)
        assert_bit_equal(fmt.dequantize_blocks(blocks), gguf_oracle(fmt, blocks))

    def test_random_bytes_bit_exact_across_chunks(self, fmt):
        # no encoding of these formats is invalid except a NaN/inf fp16 scale; negative scales included.
        # More blocks than one internal chunk (2**20 outputs), so the chunk seam is checked too.
        n = (1 << 20) // fmt.block_size + 5
        raw = np.random.default_rng(100).integers(0, 256, size=(n, fmt.type_size), dtype=np.uint8)
        blocks = sanitize_f16(raw, self.f16_fields[fmt.name])
        ours = fmt.dequantize_blocks(blocks)
        assert np.isfinite(ours).all()
        assert_bit_equal(ours, gguf_oracle(fmt, blocks))

    def test_dequantize_tensor_rows(self, fmt):
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        # a [3, 2 * block_size] tensor stored row-major as GGML writes it: 2 blocks per row
        raw = fmt.quantize_random(np.random.default_rng(7), (3, 2 * fmt.block_size), 0.5)
        assert raw.shape == (3, 2 * fmt.type_size)
        ours = fmt.dequantize(raw, (3, 2 * fmt.block_size))
        ref = dequantize(raw, GGMLQuantizationType(fmt.ggml_type))
        assert ref.shape == (3, 2 * fmt.block_size)
        assert_bit_equal(ours, ref)

    @pytest.mark.parametrize("scale", [1.0, 0.05, 20.0])
    def test_random_blocks_finite_with_magnitude_of_scale(self, fmt, scale):
        values = fmt.dequantize_blocks(fmt.random_blocks(np.random.default_rng(5), 400, scale))
        assert np.isfinite(values).all()
        rms = float(np.sqrt(np.mean(values.astype(np.float64) ** 2)))
        # "magnitude about scale": rms between a tenth and the whole scale, nothing beyond 3x
        assert 0.1 * scale < rms < 1.0 * scale, rms
        assert float(np.abs(values).max()) <= 3.0 * scale
        assert float(np.abs(values).max()) >= 0.5 * scale

    def test_random_blocks_deterministic_and_quant_bits_random(self, fmt):
        a = fmt.random_blocks(np.random.default_rng(11), 512, 1.0)
        b = fmt.random_blocks(np.random.default_rng(11), 512, 1.0)
        c = fmt.random_blocks(np.random.default_rng(12), 512, 1.0)
        assert a.dtype == np.uint8 and a.shape == (512, fmt.type_size)
        assert np.array_equal(a, b) and not np.array_equal(a, c)
        scale_bytes = {o + k for o in self.f16_fields[fmt.name] for k in (0, 1)}
        quant_cols = [i for i in range(fmt.type_size) if i not in scale_bytes]
        # every bit of every non-scale byte takes both values somewhere among 512 blocks
        assert (np.bitwise_or.reduce(a[:, quant_cols], axis=0) == 0xFF).all()
        assert (np.bitwise_and.reduce(a[:, quant_cols], axis=0) == 0x00).all()
        # every fp16 field is finite, the scales positive
        for off in self.f16_fields[fmt.name]:
            h = a[:, off : off + 2].copy().view(np.float16).astype(np.float32)
            assert np.isfinite(h).all()
            assert off not in self.scale_fields[fmt.name] or (h > 0).all()

    @pytest.mark.parametrize("scale", [0.0, -1.0, float("inf"), float("nan"), 1e12, 1e-12])
    def test_random_blocks_refuses_scales_fp16_cannot_hold(self, fmt, scale):
        with pytest.raises(ValueError, match=fmt.name):
            fmt.random_blocks(np.random.default_rng(0), 64, scale)

    def test_rejects_wrong_block_shape(self, fmt):
        with pytest.raises(ValueError, match=fmt.name):
            fmt.dequantize_blocks(np.zeros((2, fmt.type_size + 1), dtype=np.uint8))
        with pytest.raises(TypeError, match=fmt.name):
            fmt.dequantize_blocks(np.zeros((2, fmt.type_size), dtype=np.int8))

    def test_plugin_registers_exactly_its_types(self):
        assert_plugin_registers_exactly(self.entry_point, self.types, self.formats)

    def test_import_does_not_import_cupy(self):
        assert_import_does_not_import_cupy(self.package)
