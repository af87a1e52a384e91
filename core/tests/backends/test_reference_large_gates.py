"""Large-magnitude gates in the reference backend's gated activations (silu_mul, moe's silu and
swiglu_oai): ggml computes x / (1 + expf(-a x)), where expf overflows to inf for very negative x and
the result is -0. The reference must give the same values (finite, zero there) without emitting an
overflow RuntimeWarning into the worker's output. Real gpt-oss gate pre-activations reach such values;
random 1/sqrt(fan-in) test weights never do."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from orcd_core.backends.reference import ReferenceDevice
from orcd_core.device import Weight

GATES = np.array([[-200.0, -60.0, -3.0, 0.0, 2.5, 6.9, 7.0, 50.0]], np.float32)
UPS = np.array([[1.0, -2.0, 0.5, 3.0, -9.0, 8.0, 7.5, -0.25]], np.float32)


def _expected(act: str) -> np.ndarray:
    g, u = GATES.astype(np.float64), UPS.astype(np.float64)  # exp(200) is finite in float64
    if act == "silu":
        return g / (1 + np.exp(-g)) * u
    x, y = np.minimum(g, 7.0), np.clip(u, -7.0, 7.0)
    return x / (1 + np.exp(-1.702 * x)) * (y + 1)


def test_silu_mul_large_negative_gates_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ReferenceDevice().silu_mul(GATES, UPS)
    assert np.isfinite(out).all() and out[0, 0] == 0.0
    np.testing.assert_allclose(out, _expected("silu"), rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("act", ["silu", "swiglu_oai"])
def test_moe_large_negative_gates_without_warning(act):
    """One expert, identity-like weights: gate = x, up = UPS, down = identity; the output is the
    activation itself, compared with a float64 evaluation that cannot overflow."""
    dev = ReferenceDevice()
    F = GATES.shape[1]
    x = GATES.copy()  # [1, F] (D = F)
    gate_up = np.concatenate([np.eye(F), np.zeros((F, F))])[None].astype(np.float32)  # [1, 2F, F]
    gate_up_bias = np.concatenate([np.zeros(F), UPS[0]])[None].astype(np.float32)  # up = UPS
    router = Weight("router", (1, F), None, np.zeros((1, F), np.float32), 4 * F)
    w_gu = Weight("gate_up", gate_up.shape, None, gate_up, gate_up.nbytes)
    w_down = Weight("down", (1, F, F), None, np.eye(F, dtype=np.float32)[None], 4 * F * F)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = dev.moe(x, router, None, w_gu, gate_up_bias, w_down, None, top_k=1, act=act)
    assert np.isfinite(out).all() and out[0, 0] == 0.0
    np.testing.assert_allclose(out, _expected(act), rtol=1e-5, atol=1e-30)
