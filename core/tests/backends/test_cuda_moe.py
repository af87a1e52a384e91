"""CUDA mixture of experts (`CudaDevice.moe`, backends/cuda/moe.py) against the NumPy reference `moe`,
on random MXFP4 expert stacks, random routing and random biases (never zeros).

Thresholds: the decode path (expert-indexed GEMVs, fp32 accumulation over weights dequantized in
registers) relative L2 <= 1e-3; the prefill path (tokens grouped by expert, fp16 GEMM operands, fp32
accumulation) <= 1e-2; routing (ids, softmax weights) exact ids and weights within 1e-6.
The per-step workspace is filled with NaN bytes before each call, so an unwritten element fails.
"""

from __future__ import annotations

import numpy as np
import pytest

from orcd_core.backends.reference import ReferenceDevice
from orcd_core.gguf_file import TensorInfo
from orcd_core.plugins import default_registry
from orcd_core.testing.cuda import cuda_dev, require_cuda_gpu  # noqa: F401 (the `dev` fixture)

pytestmark = pytest.mark.gpu

cupy = require_cuda_gpu()

REG = default_registry()
MXFP4 = REG.quant_format_by_name("MXFP4")
F32 = REG.quant_format_by_name("F32")


def record_launches(monkeypatch, *modules) -> list:
    """The names of the kernels that `modules` launch from now on (each one's `launch` wrapped)."""
    names = []
    for mod in modules:
        orig = mod.launch
        monkeypatch.setattr(mod, "launch", lambda f, *a, _o=orig, **k: (names.append(f), _o(f, *a, **k))[1])
    return names


@pytest.fixture(scope="module")
def ref():
    return ReferenceDevice()


def tensor(name, fmt, np_shape, rng, scale=1.0):
    raw = fmt.quantize_random(rng, np_shape, scale).reshape(-1)
    return TensorInfo(name, fmt.ggml_type, fmt.name, tuple(reversed(np_shape)), 0, raw.nbytes, raw)


def poison(dev):
    dev.begin_step()
    a = dev.workspace.arena
    cupy.cuda.runtime.memsetAsync(a.ptr, 0xFF, a.size, dev.stream.ptr)


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


class Experts:
    """One MoE layer's weights on both devices: router F32 [E, D], gate|up MXFP4 [E, 2F, D], down MXFP4 [E, D, F]."""

    def __init__(self, dev, ref, rng, E, D, F, fmt=MXFP4, router_fmt=F32):
        self.E, self.D, self.F = E, D, F
        parts = {
            "router": tensor("router", router_fmt, (E, D), rng, 0.5),
            "gate_up": tensor("gate_up", fmt, (E, 2 * F, D), rng, 0.25),
            "down": tensor("down", fmt, (E, D, F), rng, 0.25),
        }
        fmts = {"router": router_fmt, "gate_up": fmt, "down": fmt}
        self.host = {
            "router_b": rng.standard_normal(E).astype(np.float32),
            "gate_up_b": rng.standard_normal((E, 2 * F)).astype(np.float32),
            "down_b": rng.standard_normal((E, D)).astype(np.float32),
        }
        self.g = {k: dev.upload_weight(k, [t], fmts[k]) for k, t in parts.items()}
        self.r = {k: ref.upload_weight(k, [t], fmts[k]) for k, t in parts.items()}
        self.g.update({k: dev.upload_array(k, v) for k, v in self.host.items()})
        self.r.update(self.host)

    def args(self, side):
        w = self.g if side == "gpu" else self.r
        return (w["router"], w["router_b"], w["gate_up"], w["gate_up_b"], w["down"], w["down_b"])


@pytest.fixture(scope="module")
def experts(dev, ref):
    # gpt-oss's layout (32 experts, top 4) at a narrow width: D not a multiple of 256, F != D
    return Experts(dev, ref, np.random.default_rng(7), E=32, D=320, F=256)


@pytest.mark.parametrize("act", ["swiglu_oai", "silu"])
@pytest.mark.parametrize("T", [1, 3, 4])
def test_moe_decode_path_matches_reference(dev, ref, experts, act, T):
    rng = np.random.default_rng(T)
    x = rng.standard_normal((T, experts.D)).astype(np.float32)
    want = ref.moe(x, *experts.args("ref"), top_k=4, act=act)
    poison(dev)
    got = dev.to_host(dev.moe(dev.to_device(x, "float32"), *experts.args("gpu"), top_k=4, act=act))
    assert got.shape == (T, experts.D) and np.isfinite(got).all()
    assert rel_l2(got, want) <= 1e-3


@pytest.mark.parametrize("T", [1, 3])
def test_moe_decode_on_the_int8_expert_gemvs(dev, ref, experts, T):
    """The decode on decode_gemv "q8" (the default): x and the GLU output quantized to int8 per 32
    (quantize_q8), moe_gemv_glu_q8 / moe_down_q8 by dp4a. Each rounding moves an element by up to 1/254
    of its group's largest |value| (~0.5-1% relative L2 each on random data, more on the GLU's heavy
    tails): within 3e-2 of the reference, per token too; a wrong sign, code or element order would be
    off by the whole. The routing (float32 router) is the exact path's."""
    rng = np.random.default_rng(50 + T)
    x = rng.standard_normal((T, experts.D)).astype(np.float32)
    want = ref.moe(x, *experts.args("ref"), top_k=4, act="swiglu_oai")
    before = dev.decode_gemv
    dev.decode_gemv = "q8"
    try:
        poison(dev)
        got = dev.to_host(dev.moe(dev.to_device(x, "float32"), *experts.args("gpu"), top_k=4, act="swiglu_oai"))
    finally:
        dev.decode_gemv = before
    assert got.shape == (T, experts.D) and np.isfinite(got).all()
    per_tok = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
    assert per_tok.max() <= 3e-2
    assert per_tok.max() > 1e-5  # (it did take the int8 kernels: the float path is within ~1e-6)


@pytest.mark.parametrize("gemv", ["q8", "ffma"])
@pytest.mark.parametrize("T", [1, 3])
def test_moe_decode_takes_the_residual_add_in_its_store(dev, experts, gemv, monkeypatch, T):
    """x + moe(h) in a decode step: the down projection's launch is deferred and takes the residual in
    its store (moe_down_store: res + value, add_f32's operands in add_f32's order), so no add_f32 launch;
    bitwise the sum of the two written separately, on the int8 and the float expert GEMVs."""
    import orcd_core.backends.cuda.device as D
    import orcd_core.backends.cuda.moe as M

    rng = np.random.default_rng(70 + T)
    h, x = (dev.to_device(rng.standard_normal((T, experts.D)).astype(np.float32), "float32") for _ in range(2))
    before = dev.decode_gemv
    dev.decode_gemv = gemv
    try:
        out, n = {}, {}
        for fused in (True, False):
            poison(dev)
            names = record_launches(monkeypatch, D, M)
            y = dev.moe(h, *experts.args("gpu"), top_k=4, act="swiglu_oai")
            if not fused:
                y = dev.contiguous(y)  # (written now: the add launches add_f32)
            out[fused] = dev.to_host(dev.add(x, y))
            n[fused] = len(names)
            monkeypatch.undo()
    finally:
        dev.decode_gemv = before
    assert n[False] == n[True] + 1
    np.testing.assert_array_equal(out[True], out[False])
    assert np.isfinite(out[True]).all()


@pytest.mark.parametrize("T", [1, 3, 8])
def test_int8_glu_writes_its_output_quantized(dev, experts, T):
    """moe_gemv_glu_q8 writes a [P, F] and, group by group as its warps complete them, a's rows quantized
    (aq): bitwise what quantize_q8 makes of a (q8_store_warp), so no quantize launch stands between the
    GLU and the down projection; twice in a row, with a bad expert id among the pairs (a NaN row); every
    counter is zero after."""
    from orcd_core.backends.cuda import moe as M
    from orcd_core.backends.cuda.kernels import f32, i32, i64, launch, q8_row_bytes
    from orcd_core.kernels.constants import MOE_ACT_SWIGLU_OAI, Q8_WARPS

    rng = np.random.default_rng(90 + T)
    k, D, F, E = 4, experts.D, experts.F, experts.E
    P = T * k
    gu = experts.g["gate_up"]
    ids_h = rng.integers(0, E, (T, k)).astype(np.int32)
    ids_h[0, 0] = E  # a bad expert id: its pair's a is NaN, and its groups still complete
    ids = dev.to_device(ids_h, "int32")
    poison(dev)
    xq = dev.quantize_rows(dev.to_device(rng.standard_normal((T, D)).astype(np.float32), "float32"), T, D)
    fn = M._fmt_fn(dev, gu, "moe_gemv_glu_q8", q8_row_bytes(D))
    for _ in range(2):
        a, aq = dev.step_array((P, F)), dev.step_array((P, q8_row_bytes(F)), np.uint8)
        launch(fn, ((F + Q8_WARPS - 1) // Q8_WARPS, P), (32 * Q8_WARPS,),
               (gu.data.data, i64(gu.data.row_bytes), ids, xq, i32(k), experts.g["gate_up_b"], a, i32(F), i32(D),
                i32(E), i32(MOE_ACT_SWIGLU_OAI), f32(1.702), f32(7.0), aq, M._glu_counters(dev, P * (F // 32))),
               shared_mem=q8_row_bytes(D))
        want = dev.quantize_rows(a, P, F)
        np.testing.assert_array_equal(dev.to_host(aq), dev.to_host(want))
    a_h = dev.to_host(a)
    assert np.isnan(a_h[0]).all() and np.isfinite(a_h[1:]).all()
    assert not dev.to_host(M._glu_counters(dev, P * (F // 32))).any()  # every group's counter reset


@pytest.mark.parametrize("T", [1, 3, 8])
def test_moe_of_a_deferred_norm_quantizes_it_once(dev, experts, monkeypatch, T):
    """moe(rms_norm(h)) on the int8 expert GEMVs (gpt-oss's FFN): one quantize_q8_xf launch (RMS mode) writes
    the norm's floats (the router's input) and its int8 rows (the experts'), instead of rms_norm_rows and
    a quantize_q8 of its output: one launch fewer. Within 1e-3 of the unfused path (the norm's sum is added
    at quantize_q8's block size, not rms_norm_rows': its last bit may differ); the norm's floats themselves
    within 1e-6 of rms_norm_rows'; finite."""
    import orcd_core.backends.cuda.device as Dm
    import orcd_core.backends.cuda.moe as M

    rng = np.random.default_rng(80 + T)
    h = dev.to_device(rng.standard_normal((T, experts.D)).astype(np.float32) * 3, "float32")
    w = dev.to_device(rng.standard_normal(experts.D).astype(np.float32), "float32")
    before = dev.decode_gemv
    dev.decode_gemv = "q8"
    try:
        out, n, normed = {}, {}, {}
        for fused in (True, False):
            poison(dev)
            names = record_launches(monkeypatch, Dm, M)
            x = dev.rms_norm(h, w, 1e-5)
            if not fused:
                x = dev.contiguous(x)  # (rms_norm_rows now: moe quantizes its output)
            out[fused] = dev.to_host(dev.moe(x, *experts.args("gpu"), top_k=4, act="swiglu_oai"))
            normed[fused] = dev.to_host(x)
            n[fused] = len(names)
            monkeypatch.undo()
    finally:
        dev.decode_gemv = before
    assert n[False] == n[True] + 1
    assert rel_l2(normed[True], normed[False]) <= 1e-6
    assert np.isfinite(out[True]).all() and rel_l2(out[True], out[False]) <= 1e-3


@pytest.mark.parametrize("T", [5, 37, 300])
def test_moe_prefill_groups_tokens_by_expert(dev, ref, experts, T):
    rng = np.random.default_rng(100 + T)
    x = rng.standard_normal((T, experts.D)).astype(np.float32)
    want = ref.moe(x, *experts.args("ref"), top_k=4, act="swiglu_oai")
    poison(dev)
    got = dev.to_host(dev.moe(dev.to_device(x, "float32"), *experts.args("gpu"), top_k=4, act="swiglu_oai"))
    assert got.shape == (T, experts.D) and np.isfinite(got).all()
    assert rel_l2(got, want) <= 1e-2  # fp16 GEMM operands
    # per token too: a token whose experts were mixed up would stand out
    per_tok = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
    assert per_tok.max() <= 3e-2


def test_moe_prefill_skewed_routing_many_tiles_of_one_expert(dev, ref):
    """A routing where one expert takes every token (its router bias dominates): 600 pairs of one expert
    are 10 tiles of moe_gemm's 64 (the last one partial) beside experts of a few pairs and experts of none;
    D = 352 and F = 224 leave partial tiles of rows (moe_gemm's 128) and odd item counts (11 and 7: the
    last 64-wide k-step half zeros). Against the reference (<= 1e-2, fp16 operands) and per token
    (<= 3e-2)."""
    e = Experts(dev, ref, np.random.default_rng(13), E=32, D=352, F=224)
    e.host["router_b"][5] += 1e3
    e.g["router_b"] = dev.upload_array("router_b", e.host["router_b"])
    T = 600
    x = np.random.default_rng(14).standard_normal((T, 352)).astype(np.float32)
    want = ref.moe(x, *e.args("ref"), top_k=4, act="swiglu_oai")
    poison(dev)
    got = dev.to_host(dev.moe(dev.to_device(x, "float32"), *e.args("gpu"), top_k=4, act="swiglu_oai"))
    assert got.shape == (T, 352) and np.isfinite(got).all()
    assert rel_l2(got, want) <= 1e-2
    per_tok = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
    assert per_tok.max() <= 3e-2


def test_moe_clamps_large_activations(dev, ref):
    """Inputs large enough that gate/up exceed swiglu_oai's limit of 7 (the clamp branch)."""
    e = Experts(dev, ref, np.random.default_rng(3), E=8, D=256, F=128)
    x = (np.random.default_rng(4).standard_normal((2, 256)) * 8).astype(np.float32)
    want = ref.moe(x, *e.args("ref"), top_k=2, act="swiglu_oai")
    poison(dev)
    got = dev.to_host(dev.moe(dev.to_device(x, "float32"), *e.args("gpu"), top_k=2, act="swiglu_oai"))
    assert rel_l2(got, want) <= 1e-3


def test_topk_softmax_routing_is_exact_with_lowest_id_on_ties(dev):
    from orcd_core.backends.cuda.kernels import i32, launch

    rng = np.random.default_rng(11)
    T, E, k = 64, 200, 6
    logits = rng.standard_normal((T, E)).astype(np.float32)
    logits[::3, 150] = logits[::3, 40] = logits[::3].max(axis=1) + 1.0  # ties: id 40 before 150
    logits[1::7, 5] = np.nan  # NaN is never chosen
    order = np.argsort(-np.nan_to_num(logits, nan=-np.inf), axis=1, kind="stable")[:, :k]
    sel = np.take_along_axis(logits, order, axis=1).astype(np.float64)
    w = np.exp(sel - sel[:, :1])
    w /= w.sum(axis=1, keepdims=True)
    ids = cupy.full((T, k), -7, np.int32)
    wts = cupy.full((T, k), np.nan, np.float32)
    topk = dev.core_kernels("moe.cu").fn("moe_topk_softmax")
    launch(topk, (T,), (32,), (dev.to_device(logits, "float32"), i32(E), i32(k), ids, wts))
    np.testing.assert_array_equal(dev.to_host(ids), order)
    np.testing.assert_allclose(dev.to_host(wts), w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("T, tol", [(1, 1e-3), (200, 1e-2)])
def test_moe_is_graph_capturable_and_replays_follow_new_routing(dev, ref, experts, T, tol):
    """Both paths captured once into a CUDA graph and replayed on new inputs: routing is read on the
    device (the decode GEMVs' expert ids; the grouped prefill's tiles, from the sort's offsets: nothing
    goes back to the host), so each replay follows the new tokens' experts."""
    rng = np.random.default_rng(21 + T)
    xbuf = dev.to_device(np.zeros((T, experts.D), np.float32), "float32")
    dev.begin_step()
    dev.moe(xbuf, *experts.args("gpu"), top_k=4, act="swiglu_oai")  # eager first: compiles, sizes
    dev.stream.synchronize()
    dev.begin_step()
    dev.stream.begin_capture()
    try:
        out = dev.moe(xbuf, *experts.args("gpu"), top_k=4, act="swiglu_oai")
        dev.deferred.ready(out)  # (decode: the down launch is deferred for a residual add; as a step's
        #                          logits, what is read after the replays is launched inside the capture)
    finally:
        graph = dev.stream.end_capture()
    for _ in range(3):
        x = rng.standard_normal((T, experts.D)).astype(np.float32)
        xbuf.set(x, stream=dev.stream)
        graph.launch(dev.stream)
        got = dev.to_host(out)
        assert rel_l2(got, ref.moe(x, *experts.args("ref"), top_k=4, act="swiglu_oai")) <= tol


@pytest.mark.parametrize("router", ["F32", "Q8_0"])
def test_moe_without_biases(dev, ref, router):
    """No biases; a quantized router goes through the device's linear (decode only here: the prefill
    GEMM's fp16 rounding could flip a near-tie of the routing against the float32 reference)."""
    rng = np.random.default_rng(5)
    e = Experts(dev, ref, rng, E=4, D=128, F=64, router_fmt=REG.quant_format_by_name(router))
    x = rng.standard_normal((6, 128)).astype(np.float32)
    for T in ((1, 6) if router == "F32" else (1,)):
        want = ref.moe(x[:T], e.r["router"], None, e.r["gate_up"], None, e.r["down"], None, top_k=2, act="silu")
        poison(dev)
        got = dev.to_host(dev.moe(dev.to_device(x[:T], "float32"), e.g["router"], None, e.g["gate_up"], None,
                                  e.g["down"], None, top_k=2, act="silu"))
        assert rel_l2(got, want) <= (1e-3 if T == 1 else 1e-2)


def test_expert_type_without_moe_kernels_is_named(dev, ref):
    q80 = REG.quant_format_by_name("Q8_0")
    e = Experts(dev, ref, np.random.default_rng(1), E=4, D=64, F=64, fmt=q80)
    dev.begin_step()
    with pytest.raises(NotImplementedError, match="Q8_0"):
        dev.moe(dev.to_device(np.ones((1, 64), np.float32), "float32"), *e.args("gpu"), top_k=2, act="silu")
