"""The quantization-format contract: one `QuantFormat` object per GGML type.

A quant plugin registers its formats through the `orcd_register_quant_formats` hook. The core and the
backends only ever talk to a format through this object, so model code never changes per format.

Raw tensor data is handled as a 2-D `uint8` array of shape `[n_blocks, type_size]`; a tensor of
GGML shape `(ne0, ne1, ...)` (ne0 = the contiguous row length) holds `ne0 // block_size` blocks per row.
"""

from __future__ import annotations

from importlib import resources
from typing import ClassVar

import numpy as np


class QuantFormat:
    """One GGML tensor type: block geometry, NumPy dequantization, random valid blocks, CUDA sources.

    Subclasses set the class attributes and implement `dequantize_blocks` and `random_blocks`.
    """

    #: GGML type id, as in `gguf.GGMLQuantizationType` (e.g. 12 for Q4_K).
    ggml_type: ClassVar[int]
    #: GGML type name (e.g. "Q4_K").
    name: ClassVar[str]
    #: Elements per block.
    block_size: ClassVar[int]
    #: Bytes per block.
    type_size: ClassVar[int]
    #: `(package, filename)` of the CUDA source implementing this format's kernels, or None.
    cuda_source: ClassVar[tuple[str, str] | None] = None

    def dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        """`uint8 [n_blocks, type_size]` -> `float32 [n_blocks, block_size]`."""
        raise NotImplementedError(self.name)

    def random_blocks(self, rng: np.random.Generator, n_blocks: int, scale: float = 1.0) -> np.ndarray:
        """Random *valid* blocks (finite scales, values of magnitude about `scale`), `uint8
        [n_blocks, type_size]`. Used by the synthetic-model generator and by tests."""
        raise NotImplementedError(self.name)

    # -- helpers shared by every format ---------------------------------------------------------

    def row_bytes(self, n_elements: int) -> int:
        """Bytes of a row of `n_elements` (must be a multiple of the block size)."""
        if n_elements % self.block_size:
            raise ValueError(f"{self.name}: row length {n_elements} is not a multiple of {self.block_size}")
        return n_elements // self.block_size * self.type_size

    def dequantize(self, raw: np.ndarray | bytes | memoryview, shape: tuple[int, ...]) -> np.ndarray:
        """Dequantize raw tensor bytes to float32 of NumPy `shape` (the last axis is GGML's ne0)."""
        data = np.frombuffer(raw, dtype=np.uint8) if not isinstance(raw, np.ndarray) else raw.reshape(-1).view(np.uint8)
        n = int(np.prod(shape))
        if n % self.block_size:
            raise ValueError(f"{self.name}: {n} elements is not a multiple of the block size {self.block_size}")
        n_blocks = n // self.block_size
        if data.size != n_blocks * self.type_size:
            raise ValueError(f"{self.name}: {data.size} bytes for {n} elements, expected {n_blocks * self.type_size}")
        return self.dequantize_blocks(data.reshape(n_blocks, self.type_size)).reshape(shape)

    def quantize_random(self, rng: np.random.Generator, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
        """Random valid raw data for a tensor of NumPy `shape`, as `uint8 [*shape[:-1], row_bytes]`."""
        n_blocks = int(np.prod(shape)) // self.block_size
        blocks = self.random_blocks(rng, n_blocks, scale)
        return blocks.reshape(*shape[:-1], self.row_bytes(shape[-1]))

    def cuda_source_text(self) -> str | None:
        """The CUDA C++ source of this format's kernels (read from the plugin package), or None."""
        if self.cuda_source is None:
            return None
        package, filename = self.cuda_source
        return resources.files(package).joinpath(filename).read_text(encoding="utf-8")

    def __repr__(self) -> str:
        return f"<QuantFormat {self.name} (type {self.ggml_type}, {self.block_size} per {self.type_size} B)>"


def f16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """Reinterpret uint16 bit patterns as IEEE half floats and widen to float32."""
    return np.ascontiguousarray(bits).view(np.float16).astype(np.float32)


def random_f16_scales(rng: np.random.Generator, n: int, scale: float, lo: float = 0.5, hi: float = 1.5) -> np.ndarray:
    """Positive random half-precision scales in `[lo, hi] * scale`, as uint16 bit patterns."""
    return (rng.uniform(lo, hi, n) * scale).astype(np.float16).view(np.uint16)


def checked_f16_scales(rng: np.random.Generator, n: int, value: float, name: str) -> np.ndarray:
    """`random_f16_scales` (positive, in [0.5, 1.5] * value, uint16 bits), refusing a `value` whose
    scales would overflow or flush to zero in fp16 (such blocks would not have the asked magnitude).
    `name` (the format's) starts the `ValueError` message."""
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"{name}: random_blocks needs a positive finite scale, got {value!r}")
    with np.errstate(over="ignore"):  # checked just below
        bits = random_f16_scales(rng, n, value)
    if n and (((bits & 0x7C00) == 0x7C00).any() or not (bits & 0x7FFF).all()):
        raise ValueError(f"{name}: scale {value!r} is outside what this format's fp16 scales can hold")
    return bits


def as_blocks(blocks: np.ndarray, type_size: int, name: str) -> np.ndarray:
    """Check and normalise a `dequantize_blocks` argument: a C-contiguous `uint8 [n_blocks, type_size]`
    array (a 1-D byte array of whole blocks is reshaped)."""
    blocks = np.asarray(blocks)
    if blocks.dtype != np.uint8:
        raise TypeError(f"{name}: blocks must be uint8, got {blocks.dtype}")
    if blocks.ndim == 1 and blocks.size % type_size == 0:
        blocks = blocks.reshape(-1, type_size)
    if blocks.ndim != 2 or blocks.shape[1] != type_size:
        raise ValueError(f"{name}: blocks must have shape [n_blocks, {type_size}], got {blocks.shape}")
    return np.ascontiguousarray(blocks)


def dequantize_in_chunks(kernel, blocks: np.ndarray, block_size: int, chunk_elements: int = 1 << 20) -> np.ndarray:
    """Run `kernel(blocks_chunk, out_chunk)` over consecutive runs of blocks, writing into one float32
    `[n_blocks, block_size]` result. Chunks of about `chunk_elements` outputs keep the vectorised
    temporaries cache-sized instead of tensor-sized."""
    n_blocks = blocks.shape[0]
    out = np.empty((n_blocks, block_size), dtype=np.float32)
    step = max(1, chunk_elements // block_size)
    for start in range(0, n_blocks, step):
        kernel(blocks[start : start + step], out[start : start + step])
    return out
