"""The byte-to-float identities the quant kernels decode with (common.cuh q_f7 / q_f8 and one FFMA),
emulated on the CPU for every value they take: PRMT places a byte in the mantissa of 2.0, and FFMA(f,
s, o) rounds once (emulated in float64, exact for these operands, then rounded to float32)."""

from __future__ import annotations

import numpy as np


def prmt(a: int, b: int, sel: int) -> int:
    """__byte_perm(a, b, sel): result byte i = byte (sel >> 4 i) & 7 of the 8 bytes b:a (a low)."""
    src = (b << 32) | a
    return sum(((src >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))


def as_f32(bits: int) -> float:
    return float(np.array([bits], np.uint32).view(np.float32)[0])


def q_f7(w: int, u: int) -> float:
    return as_f32(prmt(w, 0x40000000, 0x7054 | (u << 8)))


def q_f8(w: int, u: int) -> float:
    return as_f32(prmt(w, 0x40000000, 0x7504 | (u << 4)))


def ffma(a: float, b: float, c: float) -> float:
    return float(np.float32(np.float64(a) * np.float64(b) + np.float64(c)))


def bits4_to_bytes_bit4(b: int) -> int:
    return (((b & 0xF) * 0x00204081) & 0x01010101) << 4


def test_q_f7_and_q_f8_are_two_plus_the_byte_scaled():
    for q in range(256):
        for u in range(4):
            w = q << (8 * u) | (0x5A5A5A5A & ~(0xFF << (8 * u)))  # the other bytes do not matter
            assert q_f8(w, u) == 2.0 + q / 2**14
            if q < 128:
                assert q_f7(w, u) == 2.0 + q / 64


def test_q5_0_weights_by_prmt_and_ffma_are_the_integer_values():
    """legacy.cu ItemDot<FmtQ5_0>: nibble | fifth bit << 4 per byte, then FFMA(q_f7, 64, -144) = q - 16."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        word = int(rng.integers(0, 2**32))
        qh4 = int(rng.integers(0, 16))
        lo = (word & 0x0F0F0F0F) | bits4_to_bytes_bit4(qh4)
        for u in range(4):
            q = ((word >> (8 * u)) & 0xF) | (((qh4 >> u) & 1) << 4)  # the per-weight extraction
            assert ffma(q_f7(lo, u), 64.0, -144.0) == q - 16
    for q in range(32):
        assert ffma(2.0 + q / 64, 64.0, -144.0) == q - 16


def test_q8_0_weights_by_prmt_and_ffma_are_the_int8_values():
    """legacy.cu ItemDot<FmtQ8_0>: byte ^ 0x80, then FFMA(q_f8, 2^14, -(2^15 + 128)) = the int8."""
    for b in range(256):
        w = (b ^ 0x80) << 16
        assert ffma(q_f8(w, 2), 16384.0, -32896.0) == int(np.array([b], np.uint8).view(np.int8)[0])
