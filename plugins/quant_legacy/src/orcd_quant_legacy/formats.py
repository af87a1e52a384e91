"""The legacy 32-weight block formats Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: NumPy dequantization and random
valid blocks.

Layouts as in llama.cpp's `ggml-common.h` (`block_q4_0` ... `block_q8_0`); dequantization follows
`dequantize_row_q*` in `ggml-quants.c` with the same float32 operations, so results are bit-identical
to llama.cpp's reference and to gguf-py. In the 4- and 5-bit types, weight j (j < 16) comes from the
low nibble of `qs[j]` and weight 16 + j from its high nibble.
"""

from __future__ import annotations

import numpy as np

from orcd_core.quant import QuantFormat, as_blocks, checked_f16_scales, dequantize_in_chunks

QK = 32  # weights per block in every legacy type


def _bit_spread_table() -> np.ndarray:
    """uint64 `[256]`: entry v has byte i = 0x10 if bit i of v is set, else 0 (little-endian bytes).

    Indexing it with the 4 bytes of a Q5 block's `qh` gives the fifth bit of all 32 weights, already
    shifted to bit 4, in weight order."""
    v = np.arange(256, dtype=np.uint64)[:, None]
    bits = (v >> np.arange(8, dtype=np.uint64)) & np.uint64(1)  # [256, 8]
    return ((bits << np.uint64(4)) << (np.uint64(8) * np.arange(8, dtype=np.uint64))).sum(axis=1, dtype=np.uint64).astype("<u8")


_HIGH_BIT = _bit_spread_table()


def _f16_column(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The fp16 field at byte `offset` (even) of each block, as a float32 `[n, 1]` column."""
    return blocks.view(np.float16)[:, offset // 2 : offset // 2 + 1].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """uint8 `[n, 16]` -> uint8 `[n, 32]`: the 16 low nibbles, then the 16 high nibbles."""
    q = np.empty((qs.shape[0], 2, 16), dtype=np.uint8)
    np.bitwise_and(qs, 0x0F, out=q[:, 0])
    np.right_shift(qs, 4, out=q[:, 1])
    return q.reshape(-1, QK)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """uint8 `[n, 4]` (the `qh` bytes, a little-endian uint32) -> uint8 `[n, 32]`: bit j of qh as 0x10."""
    return _HIGH_BIT[qh].view(np.uint8).reshape(-1, QK)


class _Legacy(QuantFormat):
    block_size = QK
    cuda_source = ("orcd_quant_legacy", "legacy.cu")  # gemv_/dequant_f16_/get_rows_ + name

    def dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        return dequantize_in_chunks(self._dequantize_into, as_blocks(blocks, self.type_size, self.name), QK)

    def _dequantize_into(self, blocks: np.ndarray, out: np.ndarray) -> None:
        raise NotImplementedError(self.name)


class Q4_0(_Legacy):
    """Q4_0, 18 bytes per 32 weights: `d` fp16 | `qs` 16 B. Weight = `(q - 8) * d`, q in 0..15."""

    ggml_type = 2
    name = "Q4_0"
    type_size = 2 + QK // 2

    def _dequantize_into(self, blocks: np.ndarray, out: np.ndarray) -> None:
        q = _nibbles(blocks[:, 2:18]).view(np.int8)
        np.subtract(q, np.int8(8), out=q)
        np.multiply(q, _f16_column(blocks, 0), out=out)

    def random_blocks(self, rng: np.random.Generator, n_blocks: int, scale: float = 1.0) -> np.ndarray:
        blocks = rng.integers(0, 256, size=(n_blocks, self.type_size), dtype=np.uint8)
        blocks.view(np.uint16)[:, 0] = checked_f16_scales(rng, n_blocks, scale / 8, self.name)
        return blocks


class Q4_1(_Legacy):
    """Q4_1, 20 bytes per 32 weights: `d` fp16 | `m` fp16 | `qs` 16 B. Weight = `q * d + m`, q in 0..15."""

    ggml_type = 3
    name = "Q4_1"
    type_size = 2 + 2 + QK // 2

    def _dequantize_into(self, blocks: np.ndarray, out: np.ndarray) -> None:
        dm = blocks.view(np.float16)[:, 0:2].astype(np.float32)
        np.multiply(_nibbles(blocks[:, 4:20]), dm[:, 0:1], out=out)
        np.add(out, dm[:, 1:2], out=out)

    def random_blocks(self, rng: np.random.Generator, n_blocks: int, scale: float = 1.0) -> np.ndarray:
        blocks = rng.integers(0, 256, size=(n_blocks, self.type_size), dtype=np.uint8)
        halves = blocks.view(np.uint16)
        halves[:, 0] = checked_f16_scales(rng, n_blocks, 2 * scale / 15, self.name)
        halves[:, 1] = checked_f16_scales(rng, n_blocks, scale, self.name) | np.uint16(0x8000)  # m < 0: values span about ±scale
        return blocks


class Q5_0(_Legacy):
    """Q5_0, 22 bytes per 32 weights: `d` fp16 | `qh` 4 B | `qs` 16 B. Weight j = `(q - 16) * d`,
    q in 0..31: low 4 bits from the nibbles, fifth bit = bit j of `qh` (a little-endian uint32)."""

    ggml_type = 6
    name = "Q5_0"
    type_size = 2 + 4 + QK // 2

    def _dequantize_into(self, blocks: np.ndarray, out: np.ndarray) -> None:
        q = _nibbles(blocks[:, 6:22])
        np.bitwise_or(q, _fifth_bits(blocks[:, 2:6]), out=q)
        q = q.view(np.int8)
        np.subtract(q, np.int8(16), out=q)
        np.multiply(q, _f16_column(blocks, 0), out=out)

    def random_blocks(self, rng: np.random.Generator, n_blocks: int, scale: float = 1.0) -> np.ndarray:
        blocks = rng.integers(0, 256, size=(n_blocks, self.type_size), dtype=np.uint8)
        blocks.view(np.uint16)[:, 0] = checked_f16_scales(rng, n_blocks, scale / 16, self.name)
        return blocks


class Q5_1(_Legacy):
    """Q5_1, 24 bytes per 32 weights: `d` fp16 | `m` fp16 | `qh` 4 B | `qs` 16 B. Weight j = `q * d + m`,
    q in 0..31, bits as in Q5_0."""

    ggml_type = 7
    name = "Q5_1"
    type_size = 2 + 2 + 4 + QK // 2

    def _dequantize_into(self, blocks: np.ndarray, out: np.ndarray) -> None:
        dm = blocks.view(np.float16)[:, 0:2].astype(np.float32)
        q = _nibbles(blocks[:, 8:24])
        np.bitwise_or(q, _fifth_bits(blocks[:, 4:8]), out=q)
        np.multiply(q, dm[:, 0:1], out=out)
        np.add(out, dm[:, 1:2], out=out)

    def random_blocks(self, rng: np.random.Generator, n_blocks: int, scale: float = 1.0) -> np.ndarray:
        blocks = rng.integers(0, 256, size=(n_blocks, self.type_size), dtype=np.uint8)
        halves = blocks.view(np.uint16)
        halves[:, 0] = checked_f16_scales(rng, n_blocks, 2 * scale / 31, self.name)
        halves[:, 1] = checked_f16_scales(rng, n_blocks, scale, self.name) | np.uint16(0x8000)
        return blocks


class Q8_0(_Legacy):
    """Q8_0, 34 bytes per 32 weights: `d` fp16 | `qs` 32 x int8. Weight = `q * d`."""

    ggml_type = 8
    name = "Q8_0"
    type_size = 2 + QK

    def _dequantize_into(self, blocks: np.ndarray, out: np.ndarray) -> None:
        np.multiply(blocks[:, 2:34].view(np.int8), _f16_column(blocks, 0), out=out)

    def random_blocks(self, rng: np.random.Generator, n_blocks: int, scale: float = 1.0) -> np.ndarray:
        blocks = rng.integers(0, 256, size=(n_blocks, self.type_size), dtype=np.uint8)
        blocks.view(np.uint16)[:, 0] = checked_f16_scales(rng, n_blocks, scale / 128, self.name)
        return blocks


FORMATS = (Q4_0(), Q4_1(), Q5_0(), Q5_1(), Q8_0())
