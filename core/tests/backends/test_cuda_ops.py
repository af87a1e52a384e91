"""Every CUDA kernel against the NumPy reference, on random data (never zeros), for every tensor type
the installed plugins register, on odd and aligned shapes. The per-step workspace (where every op's
output lives) is filled with NaN bytes before each op, so an element a kernel fails to write fails
the comparison.

Thresholds: decode GEMV relative L2 <= 1e-3 and elementwise within 1e-3 of the largest output, for both
kernels: FMA per weight (fp32 throughout) and tensor cores (tf32 operands: weights and x rounded to 11
significant bits, relative error <= 2^-11 each, ~4e-4 RMS per product on random data; fp32 sums);
anything through fp16 (the prefill GEMM operands, the KV cache) <= 1e-2; norms, RoPE, element-wise ops
1e-5..1e-4; the row gather and argmax/sampling exactly. Each decode GEMV gives a row the same bits
whether it is launched alone or with up to GEMV_MAX_T rows (what batched decoding relies on).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from gguf.quants import dequantize as gguf_dequantize

from orcd_core.backends.reference import ReferenceDevice
from orcd_core.device import MAX_STEP_TOKENS, RopeSpec, Step
from orcd_core.generation import SamplingParams
from orcd_core.gguf_file import TensorInfo
from orcd_core.plugins import default_registry
from orcd_core import sampling
from orcd_core.testing.cuda import cuda_dev, require_cuda_gpu  # noqa: F401 (the `dev` fixture)

pytestmark = pytest.mark.gpu

cupy = require_cuda_gpu()

REG = default_registry()
FORMATS = sorted((f for f in REG.quant_formats.values() if f.cuda_source is not None), key=lambda f: f.name)


@pytest.fixture(params=["tc", "ffma"])
def gemv_kind(request, dev):
    """The decode GEMV kernel a test runs (CudaDevice.decode_gemv): tensor cores (sm_80 on) or FMA."""
    if request.param == "tc" and int(dev.sm) < 80:
        pytest.skip("tensor-core GEMV needs compute capability 8.0")
    before = dev.decode_gemv
    dev.decode_gemv = request.param
    yield request.param
    dev.decode_gemv = before


@pytest.fixture
def rng(request):
    return np.random.default_rng(abs(hash(request.node.name)) % (1 << 32))


def tensor(name, fmt, np_shape, rng, scale=1.0):
    raw = fmt.quantize_random(rng, np_shape, scale).reshape(-1)
    return TensorInfo(name, fmt.ggml_type, fmt.name, tuple(reversed(np_shape)), 0, raw.nbytes, raw)


def dequant(t: TensorInfo) -> np.ndarray:
    return gguf_dequantize(t.data, t.ggml_type).reshape(t.np_shape).astype(np.float64)


def poison(dev):
    """A new step whose workspace holds NaN everywhere."""
    dev.begin_step()
    a = dev.workspace.arena
    cupy.cuda.runtime.memsetAsync(a.ptr, 0xFF, a.size, dev.stream.ptr)


def host(dev, x):
    return np.asarray(dev.to_host(x), dtype=np.float64)


def rel_l2(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def shapes_for(fmt):
    qk = max(fmt.block_size, 32)
    # odd rows / odd block count, aligned, and long rows (>= 64 items of 32)
    return [(37, 3 * qk), (128, 8 * qk), (301, max(qk, 64 * 32 // qk * qk))]


# ---- quantized weights -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("shape_i", [0, 1, 2], ids=["odd", "aligned", "long-rows"])
@pytest.mark.parametrize("T", [1, 3, 8])
def test_gemv_matches_dequantized_matmul(dev, rng, fmt, shape_i, T, gemv_kind):
    N, K = shapes_for(fmt)[shape_i]
    t = tensor("w", fmt, (N, K), rng)
    w = dev.upload_weight("w", [t], fmt)
    x = randn(rng, T, K)
    bias = randn(rng, N)
    ref = x.astype(np.float64) @ dequant(t).T + bias
    poison(dev)
    y = host(dev, dev.linear(dev.to_device(x, "float32"), w, dev.upload_array("b", bias)))
    assert y.shape == (T, N) and np.isfinite(y).all()
    assert rel_l2(y, ref) <= 1e-3
    assert np.max(np.abs(y - ref)) <= 1e-3 * np.max(np.abs(ref))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("mode", ["plain", "rms", "silu"])
def test_gemv_rows_do_not_depend_on_the_batch(dev, ref, rng, fmt, mode, gemv_kind):
    """8 rows in one launch give each row the bits it gets launched alone (plain x, a norm, a silu_mul),
    with the residual epilogue, on a shape with a partial last tile of rows (37) and, for 32-element
    blocks, a short last slab of K (161 items). K is long enough that both kernels stage 8 rows in
    chunks and do not fuse their norm (rms_norm_rows, then the GEMV) while one row's is fused: the
    same values."""
    qk = max(fmt.block_size, 32)
    N, K = 37, 161 * 32 if qk == 32 else 21 * qk
    t = tensor("w", fmt, (N, K), rng)
    w = dev.upload_weight("w", [t], fmt)
    x, nw, res = randn(rng, 8, 2 * K) * 2, randn(rng, K), randn(rng, 8, N)
    NW = dev.to_device(nw, "float32")

    def run(rows):
        X, RES = dev.to_device(x[rows], "float32"), dev.to_device(res[rows], "float32")
        poison(dev)
        h = (X[:, :K] if mode == "plain" else dev.rms_norm(X[:, :K], NW, 1e-6) if mode == "rms"
             else dev.silu_mul(X[:, :K], X[:, K:]))
        return np.asarray(dev.to_host(dev.add(RES, dev.linear(h, w))))

    together = run(slice(0, 8))
    assert np.isfinite(together).all()
    for i in range(8):
        np.testing.assert_array_equal(run(slice(i, i + 1))[0], together[i], err_msg=f"row {i}")
    want = res + (x[:, :K] if mode == "plain" else ref.rms_norm(x[:, :K], nw, 1e-6) if mode == "rms"
                  else ref.silu_mul(x[:, :K], x[:, K:])).astype(np.float64) @ dequant(t).T
    assert rel_l2(together, want) <= 1e-3


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("shape_i", [0, 1], ids=["odd", "aligned"])
def test_prefill_linear_dequantize_f16_and_cublas(dev, rng, fmt, shape_i):
    N, K = shapes_for(fmt)[shape_i]
    T = 37
    t = tensor("w", fmt, (N, K), rng)
    w = dev.upload_weight("w", [t], fmt)
    x = randn(rng, T, K)
    ref = x.astype(np.float64) @ dequant(t).T
    poison(dev)
    y = host(dev, dev.linear(dev.to_device(x, "float32"), w))
    assert np.isfinite(y).all()
    assert rel_l2(y, ref) <= 1e-2  # fp16 operands, fp32 accumulation


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_dequantize_f16_kernel(dev, rng, fmt):
    N, K = shapes_for(fmt)[0]
    t = tensor("w", fmt, (N, K), rng)
    w = dev.upload_weight("w", [t], fmt)
    out = cupy.full((N, K), np.nan, dtype=np.float16)
    ks = dev.format_kernels(fmt)
    from orcd_core.backends.cuda.kernels import i32, i64, launch

    launch(ks.fn(f"dequant_f16_{fmt.name}"), ((N * K // 32 + 127) // 128,), (128,),
           (w.data.data, i64(w.data.row_bytes), out, i32(0), i32(N), i32(K)))
    got = cupy.asnumpy(out).astype(np.float64)
    ref = dequant(t)
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3 * np.max(np.abs(ref)) * 1e-2)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_embedding_row_gather_is_exact(dev, rng, fmt):
    N, K = shapes_for(fmt)[0]
    t = tensor("w", fmt, (N, K), rng)
    w = dev.upload_weight("w", [t], fmt)
    ids = np.array([0, N - 1, 5, 5, 17], np.int32)
    poison(dev)
    got = host(dev, dev.embedding(w, dev.to_device(ids)))
    np.testing.assert_array_equal(got.astype(np.float32), dequant(t).astype(np.float32)[ids])


def test_fused_upload_concatenates_rows(dev, rng):
    fmt = REG.quant_format_by_name("Q8_0")
    a, b = tensor("a", fmt, (7, 64), rng), tensor("b", fmt, (5, 64), rng)
    w = dev.upload_weight("ab", [a, b], fmt)
    assert w.shape == (12, 64)
    x = randn(rng, 1, 64)
    poison(dev)
    y = host(dev, dev.linear(dev.to_device(x, "float32"), w))
    ref = x.astype(np.float64) @ np.concatenate([dequant(a), dequant(b)]).T
    assert rel_l2(y, ref) <= 1e-3


# ---- norms, rope, element-wise -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ref():
    return ReferenceDevice()


@pytest.mark.parametrize("D", [897, 1024, 3072])
def test_rms_norm_and_layer_norm(dev, ref, rng, D):
    x, w, b = randn(rng, 5, D) * 3, randn(rng, D), randn(rng, D)
    poison(dev)
    got = host(dev, dev.rms_norm(dev.to_device(x, "float32"), dev.upload_array("w", w), 1e-6))
    np.testing.assert_allclose(got, ref.rms_norm(x, w, 1e-6), rtol=1e-5, atol=1e-5)
    poison(dev)
    got = host(dev, dev.layer_norm(dev.to_device(x, "float32"), dev.upload_array("w", w), dev.upload_array("b", b), 1e-5))
    np.testing.assert_allclose(got, ref.layer_norm(x, w, b, 1e-5), rtol=1e-4, atol=1e-4)


ROPES = {
    "neox": dict(n_rot=64, neox=True, base=1e6),
    "normal": dict(n_rot=64, neox=False, base=1e4),
    "partial": dict(n_rot=32, neox=True, base=1e4),
    "phi3-96": dict(n_rot=96, neox=True, base=1e4),
    "freq-factors": dict(n_rot=64, neox=False, base=5e5),
    "yarn": dict(n_rot=64, neox=True, base=1.5e5, freq_scale=1 / 32, ext_factor=1.0, attn_factor=1.0,
                 beta_fast=32.0, beta_slow=1.0, n_ctx_orig=4096),
}


@pytest.mark.parametrize("kind", sorted(ROPES))
def test_rope(dev, ref, rng, kind):
    kw = dict(ROPES[kind])
    hd = 96 if kind == "phi3-96" else 64
    T, H = 7, 5
    ff = (1.0 + rng.random(kw["n_rot"] // 2)).astype(np.float32) if kind == "freq-factors" else None
    x = randn(rng, T, H, hd)
    pos = np.array([0, 1, 2, 100, 1000, 4000, 30000], np.int32)
    spec_ref = RopeSpec(**kw, freq_factors=ff)
    spec_gpu = RopeSpec(**kw, freq_factors=dev.upload_array("ff", ff) if ff is not None else None)
    poison(dev)
    got = host(dev, dev.rope(dev.to_device(x, "float32"), dev.to_device(pos), spec_gpu))
    want = ref.rope(x, pos, spec_ref)
    # angles up to 3e4 rad in float32: the two sides' theta differ by a few ulp of the angle
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3 * np.abs(want).max())
    np.testing.assert_allclose(got[:3], want[:3], rtol=1e-5, atol=1e-5)


def test_strided_activation_views_are_made_contiguous(dev, rng):
    x = randn(rng, 6, 40)
    poison(dev)
    xs = dev.to_device(x, "float32")[:, 8:24]  # a column slice, as q|k|v splits
    got = host(dev, dev.add(xs, xs))
    np.testing.assert_array_equal(got, 2 * x[:, 8:24])


def test_elementwise(dev, ref, rng):
    a, b = randn(rng, 3, 1001) * 4, randn(rng, 3, 1001)
    bias = randn(rng, 1001)
    A, B = dev.to_device(a, "float32"), dev.to_device(b, "float32")
    poison(dev)
    np.testing.assert_allclose(host(dev, dev.add(A, B)), a + b, rtol=1e-6)
    poison(dev)
    np.testing.assert_allclose(host(dev, dev.add(A, dev.upload_array("bias", bias))), a + bias, rtol=1e-6)
    poison(dev)
    np.testing.assert_allclose(host(dev, dev.silu_mul(A, B)), ref.silu_mul(a, b), rtol=1e-5, atol=1e-6)
    poison(dev)
    np.testing.assert_allclose(host(dev, dev.gelu(A)), ref.gelu(a), rtol=1e-5, atol=1e-6)


# ---- attention ---------------------------------------------------------------------------------------


def _step(d, positions, n_past):
    positions = list(positions)
    return Step(len(positions), d.to_device(positions), d.to_device(positions), d.to_device([n_past]))


@pytest.mark.parametrize("cfg", [
    dict(Hq=14, Hkv=2, hd=64, T=45, window=0, sinks=False),
    dict(Hq=32, Hkv=32, hd=96, T=33, window=0, sinks=False),
    dict(Hq=8, Hkv=2, hd=128, T=20, window=0, sinks=False),
    dict(Hq=8, Hkv=2, hd=64, T=40, window=16, sinks=True),
    # a sliding-window layer's ring (16 + 511 rows on CUDA): a 512-token step more than the window
    # long, a second step that wraps the ring, decode steps on the wrapped ring (gpt-oss: window 128)
    dict(Hq=8, Hkv=2, hd=64, T=600, window=16, sinks=True, ring=True),
    # long chunks: the second (positions 512 .. T - 1) reads up to 11 key tiles of the tensor-core kernel,
    # whose warps skip the tiles past their queries
    dict(Hq=14, Hkv=2, hd=64, T=690, window=0, sinks=False),
    dict(Hq=8, Hkv=4, hd=128, T=650, window=0, sinks=True),
    dict(Hq=8, Hkv=8, hd=96, T=620, window=100, sinks=False),
], ids=["qwen-gqa", "phi3-mha-96", "hd128", "window-sinks", "window-ring", "long-gqa", "long-hd128-sinks",
        "long-96-window"])
def test_attention_prefill_then_decode(dev, ref, rng, cfg):
    Hq, Hkv, hd, T, window = cfg["Hq"], cfg["Hkv"], cfg["hd"], cfg["T"], cfg["window"]
    n_ctx = 700
    sinks = randn(rng, Hq) if cfg["sinks"] else None
    windows = [window] if cfg.get("ring") else None
    gc = dev.new_kv_cache(1, n_ctx, Hkv, hd, windows)
    rc = ref.new_kv_cache(1, n_ctx, Hkv, hd, windows)
    if windows:
        assert gc.k[0].shape[0] == window + MAX_STEP_TOKENS - 1 < n_ctx
    scale = 1.0 / math.sqrt(hd)
    sk = dev.upload_array("sinks", sinks) if sinks is not None else None
    # prefill in two chunks (the second reads the first from the cache), then 3 decode steps
    first = min(T - 7, MAX_STEP_TOKENS)
    chunks = [(0, first), (first, T)] + [(T + i, T + i + 1) for i in range(3)]
    try:
        for lo, hi in chunks:
            n = hi - lo
            q, k, v = randn(rng, n, Hq, hd), randn(rng, n, Hkv, hd), randn(rng, n, Hkv, hd)
            want = ref.attention(q, k, v, rc, 0, _step(ref, range(lo, hi), lo), scale=scale, sinks=sinks, window=window)
            step = _step(dev, range(lo, hi), lo)
            poison(dev)
            got = host(dev, dev.attention(dev.to_device(q, "float32"), dev.to_device(k, "float32"),
                                          dev.to_device(v, "float32"), gc, 0, step, scale=scale, sinks=sk,
                                          window=window))
            assert got.shape == (n, Hq, hd) and np.isfinite(got).all()
            assert rel_l2(got, want) <= 1e-3, (lo, hi)
    finally:
        dev.free_kv_cache(gc)


def test_a_step_longer_than_the_ring_holds_is_refused(dev, rng):
    gc = dev.new_kv_cache(1, 2000, 2, 64, [16])
    try:
        T = MAX_STEP_TOKENS + 1  # more keys than window + MAX_STEP_TOKENS - 1 rows can keep apart
        q, k = dev.to_device(randn(rng, T, 8, 64), "float32"), dev.to_device(randn(rng, T, 2, 64), "float32")
        dev.begin_step()
        with pytest.raises(ValueError, match="keeps 527 positions"):
            dev.attention(q, k, k, gc, 0, _step(dev, range(T), 0), scale=0.125, window=16)
    finally:
        dev.free_kv_cache(gc)


@pytest.mark.parametrize("Hq, Hkv, hd, sinks", [(4, 1, 64, False), (8, 8, 96, True), (8, 2, 128, True), (6, 3, 8, False)],
                         ids=["gqa-64", "mha-96-sinks", "gqa-128-sinks", "hd-8"])
@pytest.mark.parametrize("P", [40, 200, 1500])  # one split (normalized by the split itself), two, 12 (combined)
def test_decode_attention_splits_over_a_long_context(dev, ref, rng, Hq, Hkv, hd, sinks, P):
    n_ctx = 2048  # 128-key splits (planner.decode_splits: a function of the query's span)
    sk = randn(rng, Hq) if sinks else None
    gc, rc = dev.new_kv_cache(1, n_ctx, Hkv, hd), ref.new_kv_cache(1, n_ctx, Hkv, hd)
    scale = 1.0 / math.sqrt(hd)
    try:
        k, v = randn(rng, P, Hkv, hd), randn(rng, P, Hkv, hd)
        q = randn(rng, P, Hq, hd)
        ref.attention(q, k, v, rc, 0, _step(ref, range(P), 0), scale=scale)
        dev.begin_step()
        dev.attention(dev.to_device(q, "float32"), dev.to_device(k, "float32"), dev.to_device(v, "float32"), gc, 0,
                      _step(dev, range(P), 0), scale=scale)
        dsk = dev.upload_array("sinks", sk) if sinks else None
        for i in range(2):  # two decode tokens: the counters the first step's combine reset serve the second
            q1, k1, v1 = randn(rng, 1, Hq, hd) * 3, randn(rng, 1, Hkv, hd), randn(rng, 1, Hkv, hd)
            want = ref.attention(q1, k1, v1, rc, 0, _step(ref, [P + i], P + i), scale=scale, sinks=sk)
            poison(dev)
            got = host(dev, dev.attention(dev.to_device(q1, "float32"), dev.to_device(k1, "float32"),
                                          dev.to_device(v1, "float32"), gc, 0, _step(dev, [P + i], P + i), scale=scale,
                                          sinks=dsk))
            assert np.isfinite(got).all()
            assert rel_l2(got, want) <= 1e-3, i
    finally:
        dev.free_kv_cache(gc)


@pytest.mark.parametrize("positions", [[8191, 300, 5], [8192, 40], [20000, 8500, 16383]],
                         ids=["64-splits-of-128", "33-splits-of-256", "79-splits-of-256"])
def test_decode_attention_of_a_bounded_batched_step(dev, ref, rng, positions):
    """A batched decode step (one token per row, each row's cache through the table) whose KVBatch
    bounds the rows' positions (`span`, as the decode graphs set it) launches the splits that bound
    needs only: every row's output is the reference's, and bit for bit the one of the same step with
    no bound (the context's splits). The rows' spans straddle a doubling of the split (8,192 keys: 64
    splits of 128; 8,193: 33 of 256)."""
    import cupy

    from orcd_core.backends.cuda.planner import decode_span_bound
    from orcd_core.device import KVBatch

    Hq, Hkv, hd, n_ctx = 14, 2, 64, 32768
    scale = 1.0 / math.sqrt(hd)
    B = len(positions)
    gcs = [dev.new_kv_cache(1, n_ctx, Hkv, hd) for _ in positions]
    try:
        q, k, v = randn(rng, B, Hq, hd) * 3, randn(rng, B, Hkv, hd), randn(rng, B, Hkv, hd)
        want = []
        for b, P in enumerate(positions):  # each row's past keys written straight into both caches
            pk, pv = randn(rng, P, Hkv, hd).astype(np.float16), randn(rng, P, Hkv, hd).astype(np.float16)
            rc = ref.new_kv_cache(1, n_ctx, Hkv, hd)
            rc.k[0][:P], rc.v[0][:P] = pk, pv
            gcs[b].k[0][:P], gcs[b].v[0][:P] = cupy.asarray(pk), cupy.asarray(pv)
            want.append(ref.attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], rc, 0, _step(ref, [P], P), scale=scale)[0])
        table = cupy.asarray(np.array([[[c.k[0].data.ptr for c in gcs], [c.v[0].data.ptr for c in gcs]]], np.uint64))
        bound = decode_span_bound(max(positions) + 1, n_ctx)
        got = {}
        for span in (bound, 0):
            pos = dev.to_device(positions)
            step = Step(B, pos, pos, pos)
            kv = KVBatch(list(gcs), n_ctx, [0], table, span=span)
            dev.begin_step()
            poison(dev)
            got[span] = host(dev, dev.attention(dev.to_device(q, "float32"), dev.to_device(k, "float32"),
                                                dev.to_device(v, "float32"), kv, 0, step, scale=scale))
        for b in range(B):
            assert rel_l2(got[bound][b], want[b]) <= 1e-3, positions[b]
        np.testing.assert_array_equal(got[bound], got[0])
    finally:
        for c in gcs:
            dev.free_kv_cache(c)


# ---- argmax and sampling -------------------------------------------------------------------------------


@pytest.mark.parametrize("V", [1001, 151936])
def test_greedy_argmax_lowest_id_on_ties(dev, rng, V):
    x = randn(rng, V)
    x[V // 3] = x[V - 2] = x.max() + 1.0  # a tie: the lowest id wins
    poison(dev)
    logits, step_index = dev.to_device(x, "float32"), dev.to_device([0])
    got = int(dev.to_host(dev.sample(logits, SamplingParams(temperature=0.0), None, step_index))[0])
    assert got == V // 3


@pytest.mark.parametrize("V", [1001, 151936])
def test_the_greedy_argmax_sampler_picks_as_the_full_one(dev, rng, V):
    """Sampler.sample_rows(greedy=True), the argmax of the logits themselves (the decode graphs of
    all-greedy steps), against the six-launch path on the same 8 rows of plain-greedy parameters: the
    same ids, ties to the lowest id included, and two launches instead of six."""
    import orcd_core.backends.cuda.sampler as S
    from orcd_core.backends.cuda.sampler import RowState

    B = 8
    x = randn(rng, B, V) * 3
    for b in range(0, B, 2):  # ties at the top in half the rows
        i, j = sorted(rng.choice(V, 2, replace=False))
        x[b, i] = x[b, j] = x[b].max() + 1.0
    st = RowState(B)
    st.fill([(0, 0, 0, SamplingParams(temperature=0.0), []) for _ in range(B)], dev.stream)
    logits = dev.to_device(x, "float32")
    sampler = dev.sampler_for(V)
    got = {}
    for greedy in (False, True):
        names = []
        real = S.launch
        S.launch = lambda fn, *a, **k: (names.append(fn), real(fn, *a, **k))[1]
        try:
            poison(dev)
            got[greedy] = dev.to_host(sampler.sample_rows(logits, st, greedy=greedy)).tolist()
        finally:
            S.launch = real
        assert len(names) == (2 if greedy else 6), names
    assert got[True] == got[False] == [int(np.argmax(r)) for r in x]


SAMPLERS = {
    "greedy": SamplingParams(temperature=0.0),
    "greedy-penalty": SamplingParams(temperature=0.0, repetition_penalty=1.5),
    "temp": SamplingParams(temperature=0.7, seed=42),
    "top-k": SamplingParams(temperature=1.0, top_k=40, seed=7),
    "top-p": SamplingParams(temperature=0.9, top_p=0.9, seed=3),
    "min-p": SamplingParams(temperature=1.3, min_p=0.05, seed=11),
    "all": SamplingParams(temperature=0.8, top_k=100, top_p=0.95, min_p=0.02, repetition_penalty=1.3, seed=2**63 + 5),
    "freq-presence": SamplingParams(temperature=0.9, repetition_penalty=1.1, frequency_penalty=0.7,
                                    presence_penalty=0.4, seed=5),
    "greedy-presence": SamplingParams(temperature=0.0, frequency_penalty=2.0, presence_penalty=2.0),
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("V", [1001, 151936])
def test_sampling_reproduces_the_reference_rule(dev, rng, name, V):
    params = SAMPLERS[name]
    for step_index in range(12):
        logits = randn(rng, V) * 3
        logits[rng.integers(0, V, 3)] += 8  # a few strong candidates, as real logits have
        recent = rng.integers(0, V, 64).astype(np.int32)
        recent[:5] = -1
        want = sampling.sample(logits, params, recent[recent >= 0], step_index)
        poison(dev)
        got = dev.sample(dev.to_device(logits, "float32"), params, dev.to_device(recent), dev.to_device([step_index]))
        assert int(dev.to_host(got)[0]) == want, (name, step_index)


@pytest.mark.parametrize("top_p", [0.0, 1e-9])
@pytest.mark.parametrize("top_k", [0, 40])
@pytest.mark.parametrize("V", [1001, 151936])
def test_tiny_top_p_keeps_only_the_most_probable_token(dev, rng, top_p, top_k, V):
    """top_p 0 (a target mass of 0) and 1e-9 keep the most probable token alone, the lowest id among
    equal maxima, as the reference rule does."""
    for step_index in range(12):
        logits = randn(rng, V) * 3
        tied = rng.choice(V, 3, replace=False)
        logits[tied] = logits.max() + 1.0  # a tie at the top: the lowest id wins
        params = SamplingParams(temperature=1.5, top_k=top_k, top_p=top_p, seed=step_index)
        want = sampling.sample(logits, params, [], step_index)
        assert want == int(tied.min())
        poison(dev)
        got = dev.sample(dev.to_device(logits, "float32"), params, dev.to_device(np.full(8, -1, np.int32)),
                         dev.to_device([step_index]))
        assert int(dev.to_host(got)[0]) == want, (top_p, step_index)


# ---- fused decode ops (backends/cuda/fusion.py) ---------------------------------------------------------
# A one-token rms_norm or silu_mul is staged by the GEMV that reads it, a one-token GEMV feeding an add
# takes the other operand as its residual, and rope(q), rope(k) feeding attention are one launch with
# the KV write. Same thresholds as the unfused ops they replace.

FUSE_FORMATS = [f for f in FORMATS if f.name in ("Q4_K", "Q5_0", "Q8_0", "MXFP4", "F16")]


def _count_launches(monkeypatch):
    import orcd_core.backends.cuda.device as D

    n = [0]
    orig = D.launch

    def counting(*a, **k):
        n[0] += 1
        return orig(*a, **k)

    monkeypatch.setattr(D, "launch", counting)
    return n


@pytest.mark.parametrize("fmt", FUSE_FORMATS, ids=lambda f: f.name)
def test_fused_norm_gemv_residual(dev, ref, rng, fmt, monkeypatch, gemv_kind):
    N, K = shapes_for(fmt)[1]
    t = tensor("w", fmt, (N, K), rng)
    w = dev.upload_weight("w", [t], fmt)
    x, nw, res, bias = randn(rng, 1, K) * 3, randn(rng, K), randn(rng, 1, N), randn(rng, N)
    want = res + ref.rms_norm(x, nw, 1e-6).astype(np.float64) @ dequant(t).T + bias
    X, NW, RES, B = (dev.to_device(a, "float32") for a in (x, nw, res, bias))
    poison(dev)
    n = _count_launches(monkeypatch)
    y = dev.add(RES, dev.linear(dev.rms_norm(X, NW, 1e-6), w, B))
    assert n[0] == 1  # norm, GEMV, bias and residual: one kernel
    got = host(dev, y)
    assert rel_l2(got, want) <= 1e-3


@pytest.mark.parametrize("fmt", FUSE_FORMATS, ids=lambda f: f.name)
def test_fused_silu_mul_gemv(dev, ref, rng, fmt, monkeypatch, gemv_kind):
    N, K = shapes_for(fmt)[1]
    t = tensor("w", fmt, (N, K), rng)
    w = dev.upload_weight("w", [t], fmt)
    gu = randn(rng, 1, 2 * K) * 2  # one gate|up output, split into column slices
    want = ref.silu_mul(gu[:, :K], gu[:, K:]).astype(np.float64) @ dequant(t).T
    GU = dev.to_device(gu, "float32")
    poison(dev)
    n = _count_launches(monkeypatch)
    y = dev.linear(dev.silu_mul(GU[:, :K], GU[:, K:]), w)
    got = host(dev, y)
    assert n[0] == 1
    assert rel_l2(got, want) <= 1e-3


Q8_FORMATS = [f for f in FORMATS if f.name in ("Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4")]


def _q8_rounded(x):
    """x as quantize_q8 rounds it (q8.cuh): per 32 elements q = rint(x * (127 / amax)) (float32, ties to
    even), times d = amax / 127."""
    xb = x.astype(np.float32).reshape(x.shape[0], -1, 32)
    amax = np.abs(xb).max(axis=2, keepdims=True)
    inv = np.where(amax > 0, np.float32(127.0) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.rint(xb * inv)
    return (q * (amax / np.float32(127.0))).reshape(x.shape).astype(np.float64)


@pytest.fixture
def q8(dev):
    """The int8-activation decode GEMVs (CudaDevice.decode_gemv "q8") for one test."""
    before = dev.decode_gemv
    dev.decode_gemv = "q8"
    yield
    dev.decode_gemv = before


@pytest.mark.parametrize("N", [301, 8200], ids=["rows-301", "rows-8200"])
@pytest.mark.parametrize("mode", ["plain", "rms", "silu"])
@pytest.mark.parametrize("fmt", Q8_FORMATS, ids=lambda f: f.name)
def test_int8_activation_gemv(dev, ref, rng, fmt, mode, N, monkeypatch, q8):
    """quantize_q8 + gemv_q8_* (one token): within relative L2 1e-3 of float64 with x rounded as the kernel
    rounds it (what is left: float32 sums, and the rare element whose rounding flips between the two
    norms; a wrong scale, min, offset or element order is off by far more), and within 2e-2 of float64
    of the exact x (x rounded to int8 per 32 elements moves each element by up to 1/254 of its group's
    largest |x|: measured 5e-3 to 1.03e-2, the most for silu(g) * u, whose heavy tails make a group's
    largest |x| several times its RMS). The input op, the GEMV, bias and residual: two launches. 8,200
    rows take several rows a warp."""
    qk = max(fmt.block_size, 32)
    Ks = (qk, 3 * qk if qk == 32 else 12 * qk, 152 * 32 if qk == 32 else 32 * qk)
    for K in Ks if N < 8192 else Ks[:2]:  # (R > 1 where K <= 3,072)
        t = tensor("w", fmt, (N, K), rng)
        w = dev.upload_weight("w", [t], fmt)
        res, bias = randn(rng, 1, N), randn(rng, N)
        if mode == "plain":
            x = randn(rng, 1, K) * 3
            xin = x.astype(np.float64)
            make = lambda: dev.to_device(x, "float32")  # noqa: E731
        elif mode == "rms":
            x, nw = randn(rng, 1, K) * 3, randn(rng, K)
            xin = ref.rms_norm(x, nw, 1e-6).astype(np.float64)
            X, NW = dev.to_device(x, "float32"), dev.to_device(nw, "float32")
            make = lambda: dev.rms_norm(X, NW, 1e-6)  # noqa: E731
        else:
            gu = randn(rng, 1, 2 * K) * 2
            xin = ref.silu_mul(gu[:, :K], gu[:, K:]).astype(np.float64)
            GU = dev.to_device(gu, "float32")
            make = lambda: dev.silu_mul(GU[:, :K], GU[:, K:])  # noqa: E731
        W = dequant(t)
        want, want_q = res + xin @ W.T + bias, res + _q8_rounded(xin) @ W.T + bias
        RES, B = dev.to_device(res, "float32"), dev.upload_array("b", bias)
        xd = make() if mode == "plain" else None
        poison(dev)
        n = _count_launches(monkeypatch)
        got = host(dev, dev.add(RES, dev.linear(xd if xd is not None else make(), w, B)))
        assert n[0] == 2, f"K {K}: quantize_q8 and the GEMV"
        assert rel_l2(got - res, want_q - res) <= 1e-3, f"K {K}"
        assert rel_l2(got - res, want - res) <= 2e-2, f"K {K}"
        monkeypatch.undo()


@pytest.mark.parametrize("mode", ["plain", "rms", "silu"])
@pytest.mark.parametrize("fmt", Q8_FORMATS, ids=lambda f: f.name)
def test_int8_gemv_rows_do_not_depend_on_the_batch(dev, ref, rng, fmt, mode, q8):
    """gemv_q8_t8_* over T = 2, 3, 5 and 8 rows (those under 8 skip the missing rows' dots): each row's
    output bitwise that of the row alone (gemv_q8_*), so a sequence decodes the same alone or batched on
    the int8 GEMVs; and within 1e-3 of float64 with x rounded as quantize_q8 rounds it."""
    qk = max(fmt.block_size, 32)
    N, K = 301, 12 * qk if qk > 32 else 28 * qk
    t = tensor("w", fmt, (N, K), rng)
    w = dev.upload_weight("w", [t], fmt)
    W = dequant(t)
    T = 8
    if mode == "silu":
        gu = randn(rng, T, 2 * K) * 2
        xin = ref.silu_mul(gu[:, :K], gu[:, K:]).astype(np.float64)
        GU = dev.to_device(gu, "float32")
        make = lambda r: dev.silu_mul(GU[r, :K], GU[r, K:])  # noqa: E731
    else:
        x, nw = randn(rng, T, K) * 3, randn(rng, K)
        X, NW = dev.to_device(x, "float32"), dev.to_device(nw, "float32")
        xin = (ref.rms_norm(x, nw, 1e-6) if mode == "rms" else x).astype(np.float64)
        make = (lambda r: dev.rms_norm(X[r], NW, 1e-6)) if mode == "rms" else (lambda r: X[r])  # noqa: E731
    alone = []
    for i in range(T):
        poison(dev)
        alone.append(host(dev, dev.linear(make(slice(i, i + 1)), w))[0])
    for n in (2, 3, 5, T):
        poison(dev)
        got = host(dev, dev.linear(make(slice(0, n)), w))
        for i in range(n):
            np.testing.assert_array_equal(got[i], alone[i], err_msg=f"row {i} of {n}")
    want_q = _q8_rounded(xin) @ W.T
    assert rel_l2(np.stack(alone), want_q) <= 1e-3


def test_int8_gemvs_of_one_norm_share_its_quantized_row(dev, ref, rng, monkeypatch, q8):
    """q, k and v of one deferred norm: one quantize_q8 and three GEMVs, each as its own launch alone."""
    fmt = next(f for f in Q8_FORMATS if f.name == "Q5_0")
    K = 896 if fmt.block_size == 32 else 1024
    x, nw = randn(rng, 1, K) * 3, randn(rng, K)
    X, NW = dev.to_device(x, "float32"), dev.to_device(nw, "float32")
    ws = [dev.upload_weight(f"w{i}", [tensor(f"w{i}", fmt, (n, K), rng)], fmt) for i, n in enumerate((K, 128, 128))]
    alone = []
    for w in ws:
        poison(dev)
        alone.append(host(dev, dev.linear(dev.rms_norm(X, NW, 1e-6), w)))
    poison(dev)
    n = _count_launches(monkeypatch)
    h = dev.rms_norm(X, NW, 1e-6)
    ys = [dev.linear(h, w) for w in ws]
    got = [host(dev, y) for y in reversed(ys)][::-1]  # (read in another order than made)
    assert n[0] == 4
    for g, a in zip(got, alone):
        np.testing.assert_array_equal(g, a)


def split_qkv(qkv, Hq: int, Hkv: int, hd: int):
    """One q|k|v output [T, (Hq + 2 Hkv) hd] as views: q [T, Hq, hd], k and v [T, Hkv, hd]."""
    return (qkv[:, :Hq * hd].reshape(-1, Hq, hd), qkv[:, Hq * hd:(Hq + Hkv) * hd].reshape(-1, Hkv, hd),
            qkv[:, (Hq + Hkv) * hd:].reshape(-1, Hkv, hd))


@pytest.mark.parametrize("hd, p0", [(64, 50), (96, 50), (64, 300)], ids=["hd64", "hd96", "hd64-two-splits"])
def test_the_attention_quantizes_the_o_projections_input(dev, ref, rng, hd, p0, monkeypatch, q8):
    """One token on the int8 GEMVs: the decode attention writes its output's int8 row too (q8_store_warp,
    by the head's only split or by the combine of several), so the o projection is one launch, and it
    gives the same bits as the o projection of a copy of the output (quantize_q8, then the GEMV)."""
    Hq, Hkv, n_ctx = 8, 2, 512
    fmt = next(f for f in Q8_FORMATS if f.name == "Q4_K")
    w = dev.upload_weight("wo", [tensor("wo", fmt, (256, Hq * hd), rng)], fmt)
    gc = dev.new_kv_cache(1, n_ctx, Hkv, hd)
    try:
        for lo, hi in ((0, p0), (p0, p0 + 1)):
            qkv = dev.to_device(randn(rng, hi - lo, (Hq + 2 * Hkv) * hd), "float32")
            Tn = hi - lo
            q, k, v = split_qkv(qkv, Hq, Hkv, hd)
            step = _step(dev, range(lo, hi), lo)
            poison(dev)
            n = _count_launches(monkeypatch)
            out = dev.attention(q, k, v, gc, 0, step, scale=0.125)
            if Tn > 1:
                host(dev, out)
                monkeypatch.undo()
                continue
            y = host(dev, dev.linear(out.reshape(1, Hq * hd), w))
            assert n[0] == 3  # kv_write, attention, the GEMV: no quantize_q8
            monkeypatch.undo()
            copy = dev.to_device(host(dev, out).reshape(1, Hq * hd), "float32")
            poison(dev)
            np.testing.assert_array_equal(host(dev, dev.linear(copy, w)), y)
    finally:
        dev.free_kv_cache(gc)


def test_a_deferred_op_read_by_anything_else_is_launched_first(dev, ref, rng):
    x, nw = randn(rng, 1, 256) * 3, randn(rng, 256)
    X, NW = dev.to_device(x, "float32"), dev.to_device(nw, "float32")
    poison(dev)
    h = dev.rms_norm(X, NW, 1e-5)
    g = host(dev, dev.gelu(h[:, 64:128]))  # a view of part of it, through another op
    np.testing.assert_allclose(g, ref.gelu(ref.rms_norm(x, nw, 1e-5)[:, 64:128]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["neox", "normal", "yarn", "phi3-96"])
@pytest.mark.parametrize("T", [1, 37])
@pytest.mark.parametrize("p0", [50, 300], ids=["one-split", "splits"])
def test_fused_rope_kv_write_attention(dev, ref, rng, kind, T, p0, monkeypatch):
    """One token: the decode attention ropes q and its own key and writes k and v to the cache itself (one
    launch); a prefill step (T > 1) ropes eagerly (3 + 1 launches). A decode step after it reads the key
    the step before wrote."""
    kw = dict(ROPES[kind])
    hd = 96 if kind == "phi3-96" else 64
    Hq, Hkv, n_ctx = 8, 2, 512
    spec = RopeSpec(**kw)
    gc, rc = dev.new_kv_cache(1, n_ctx, Hkv, hd), ref.new_kv_cache(1, n_ctx, Hkv, hd)
    try:
        # the cache's first p0 positions, unfused on both sides; then the fused step
        for lo, hi in ((0, p0), (p0, p0 + T), (p0 + T, p0 + T + 1)):
            qkv = randn(rng, hi - lo, (Hq + 2 * Hkv) * hd)  # one q|k|v output, split into views
            q, k, v = split_qkv(qkv, Hq, Hkv, hd)
            rs, pos = _step(ref, range(lo, hi), lo), np.arange(lo, hi, dtype=np.int32)
            want = ref.attention(ref.rope(q, pos, spec), ref.rope(k, pos, spec), v, rc, 0, rs, scale=0.125)
            QKV = dev.to_device(qkv, "float32")
            Tn = hi - lo
            qd, kd, vd = split_qkv(QKV, Hq, Hkv, hd)
            step = _step(dev, range(lo, hi), lo)
            poison(dev)
            n = _count_launches(monkeypatch)
            out = dev.attention(dev.rope(qd, step.positions, spec), dev.rope(kd, step.positions, spec), vd, gc, 0,
                                step, scale=0.125)
            assert n[0] == (1 if Tn == 1 else 4)  # attention | 2 ropes + kv_write + attention
            got = host(dev, out)
            assert rel_l2(got, want) <= 1e-3, (lo, hi)
            monkeypatch.undo()
    finally:
        dev.free_kv_cache(gc)

