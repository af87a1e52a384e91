"""The float tensor types owned by the core: F32, F16, BF16 (block size 1)."""

from __future__ import annotations

import numpy as np

from .quant import QuantFormat

#: CUDA kernels of the float types (gemv_F32, dequant_f16_F16, get_rows_BF16, ...)
FLOATS_CUDA = ("orcd_core.kernels", "floats.cu")


class F32(QuantFormat):
    ggml_type = 0
    name = "F32"
    cuda_source = FLOATS_CUDA
    block_size = 1
    type_size = 4

    def dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(blocks).view(np.float32).reshape(-1, 1).copy()

    def random_blocks(self, rng, n_blocks, scale=1.0):
        return (rng.standard_normal(n_blocks, dtype=np.float32) * np.float32(scale)).view(np.uint8).reshape(n_blocks, 4)


class F16(QuantFormat):
    ggml_type = 1
    name = "F16"
    cuda_source = FLOATS_CUDA
    block_size = 1
    type_size = 2

    def dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(blocks).view(np.float16).astype(np.float32).reshape(-1, 1)

    def random_blocks(self, rng, n_blocks, scale=1.0):
        return (rng.standard_normal(n_blocks) * scale).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)


class BF16(QuantFormat):
    """bfloat16: the upper half of an IEEE float32."""

    ggml_type = 30
    name = "BF16"
    cuda_source = FLOATS_CUDA
    block_size = 1
    type_size = 2

    def dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        bits = np.ascontiguousarray(blocks).view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(-1, 1)

    def random_blocks(self, rng, n_blocks, scale=1.0):
        f32 = (rng.standard_normal(n_blocks, dtype=np.float32) * np.float32(scale)).view(np.uint32)
        rounded = ((f32 + 0x7FFF + ((f32 >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
        return rounded.view(np.uint8).reshape(n_blocks, 2)


FORMATS = (F32(), F16(), BF16())
