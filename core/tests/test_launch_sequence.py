"""The CUDA backend's launch sequence of a decode layer, on the CPU: CudaDevice's host code (device.py,
fusion.py's deferred ops, moe.py) driven with CuPy stubbed out, each launch logged by name instead of
run. It checks which kernels a llama-family layer and a gpt-oss FFN issue, in order, with the int8
GEMVs: what the fusions remove (norms taken into quantize launches, residual adds into GEMV and MoE
stores) and that every producer launches before its consumers. A host-side slip in those fusions
(a record launched plain, a missing method) shows here without a GPU; the GPU tests check the kernels.
Runs in a subprocess: the stub replaces `cupy` in sys.modules."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

SIM = textwrap.dedent(r'''
    import json, sys, types
    import numpy as np

    class _Data:
        def __init__(self, a): self.ptr = a.__array_interface__["data"][0]

    class Arr(np.ndarray):  # a host array with CuPy's .data.ptr
        @property
        def data(self): return _Data(self)

    cupy = types.ModuleType("cupy")
    cupy.ndarray = Arr
    cupy.cuda = types.SimpleNamespace(MemoryPointer=object, Memory=object, runtime=types.SimpleNamespace(),
                                      compiler=types.SimpleNamespace(CompileException=Exception))
    sys.modules["cupy"] = cupy
    libs = types.ModuleType("cupy_backends.cuda.libs")
    libs.cublas = types.SimpleNamespace()
    for name in ("cupy_backends", "cupy_backends.cuda"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules["cupy_backends.cuda.libs"] = libs
    sys.modules["cupy_backends.cuda.libs.cublas"] = libs.cublas

    import orcd_core.backends.cuda.device as D
    import orcd_core.backends.cuda.moe as M
    from orcd_core.backends.cuda.fusion import DeferredOps

    LOG = []

    def launch(fn, grid, block, args, shared_mem=0, pdl=False):
        tag = fn
        if fn.startswith("quantize_q8"):
            tag += ":" + ("plain", "rms", "silu")[int(args[5])]
        LOG.append(tag)

    D.launch = M.launch = launch
    D._check_linear = lambda w, K, b: None
    buf = np.zeros(1 << 24, np.uint8)
    top = [0]

    def alloc(shape, dtype=np.float32):
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        o = (top[0] + 255) & ~255
        top[0] = o + n
        return buf[o:o + n].view(dtype).reshape(shape).view(Arr)

    class Kernels:
        def fn(self, name, max_dynamic_smem=0):  # (a format's kernel named without its format)
            for fmt in ("_Q4_K", "_MXFP4", "_F32"):
                if name.endswith(fmt):
                    return name[: -len(fmt)]
            return name

    dev = object.__new__(D.CudaDevice)
    dev.deferred = DeferredOps()
    dev._ws_alloc = alloc
    dev.decode_gemv = "q8"
    dev._optional_kernels = {}
    dev.format_kernels = lambda fmt: Kernels()
    dev.core = Kernels()
    dev.core_kernels = lambda name: Kernels()
    dev.counters = lambda key, n: np.uint64(1)

    class Fmt:
        def __init__(self, name): self.name = name

    class W:
        def __init__(self, shape, fmt="Q4_K"):
            self.shape, self.fmt, self.name = shape, Fmt(fmt), "w"
            n = int(np.prod(shape[:-1]))
            self.data = types.SimpleNamespace(rows=n, cols=shape[-1], row_bytes=shape[-1], data=0)

    T, Dm, F = int(sys.argv[1]), 256, 512
    nw = alloc((Dm,))
    x = alloc((T, Dm))
    o = alloc((T, Dm))  # the attention's output (written)
    out = {}
    wo, wgu, wd, wqkv = W((Dm, Dm)), W((2 * F, Dm)), W((Dm, F)), W((3 * Dm, Dm))
    for layer in range(2):  # llama family: x + o(attention(norm(x))), then x + down(silu(gate | up(norm(x))))
        LOG.append("layer")
        dev.deferred.ready(dev.linear(dev.rms_norm(x, nw, 1e-5), wqkv))  # (the attention reads q|k|v)
        x = dev.add(x, dev.linear(o, wo))
        gu = dev.linear(dev.rms_norm(x, nw, 1e-5), wgu)
        x = dev.add(x, dev.linear(dev.silu_mul(gu[:, :F], gu[:, F:]), wd))
    LOG.append("head")
    dev.deferred.ready(dev.linear(dev.rms_norm(x, nw, 1e-5), W((1000, Dm))))
    out["llama"], LOG[:] = list(LOG), []

    E, k = 8, 2
    args = (W((E, Dm), "F32"), None, W((E, 2 * F, Dm), "MXFP4"), None, W((E, Dm, F), "MXFP4"), None)
    x = alloc((T, Dm))
    for layer in range(2):  # gpt-oss's FFN: x + moe(norm(x)), after the attention's x + o(...)
        LOG.append("layer")
        x = dev.add(x, dev.linear(o, wo))
        x = dev.add(x, dev.moe(dev.rms_norm(x, nw, 1e-5), *args, top_k=k, act="swiglu_oai"))
    dev.deferred.ready(x)
    out["moe"] = list(LOG)
    print(json.dumps(out))
''')


def sequences(T: int) -> dict:
    src = Path(__file__).resolve().parents[1] / "src"
    r = subprocess.run([sys.executable, "-c", SIM, str(T)], capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_llama_layer_is_one_quantize_and_one_gemv_per_projection():
    """Two llama-family layers and the head, one row and eight. Each launch comes when its consumer needs
    it (deferred ops), so a layer's launches appear in this order: each norm is taken by a quantize_q8 in
    RMS mode (no rms_norm launch: the norm's floats are never needed), the silu_mul by one in silu mode,
    the residual adds by the GEMVs' stores (no add_f32), and the o projection's input here "plain" (the
    real attention writes it as floats). Taking the norms into the GEMV epilogues removes the rms
    quantizes but was slower on the GPU (next/q8-norm-epilogue, docs/perf-notes.md)."""
    for T in (1, 8):
        K = "gemv_q8" if T == 1 else "gemv_q8_t8"
        layer = ["layer", "quantize_q8:rms", K,   # q|k|v
                 "quantize_q8:plain", K,          # o (+ the residual)
                 "quantize_q8:rms", K,            # gate|up
                 "quantize_q8:silu", K]           # down (+ the residual)
        assert sequences(T)["llama"] == 2 * layer + ["head", "quantize_q8:rms", K], T


def test_a_gpt_oss_ffn_is_five_launches():
    """gpt-oss's FFN on the int8 expert GEMVs: one quantize_q8_xf (RMS) writes the norm's floats and int8 rows,
    then the router, top-k, the GLU (which writes its output quantized) and the down projection, which
    takes the residual add in its store: no rms_norm_rows, no quantize of the GLU's output, no add_f32."""
    for T in (1, 8):
        K = "gemv_q8" if T == 1 else "gemv_q8_t8"
        layer = ["layer", "quantize_q8:plain", K,  # the o projection (its input plain here) + residual
                 "quantize_q8_xf:rms", "moe_router_f32", "moe_topk_softmax", "moe_gemv_glu_q8", "moe_down_q8"]
        assert sequences(T)["moe"] == 2 * layer, T
