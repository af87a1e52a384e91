"""IQ4_NL (GGML type 20): 4-bit indices into a fixed non-linear table of 16 int8 levels.

Block of 32 weights, 18 bytes (llama.cpp's `block_iq4_nl`):

    d      f16      the block scale
    qs[16] uint8    index of weight j in the low nibble of qs[j], of weight j + 16 in the high nibble

    weight = d * KVALUES[index]

The CUDA kernels (decode GEMV, dequantize-to-fp16, row gather) are in `iq4_nl.cu`, named by
`cuda_source`; the worker's CUDA backend compiles that file on first use.
"""

from __future__ import annotations

import numpy as np

from orcd_core.quant import QuantFormat, as_blocks, f16_bits_to_f32

#: The 16 levels (llama.cpp's `kvalues_iq4nl`): denser near zero, where most weights are.
KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)


class IQ4_NL(QuantFormat):
    ggml_type = 20
    name = "IQ4_NL"
    block_size = 32
    type_size = 18
    cuda_source = ("orcd_quant_example", "iq4_nl.cu")

    def dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        blocks = as_blocks(blocks, self.type_size, self.name)
        d = f16_bits_to_f32(blocks[:, :2].copy().view(np.uint16))  # [n, 1]
        qs = blocks[:, 2:]  # [n, 16]
        idx = np.concatenate([qs & 0x0F, qs >> 4], axis=1)  # [n, 32]: low nibbles, then high nibbles
        return d * KVALUES[idx]

    def random_blocks(self, rng: np.random.Generator, n_blocks: int, scale: float = 1.0) -> np.ndarray:
        out = np.empty((n_blocks, self.type_size), dtype=np.uint8)
        # weights are about d * 127 at most: pick d so that they have magnitude about `scale`
        d = (rng.uniform(0.5, 1.5, n_blocks) * scale / 64).astype(np.float16)
        out[:, :2] = d.view(np.uint8).reshape(n_blocks, 2)
        out[:, 2:] = rng.integers(0, 256, (n_blocks, 16), dtype=np.uint8)
        return out
