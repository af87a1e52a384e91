"""Every op of the reference device against a direct float64 transcription of llama.cpp's formula
(ggml/src/ggml-cpu/ops.cpp, src/llama-graph.cpp), on random data. Thresholds are stated per test:
the reference computes in float32, the oracles in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gguf.quants import dequantize as gguf_dequantize

from orcd_core.backends.reference import ReferenceDevice
from orcd_core.device import RopeSpec, Step
from orcd_core.floats import BF16, F16, F32
from orcd_core.gguf_file import TensorInfo
from orcd_core.rope import yarn_corr_dims

RNG = np.random.default_rng(1234)


def tensor(name: str, fmt, np_shape: tuple[int, ...], rng=RNG) -> TensorInfo:
    raw = fmt.quantize_random(rng, np_shape).reshape(-1)
    return TensorInfo(name, fmt.ggml_type, fmt.name, tuple(reversed(np_shape)), 0, raw.nbytes, raw)


@pytest.fixture
def dev():
    return ReferenceDevice()


def step_for(dev, positions, n_past):
    positions = list(positions)
    return Step(len(positions), dev.to_device(positions), dev.to_device(positions), dev.to_device([n_past]))


# -- memory ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [F32(), F16(), BF16()], ids=lambda f: f.name)
def test_upload_weight_dequantizes_like_gguf_py_and_fuses_rows(dev, fmt):
    a, b = tensor("a", fmt, (6, 8)), tensor("b", fmt, (3, 8))
    w = dev.upload_weight("ab", [a, b], fmt)
    expected = np.concatenate([gguf_dequantize(t.data, t.ggml_type).reshape(t.np_shape) for t in (a, b)])
    assert w.shape == (9, 8) and w.data.dtype == np.float32
    np.testing.assert_array_equal(w.data, expected)  # float types: bit-exact
    assert dev.memory_report()["weights"] == 9 * 8 * 4


def test_upload_weight_stacks_experts_along_rows(dev):
    fmt = F32()
    g, u = tensor("g", fmt, (4, 5, 8)), tensor("u", fmt, (4, 5, 8))
    w = dev.upload_weight("gu", [g, u], fmt)
    assert w.shape == (4, 10, 8)
    np.testing.assert_array_equal(w.data[:, 5:], u.data.view(np.float32).reshape(4, 5, 8))


def test_upload_weight_rejects_a_part_of_another_type(dev):
    with pytest.raises(ValueError, match="F16"):
        dev.upload_weight("x", [tensor("x", F16(), (2, 4))], F32())


def test_kv_cache_accounting_and_window_storage(dev):
    cache = dev.new_kv_cache(3, 100, 2, 8, window=[0, 16, 0])
    assert [k.shape[0] for k in cache.k] == [100, 16, 100]
    assert cache.k[0].dtype == np.float16
    assert dev.memory_report()["kv_cache"] == cache.nbytes == 2 * 2 * 8 * 2 * (100 + 16 + 100)
    dev.free_kv_cache(cache)
    assert dev.memory_report()["kv_cache"] == 0


# -- dense ops ---------------------------------------------------------------------------------------


def test_embedding_gathers_rows(dev):
    w = dev.upload_weight("tok", [tensor("tok", F16(), (50, 16))], F16())
    ids = dev.to_device([3, 0, 49, 3])
    np.testing.assert_array_equal(dev.embedding(w, ids), w.data[[3, 0, 49, 3]])


@pytest.mark.parametrize("T", [1, 7])
def test_linear_with_and_without_bias(dev, T):
    w = dev.upload_weight("w", [tensor("w", F32(), (24, 40))], F32())
    x = RNG.standard_normal((T, 40)).astype(np.float32)
    bias = dev.upload_array("b", RNG.standard_normal(24))
    ref = x.astype(np.float64) @ w.data.astype(np.float64).T
    np.testing.assert_allclose(dev.linear(x, w), ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dev.linear(x, w, bias), ref + bias, rtol=1e-5, atol=1e-4)


def test_linear_refuses_expert_stacks(dev):
    w = dev.upload_weight("e", [tensor("e", F32(), (2, 3, 8))], F32())
    with pytest.raises(ValueError, match="moe"):
        dev.linear(np.ones((1, 8), np.float32), w)


def test_rms_norm(dev):
    x = (RNG.standard_normal((5, 64)) * 3).astype(np.float32)
    w = RNG.standard_normal(64).astype(np.float32)
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(dev.rms_norm(x, w, 1e-6), ref, rtol=1e-5, atol=1e-5)


def test_layer_norm(dev):
    x = (RNG.standard_normal((5, 64)) * 2 + 1.5).astype(np.float32)
    w, b = RNG.standard_normal(64).astype(np.float32), RNG.standard_normal(64).astype(np.float32)
    x64 = x.astype(np.float64)
    mu = x64.mean(-1, keepdims=True)
    ref = (x64 - mu) / np.sqrt(((x64 - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * w + b
    np.testing.assert_allclose(dev.layer_norm(x, w, b, 1e-5), ref, rtol=1e-5, atol=1e-5)


def test_add_broadcasts_a_vector(dev):
    a = RNG.standard_normal((3, 8)).astype(np.float32)
    b = RNG.standard_normal(8).astype(np.float32)
    np.testing.assert_array_equal(dev.add(a, b), a + b[None])
    np.testing.assert_array_equal(dev.add(a, a), 2 * a)


def test_silu_mul(dev):
    g, u = (RNG.standard_normal((2, 3, 50)) * 4).astype(np.float32)
    g64 = g.astype(np.float64)
    np.testing.assert_allclose(dev.silu_mul(g, u), g64 / (1 + np.exp(-g64)) * u, rtol=1e-5, atol=1e-6)


def test_gelu_tanh_approximation(dev):
    x = (RNG.standard_normal(1000) * 4).astype(np.float32)
    x64 = x.astype(np.float64)
    ref = 0.5 * x64 * (1 + np.tanh(math.sqrt(2 / math.pi) * x64 * (1 + 0.044715 * x64**2)))
    np.testing.assert_allclose(dev.gelu(x), ref, rtol=1e-5, atol=1e-6)


def test_logits_last(dev):
    x = RNG.standard_normal((4, 11)).astype(np.float32)
    np.testing.assert_array_equal(dev.logits_last(x), x[3])


# -- rope --------------------------------------------------------------------------------------------


def rope_oracle(x, positions, spec: RopeSpec, freq_factors=None):
    """ggml_compute_forward_rope_flt, transcribed loop by loop in float64."""
    T, H, hd = x.shape
    out = x.astype(np.float64).copy()
    low, high = yarn_corr_dims(spec.n_rot, spec.n_ctx_orig, spec.base, spec.beta_fast, spec.beta_slow)
    for t in range(T):
        for i in range(spec.n_rot // 2):
            theta_ext = positions[t] * spec.base ** (-2.0 * i / spec.n_rot)
            if freq_factors is not None:
                theta_ext /= freq_factors[i]
            theta = spec.freq_scale * theta_ext
            mscale = spec.attn_factor
            if spec.ext_factor != 0:
                y = (i - low) / max(0.001, high - low)
                mix = (1 - min(1, max(0, y))) * spec.ext_factor
                theta = theta * (1 - mix) + theta_ext * mix
                mscale *= 1 + 0.1 * math.log(1 / spec.freq_scale)
            c, s = math.cos(theta) * mscale, math.sin(theta) * mscale
            a, b = (i, i + spec.n_rot // 2) if spec.neox else (2 * i, 2 * i + 1)
            x0, x1 = x[t, :, a].astype(np.float64), x[t, :, b].astype(np.float64)
            out[t, :, a] = x0 * c - x1 * s
            out[t, :, b] = x0 * s + x1 * c
    return out


ROPE_CASES = {
    "neox-full": dict(n_rot=32, neox=True, base=1e6),
    "normal-full": dict(n_rot=32, neox=False, base=10000.0),
    "neox-partial": dict(n_rot=24, neox=True, base=10000.0),  # phi3-style partial rotary
    "normal-freq-scale": dict(n_rot=32, neox=False, base=500000.0, freq_scale=0.25),
    "yarn": dict(n_rot=32, neox=True, base=150000.0, freq_scale=1 / 32, ext_factor=1.0, attn_factor=0.9,
                 beta_fast=32.0, beta_slow=1.0, n_ctx_orig=4096),
}


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
@pytest.mark.parametrize("with_factors", [False, True])
def test_rope(dev, case, with_factors):
    spec_kw = dict(ROPE_CASES[case])
    factors = RNG.uniform(1.0, 8.0, spec_kw["n_rot"] // 2).astype(np.float32) if with_factors else None
    spec = RopeSpec(**spec_kw, freq_factors=dev.upload_array("ff", factors) if with_factors else None)
    x = RNG.standard_normal((6, 3, 32)).astype(np.float32)
    positions = np.array([0, 1, 2, 17, 300, 2047], np.int32)
    got = dev.rope(x, dev.to_device(positions), spec)
    ref = rope_oracle(x, positions, spec, factors)
    # float32 angles of up to ~2000 rad: absolute error of cos/sin below ~2e-4
    np.testing.assert_allclose(got, ref, atol=2e-3, rtol=0)
    np.testing.assert_array_equal(got[..., spec.n_rot :], x[..., spec.n_rot :])  # pass-through dims
    mscale = spec.attn_factor * (1 + 0.1 * math.log(1 / spec.freq_scale) if spec.ext_factor else 1.0)
    np.testing.assert_allclose(got[0, :, : spec.n_rot], x[0, :, : spec.n_rot] * mscale, rtol=1e-6)  # angle 0


# -- attention ---------------------------------------------------------------------------------------


def attention_oracle(qs, ks, vs, scale, sinks=None, window=0):
    """Full causal attention over every position so far, float64, K/V rounded to fp16 as the cache
    stores them. qs [P, Hq, hd], ks/vs [P, Hkv, hd] for positions 0..P-1."""
    P, Hq, hd = qs.shape
    Hkv = ks.shape[1]
    ks = ks.astype(np.float16).astype(np.float64)
    vs = vs.astype(np.float16).astype(np.float64)
    out = np.zeros((P, Hq, hd))
    for p in range(P):
        for h in range(Hq):
            kv = h // (Hq // Hkv)
            keys = [j for j in range(p + 1) if window == 0 or j > p - window]
            s = np.array([qs[p, h].astype(np.float64) @ ks[j, kv] * scale for j in keys])
            m = s.max() if sinks is None else max(s.max(), sinks[h])
            e = np.exp(s - m)
            den = e.sum() + (0.0 if sinks is None else math.exp(sinks[h] - m))
            out[p, h] = (e / den) @ vs[keys, kv]
    return out


@pytest.mark.parametrize(
    "Hq,Hkv,window,use_sinks,chunks",
    [
        (4, 4, 0, False, [9, 1, 1, 1]),  # MHA: prefill then decode
        (6, 2, 0, False, [5, 4, 1, 1, 1]),  # GQA, chunked prefill
        (4, 2, 4, True, [7, 1, 1, 3, 1]),  # sliding window (ring buffer of 4) + sinks
        (8, 1, 3, False, [1, 1, 1, 1, 1, 1, 6]),  # MQA, window 3, a chunk longer than the window
    ],
)
def test_attention_over_steps(dev, Hq, Hkv, window, use_sinks, chunks):
    hd, P = 16, sum(chunks)
    qs = RNG.standard_normal((P, Hq, hd)).astype(np.float32)
    ks = RNG.standard_normal((P, Hkv, hd)).astype(np.float32)
    vs = RNG.standard_normal((P, Hkv, hd)).astype(np.float32)
    sinks = RNG.standard_normal(Hq).astype(np.float32) * 2 if use_sinks else None
    scale = 1 / math.sqrt(hd)
    cache = dev.new_kv_cache(2, 64, Hkv, hd, window=[0, window])
    got, n = [], 0
    for T in chunks:
        step = step_for(dev, range(n, n + T), n)
        got.append(dev.attention(qs[n : n + T], ks[n : n + T], vs[n : n + T], cache, 1, step,
                                 scale=scale, sinks=sinks, window=window))
        n += T
    ref = attention_oracle(qs, ks, vs, scale, sinks, window)
    np.testing.assert_allclose(np.concatenate(got), ref, atol=2e-5, rtol=1e-4)
    assert not cache.k[0].any()  # layer 0 untouched


# -- moe ---------------------------------------------------------------------------------------------


def moe_oracle(x, router, rb, gu, gub, down, db, top_k, act, alpha, limit):
    T, _ = x.shape
    F = gu.shape[1] // 2
    out = np.zeros((T, down.shape[1]))
    for t in range(T):
        logits = router @ x[t] + (rb if rb is not None else 0)
        chosen = sorted(range(len(logits)), key=lambda e: (-logits[e], e))[:top_k]
        w = np.exp(logits[chosen] - logits[chosen].max())
        w /= w.sum()
        for wt, e in zip(w, chosen):
            h = gu[e] @ x[t] + (gub[e] if gub is not None else 0)
            g, u = h[:F], h[F:]
            if act == "silu":
                a = g / (1 + np.exp(-g)) * u
            else:
                g = np.minimum(g, limit)
                u = np.clip(u, -limit, limit)
                a = g / (1 + np.exp(-alpha * g)) * (u + 1)
            out[t] += wt * (down[e] @ a + (db[e] if db is not None else 0))
    return out


@pytest.mark.parametrize("act,biases", [("swiglu_oai", True), ("silu", False)])
def test_moe(dev, act, biases):
    E, D, F, T, k = 6, 16, 12, 5, 2
    router = dev.upload_weight("r", [tensor("r", F32(), (E, D))], F32())
    gate_up = dev.upload_weight("gu", [tensor("g", F16(), (E, F, D)), tensor("u", F16(), (E, F, D))], F16())
    down = dev.upload_weight("d", [tensor("d", F16(), (E, D, F))], F16())
    rb = dev.upload_array("rb", RNG.standard_normal(E)) if biases else None
    gub = dev.upload_array("gub", RNG.standard_normal((E, 2 * F))) if biases else None
    db = dev.upload_array("db", RNG.standard_normal((E, D))) if biases else None
    x = (RNG.standard_normal((T, D)) * 2).astype(np.float32)  # large enough that the clamp (limit 7) bites
    got = dev.moe(x, router, rb, gate_up, gub, down, db, top_k=k, act=act, alpha=1.702, limit=7.0)
    ref = moe_oracle(x.astype(np.float64), router.data, rb, gate_up.data, gub, down.data, db, k, act, 1.702, 7.0)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-3)
    if act == "swiglu_oai":  # the clamp must have been active somewhere for this test to mean anything
        h = np.einsum("efd,td->tef", gate_up.data, x)
        assert (np.abs(h) > 7).any()


def test_moe_unknown_activation(dev):
    w = dev.upload_weight("r", [tensor("r", F32(), (2, 4))], F32())
    gu = dev.upload_weight("gu", [tensor("gu", F32(), (2, 4, 4))], F32())
    dn = dev.upload_weight("dn", [tensor("dn", F32(), (2, 4, 2))], F32())
    with pytest.raises(ValueError, match="gelu"):
        dev.moe(np.ones((1, 4), np.float32), w, None, gu, None, dn, None, top_k=1, act="gelu")


# -- sample ------------------------------------------------------------------------------------------


def test_sample_greedy_and_seeded(dev):
    from orcd_core.generation import SamplingParams
    from orcd_core.sampling import sample

    logits = RNG.standard_normal(100).astype(np.float32)
    greedy = dev.sample(logits, SamplingParams(temperature=0), dev.to_device([-1] * 8), dev.to_device([0]))
    assert greedy.dtype == np.int32 and greedy.shape == (1,) and int(greedy[0]) == int(np.argmax(logits))
    params = SamplingParams(temperature=0.8, top_k=20, seed=7, repetition_penalty=1.3)
    recent = [5, -1, 9]
    got = dev.sample(logits, params, dev.to_device(recent), dev.to_device([3]))
    assert int(got[0]) == sample(logits, params, [5, 9], 3)


@pytest.mark.parametrize("top_k", [0, 40])
def test_sample_top_p_zero_is_the_argmax(dev, top_k):
    """top_p 0 keeps the smallest prefix of the sorted candidates reaching 0, which is the most probable
    token alone (llama.cpp keeps at least one): the lowest id among equal maxima, whatever the draw."""
    from orcd_core.generation import SamplingParams

    for step in range(20):
        logits = RNG.standard_normal(500).astype(np.float32) * 3
        tied = RNG.choice(500, 3, replace=False)
        logits[tied] = logits.max() + 0.5
        params = SamplingParams(temperature=1.5, top_k=top_k, top_p=0.0, seed=step)
        got = dev.sample(logits, params, dev.to_device([-1] * 8), dev.to_device([step]))
        assert int(got[0]) == int(tied.min()), step
