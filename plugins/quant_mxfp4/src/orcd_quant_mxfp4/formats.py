"""MXFP4 (OCP microscaling FP4, as gpt-oss ships its MoE experts): NumPy dequantization and random
valid blocks.

Layout as in llama.cpp's `ggml-common.h` (`block_mxfp4`); dequantization follows
`dequantize_row_mxfp4` in `ggml-quants.c`: each weight is an E2M1 code looked up in a table of
*doubled* values (so they are integers) times *half* the block's E8M0 scale. Both factors are exact in
float32, so results are bit-identical to llama.cpp's reference and to gguf-py.
"""

from __future__ import annotations

import numpy as np

from orcd_core.quant import QuantFormat, as_blocks, dequantize_in_chunks

QK_MXFP4 = 32

#: E2M1 code -> 2 * value (codes 8-15 are the negatives of 0-7; code 8 is -0, stored as 0).
E2M1_DOUBLED = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.int8)


def e8m0_to_f32_half(e: np.ndarray) -> np.ndarray:
    """Half of the E8M0 scale 2**(e - 127), i.e. 2**(e - 128), as float32 (ggml_e8m0_to_fp32_half).

    For e >= 2 that is the normal float with biased exponent e - 1; e = 0 and 1 give the subnormals
    2**-128 and 2**-127 (bit patterns 0x00200000 and 0x00400000). Every e (0..255) is finite."""
    e = e.astype(np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - np.uint32(1)) << np.uint32(23))
    return bits.astype(np.uint32).view(np.float32)


_HALF_SCALE = e8m0_to_f32_half(np.arange(256, dtype=np.uint8))  # float32 [256], indexed by e


def _code_pair_table() -> np.ndarray:
    """int8 pairs `[256, 2]` viewed as one 2-byte item per byte value v: (value of the low nibble,
    value of the high nibble), so one lookup per `qs` byte decodes two weights."""
    v = np.arange(256)
    pairs = np.stack([E2M1_DOUBLED[v & 0x0F], E2M1_DOUBLED[v >> 4]], axis=1).astype(np.int8)
    return np.ascontiguousarray(pairs).view(np.int16).reshape(256)


_PAIRS = _code_pair_table()


class MXFP4(QuantFormat):
    """MXFP4, 17 bytes per 32 weights: `e` (E8M0 scale, 1 B) | `qs` 16 B of E2M1 codes.

    Weight j (j < 16) is the low nibble of `qs[j]`, weight 16 + j the high nibble;
    value = `E2M1_DOUBLED[code] * 2**(e - 128)`.
    """

    ggml_type = 39
    name = "MXFP4"
    block_size = QK_MXFP4
    type_size = 1 + QK_MXFP4 // 2
    cuda_source = ("orcd_quant_mxfp4", "mxfp4.cu")

    def dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        return dequantize_in_chunks(self._dequantize_into, as_blocks(blocks, self.type_size, self.name), QK_MXFP4)

    @staticmethod
    def _dequantize_into(blocks: np.ndarray, out: np.ndarray) -> None:
        n = blocks.shape[0]
        # byte j of qs -> (weight j, weight 16 + j); the transposed view puts them in weight order
        pairs = _PAIRS[blocks[:, 1:17]].view(np.int8).reshape(n, 16, 2)
        half_scale = _HALF_SCALE[blocks[:, 0:1]][:, :, None]  # float32 [n, 1, 1]
        with np.errstate(over="ignore"):  # e >= 253 overflows to +-inf, as in llama.cpp
            np.multiply(pairs.transpose(0, 2, 1), half_scale, out=out.reshape(n, 2, 16))

    def random_blocks(self, rng: np.random.Generator, n_blocks: int, scale: float = 1.0) -> np.ndarray:
        if not (np.isfinite(scale) and scale > 0):
            raise ValueError(f"{self.name}: random_blocks needs a positive finite scale, got {scale!r}")
        # the largest magnitude, 12 * 2**(e - 128), lands in [scale/4, scale]
        top = 128 + int(np.floor(np.log2(scale / 12)))
        if not 3 <= top <= 254:
            raise ValueError(f"{self.name}: scale {scale!r} is outside what an E8M0 scale can hold")
        blocks = rng.integers(0, 256, size=(n_blocks, self.type_size), dtype=np.uint8)
        blocks[:, 0] = (top - rng.integers(0, 2, size=n_blocks)).astype(np.uint8)
        return blocks


FORMATS = (MXFP4(),)
