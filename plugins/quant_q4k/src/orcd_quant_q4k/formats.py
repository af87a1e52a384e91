"""The k-quant formats Q4_K, Q5_K and Q6_K: NumPy dequantization and random valid blocks.

Layouts as in llama.cpp's `ggml-common.h` (`block_q4_K`, `block_q5_K`, `block_q6_K`); every block
holds QK_K = 256 weights. Dequantization follows `dequantize_row_q*_K` in `ggml-quants.c` operation
for operation, in float32, so results are bit-identical to llama.cpp's reference and to gguf-py.
"""

from __future__ import annotations

import numpy as np

from orcd_core.quant import QuantFormat, as_blocks, checked_f16_scales, dequantize_in_chunks

QK_K = 256
K_SCALE_SIZE = 12  # 8 six-bit scales + 8 six-bit mins, packed into 12 bytes
_BYTE_LSB = np.uint64(0x0101010101010101)  # bit 0 of each byte of a uint64 lane


def unpack_scale_min_k4(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and 8 six-bit mins of a Q4_K/Q5_K block, from its 12 packed bytes.

    `packed` is `uint8 [n, 12]`; returns two `uint8 [n, 8]`. Bytes 0-3 hold scales 0-3 in their low
    6 bits, bytes 4-7 mins 0-3; scales/mins 4-7 take their low 4 bits from the low/high nibble of
    bytes 8-11 and their top 2 bits from the top 2 bits of bytes 0-3 (scales) or 4-7 (mins).
    Worked on four bytes at once (uint32 lanes; every operation is byte-local).
    """
    words = packed.view(np.uint32)  # [n, 3]: bytes 0-3, 4-7, 8-11
    a, b, c = words[:, 0], words[:, 1], words[:, 2]
    sc = np.empty((packed.shape[0], 2), dtype=np.uint32)
    mn = np.empty((packed.shape[0], 2), dtype=np.uint32)
    np.bitwise_and(a, 0x3F3F3F3F, out=sc[:, 0])
    np.bitwise_and(b, 0x3F3F3F3F, out=mn[:, 0])
    # per byte: (c & 0xF) | ((a >> 6) << 4); bits 6-7 of a byte move to bits 4-5
    np.bitwise_or(c & 0x0F0F0F0F, (a >> 2) & 0x30303030, out=sc[:, 1])
    np.bitwise_or((c >> 4) & 0x0F0F0F0F, (b >> 2) & 0x30303030, out=mn[:, 1])
    return sc.view(np.uint8), mn.view(np.uint8)


def _f16_pair(blocks: np.ndarray, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Two consecutive fp16 fields at byte `offset` (even) of each block, as float32 `[n, 1]` columns."""
    halves = blocks.view(np.float16)[:, offset // 2 : offset // 2 + 2].astype(np.float32)
    return halves[:, 0:1], halves[:, 1:2]


def _nibbles(qs: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Low and high nibbles of `qs` (uint8 `[n, 128]`), each as uint8 `[n, 4, 32]`."""
    return np.bitwise_and(qs, 0x0F).reshape(n, 4, 32), np.right_shift(qs, 4).reshape(n, 4, 32)


def _affine_k4(lo: np.ndarray, hi: np.ndarray, d_sub: np.ndarray, m_sub: np.ndarray, out: np.ndarray) -> None:
    """`out[n, 256]` = `d_sub[j] * q - m_sub[j]` per 32-weight sub-block j; sub-blocks 2i / 2i+1 take
    their q from `lo[:, i]` / `hi[:, i]`. Same float32 operations, in the same order, as llama.cpp."""
    n = out.shape[0]
    d_sub = d_sub.reshape(n, 4, 2, 1)
    y = out.reshape(n, 4, 2, 32)
    np.multiply(lo, d_sub[:, :, 0], out=y[:, :, 0])
    np.multiply(hi, d_sub[:, :, 1], out=y[:, :, 1])
    np.subtract(y, m_sub.reshape(n, 4, 2, 1), out=y)


class Q4_K(QuantFormat):
    """Q4_K, 144 bytes per 256 weights (4.5 bits per weight).

    `d` fp16 | `dmin` fp16 | `scales` 12 B (8 six-bit scales + 8 six-bit mins) | `qs` 128 B.
    Sub-block j (32 weights) = `d*sc[j] * q - dmin*m[j]`, q in 0..15; sub-blocks 2i and 2i+1 take
    the low and high nibbles of `qs[32i : 32i+32]`.
    """

    ggml_type = 12
    name = "Q4_K"
    block_size = QK_K
    type_size = 2 + 2 + K_SCALE_SIZE + QK_K // 2
    cuda_source = ("orcd_quant_q4k", "q4k.cu")

    def dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        return dequantize_in_chunks(self._dequantize_into, as_blocks(blocks, self.type_size, self.name), QK_K)

    @staticmethod
    def _dequantize_into(blocks: np.ndarray, out: np.ndarray) -> None:
        n = blocks.shape[0]
        d, dmin = _f16_pair(blocks, 0)
        sc, mn = unpack_scale_min_k4(blocks[:, 4:16])
        lo, hi = _nibbles(blocks[:, 16:144], n)
        _affine_k4(lo, hi, d * sc, dmin * mn, out)  # d*sc, dmin*m: float32 [n, 8]

    def random_blocks(self, rng: np.random.Generator, n_blocks: int, scale: float = 1.0) -> np.ndarray:
        blocks = rng.integers(0, 256, size=(n_blocks, self.type_size), dtype=np.uint8)
        # d*sc*q reaches (0.5..1.5)*scale and dmin*m (0.25..0.75)*scale
        blocks.view(np.uint16)[:, 0] = checked_f16_scales(rng, n_blocks, scale / (63 * 15), self.name)
        blocks.view(np.uint16)[:, 1] = checked_f16_scales(rng, n_blocks, scale / (2 * 63), self.name)
        return blocks


class Q5_K(QuantFormat):
    """Q5_K, 176 bytes per 256 weights (5.5 bits per weight).

    `d` fp16 | `dmin` fp16 | `scales` 12 B (as Q4_K) | `qh` 32 B | `qs` 128 B.
    Sub-block j = `d*sc[j] * q - dmin*m[j]`, q in 0..31: the low 4 bits as in Q4_K, the fifth bit of
    weight l of sub-block j is bit j of `qh[l]`.
    """

    ggml_type = 13
    name = "Q5_K"
    block_size = QK_K
    type_size = 2 + 2 + K_SCALE_SIZE + QK_K // 8 + QK_K // 2
    cuda_source = ("orcd_quant_q4k", "q4k.cu")

    def dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        return dequantize_in_chunks(self._dequantize_into, as_blocks(blocks, self.type_size, self.name), QK_K)

    def _dequantize_into(self, blocks: np.ndarray, out: np.ndarray) -> None:
        n = blocks.shape[0]
        d, dmin = _f16_pair(blocks, 0)
        sc, mn = unpack_scale_min_k4(blocks[:, 4:16])
        lo, hi = _nibbles(blocks[:, 48:176], n)
        # fifth bit of weight l of sub-block j = bit j of qh[l], moved to bit 4; eight bytes per uint64 lane
        qh = np.ascontiguousarray(blocks[:, 16:48]).view(np.uint64)  # [n, 4]
        for j in range(8):  # sub-blocks (a fixed 8), not blocks
            bit = np.left_shift(np.bitwise_and(qh >> np.uint64(j), _BYTE_LSB), np.uint64(4)).view(np.uint8)
            dst = (lo if j % 2 == 0 else hi)[:, j // 2]
            np.bitwise_or(dst, bit, out=dst)
        _affine_k4(lo, hi, d * sc, dmin * mn, out)

    def random_blocks(self, rng: np.random.Generator, n_blocks: int, scale: float = 1.0) -> np.ndarray:
        blocks = rng.integers(0, 256, size=(n_blocks, self.type_size), dtype=np.uint8)
        blocks.view(np.uint16)[:, 0] = checked_f16_scales(rng, n_blocks, scale / (63 * 31), self.name)
        blocks.view(np.uint16)[:, 1] = checked_f16_scales(rng, n_blocks, scale / (2 * 63), self.name)
        return blocks


class Q6_K(QuantFormat):
    """Q6_K, 210 bytes per 256 weights (6.5625 bits per weight).

    `ql` 128 B (low 4 bits) | `qh` 64 B (high 2 bits) | `scales` 16 x int8 | `d` fp16 (last).
    Weight = `d*scales[s] * (q - 32)`, q in 0..63, one scale per 16 weights. Per half of 128
    weights (ql[64h:64h+64], qh[32h:32h+32]), weight 32k+l (k = 0..3, l = 0..31) takes its low
    nibble from ql[l + 32*(k&1)] (low nibble for k<2, high for k>=2) and its top bits from
    bits 2k..2k+1 of qh[l].
    """

    ggml_type = 14
    name = "Q6_K"
    block_size = QK_K
    type_size = QK_K // 2 + QK_K // 4 + QK_K // 16 + 2
    cuda_source = ("orcd_quant_q4k", "q4k.cu")

    _SHIFT = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)

    def dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        return dequantize_in_chunks(self._dequantize_into, as_blocks(blocks, self.type_size, self.name), QK_K)

    def _dequantize_into(self, blocks: np.ndarray, out: np.ndarray) -> None:
        n = blocks.shape[0]
        d = blocks.view(np.float16)[:, 104:105].astype(np.float32)  # byte 208
        d_sub = d * blocks[:, 192:208].view(np.int8)  # [n, 16] float32
        # q[n, half, k, l] for weight 32k + l of each half; k = 2*nibble + part (ql[0:32] / ql[32:64])
        ql = blocks[:, 0:128].reshape(n, 2, 64)
        q = np.empty((n, 2, 2, 64), dtype=np.uint8)
        np.bitwise_and(ql, 0x0F, out=q[:, :, 0])
        np.right_shift(ql, 4, out=q[:, :, 1])
        q = q.reshape(n, 2, 4, 32)
        high = np.right_shift(blocks[:, 128:192].reshape(n, 2, 1, 32), self._SHIFT)  # bits 2k..2k+1 of qh[l]
        np.bitwise_and(high, 0x03, out=high)
        np.left_shift(high, 4, out=high)
        np.bitwise_or(q, high, out=q)
        qi = q.view(np.int8)
        np.subtract(qi, np.int8(32), out=qi)
        y = out.reshape(n, 16, 16)
        np.multiply(qi.reshape(n, 16, 16), d_sub[:, :, None], out=y)

    def random_blocks(self, rng: np.random.Generator, n_blocks: int, scale: float = 1.0) -> np.ndarray:
        blocks = rng.integers(0, 256, size=(n_blocks, self.type_size), dtype=np.uint8)
        # |scales| <= 128 and |q - 32| <= 32
        blocks.view(np.uint16)[:, 104] = checked_f16_scales(rng, n_blocks, scale / (128 * 32), self.name)
        return blocks


FORMATS = (Q4_K(), Q5_K(), Q6_K())
