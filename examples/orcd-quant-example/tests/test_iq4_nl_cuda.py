"""IQ4_NL's CUDA kernels (iq4_nl.cu) on the worker's CUDA backend against the plugin's own NumPy
`dequantize` (itself bit-exact with gguf-py, test_iq4_nl.py), on random blocks:

- the row gather (embedding) is bit-exact: d * level is exact in float32 on both sides;
- dequantize-to-fp16 within fp16 rounding: relative error <= 1e-3 (fp16 has 11 significant bits);
- the linear layer: relative L2 error <= 1e-3 for the decode GEMV (T <= 4, float32 accumulation),
  <= 1e-2 for the prefill path (T = 64: fp16 operands into a GEMM).

Marked `gpu`: skipped, module and all, without CuPy or a CUDA GPU (`pytest -m gpu` selects it)."""

from __future__ import annotations

import numpy as np
import pytest

from orcd_core.testing.cuda import cuda_dev, require_cuda_gpu, upload_raw  # noqa: F401 (the `dev` fixture)
from orcd_quant_example import IQ4_NL

pytestmark = pytest.mark.gpu

cupy = require_cuda_gpu()

FMT = IQ4_NL()


def weight(dev, raw: np.ndarray, N: int, K: int):
    return upload_raw(dev, FMT, raw, N, K)


def test_row_gather_is_bit_exact(dev):
    rng = np.random.default_rng(0)
    N, K = 256, 96  # 3 blocks per row: 54-byte rows put blocks at both 2-byte alignments mod 4
    raw = FMT.quantize_random(rng, (N, K), 1.0)  # random index bytes: every level, in both nibbles
    w = weight(dev, raw, N, K)
    ids = np.arange(N, dtype=np.int32)[::-1].copy()
    dev.begin_step()
    got = dev.to_host(dev.embedding(w, dev.to_device(ids))).astype(np.float32)
    want = FMT.dequantize(raw, (N, K))[ids]
    assert np.isfinite(want).all() and len(np.unique(want)) > 1000
    np.testing.assert_array_equal(got, want)


def test_dequantize_f16(dev):
    from orcd_core.backends.cuda.kernels import i32, i64, launch

    rng = np.random.default_rng(1)
    N, K = 37, 32 * 9
    raw = FMT.quantize_random(rng, (N, K), 1.0)
    w = weight(dev, raw, N, K)
    out = cupy.full((N, K), np.nan, dtype=np.float16)
    launch(dev.format_kernels(FMT).fn("dequant_f16_IQ4_NL"), ((N * K // 32 + 127) // 128,), (128,),
           (w.data.data, i64(w.data.row_bytes), out, i32(0), i32(N), i32(K)))
    want = FMT.dequantize(raw, (N, K))
    np.testing.assert_allclose(cupy.asnumpy(out).astype(np.float32), want, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("T", [1, 4, 64])
def test_linear(dev, T):
    rng = np.random.default_rng(T)
    N, K = 384, 896  # Qwen2.5-0.5B's width: 28 blocks per row
    raw = FMT.quantize_random(rng, (N, K), 1.0 / np.sqrt(K))
    w = weight(dev, raw, N, K)
    x = rng.standard_normal((T, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    want = x.astype(np.float64) @ FMT.dequantize(raw, (N, K)).T.astype(np.float64) + bias
    dev.begin_step()
    got = dev.to_host(dev.linear(dev.to_device(x, "float32"), w, dev.upload_array("b", bias)))
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err <= (1e-3 if T <= 4 else 1e-2), err
