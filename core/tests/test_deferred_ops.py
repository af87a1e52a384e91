"""backends/cuda/fusion.py's DeferredOps on the CPU (it needs no CuPy: it only reads an array's address,
size, shape and strides). Host arrays stand in for device ones; what is checked is which record a read
finds and launches, never the kernels (the GPU tests do that)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from orcd_core.backends.cuda.fusion import DeferredOps


class Arr:
    """A numpy array with CuPy's `.data.ptr` (what DeferredOps reads of a device array)."""

    def __init__(self, a: np.ndarray):
        self.a = a
        self.data = SimpleNamespace(ptr=a.__array_interface__["data"][0])
        self.shape, self.ndim, self.strides, self.size = a.shape, a.ndim, a.strides, a.size
        self.nbytes, self.itemsize = a.nbytes, a.itemsize

    def __getitem__(self, idx):
        return Arr(self.a[idx])

    def reshape(self, *shape):
        return Arr(self.a.reshape(*shape))


def record(ops, out, log, kind="gemv", **args):
    return ops.defer(kind, out, lambda o: log.append((kind, o.data.ptr)), **args)


def test_a_read_launches_the_producers_it_overlaps_once():
    ops, log = DeferredOps(), []
    mem = Arr(np.zeros((4, 64), np.float32))
    a, b = mem[:2], mem[2:]
    record(ops, a, log)
    record(ops, b, log, kind="rms_norm")
    ops.ready(Arr(np.zeros(3, np.float32)))  # other memory: nothing
    assert log == [] and len(ops) == 2
    ops.ready(mem[1:3])  # overlaps both
    assert sorted(k for k, _ in log) == ["gemv", "rms_norm"] and len(ops) == 0
    ops.ready(mem)  # launched already: not again
    assert len(log) == 2


def test_exact_needs_the_same_memory_and_shape_same_memory_any_shape():
    ops, log = DeferredOps(), []
    y = Arr(np.zeros((2, 32), np.float32))
    record(ops, y, log)
    d = ops.exact(y, "gemv")
    assert d is not None and d.out is y
    assert ops.exact(y[:, :16], "gemv") is None  # a view of part of it
    assert ops.exact(y, "rms_norm") is None  # another kind
    assert ops.exact(y.reshape(64), "gemv") is None and ops.same_memory(y.reshape(64), "gemv") is d
    ops.reset()
    assert len(ops) == 0 and ops.exact(y, "gemv") is None and log == []


def test_take_removes_a_record_without_launching_it():
    """An int8 GEMV takes its norm's producer (a GEMV + residual) to launch it with its epilogue; if a
    read launched it first, take says so and the consumer falls back to quantize_q8."""
    ops, log = DeferredOps(), []
    h = Arr(np.zeros((1, 64), np.float32))
    record(ops, h, log, kind="gemv_res")
    d = ops.exact(h, "gemv_res")
    assert ops.take(d) and len(ops) == 0 and log == []
    assert not ops.take(d)  # (taken already)
    record(ops, h, log, kind="gemv_res")
    d = ops.exact(h, "gemv_res")
    ops.ready(h)
    assert log == [("gemv_res", h.data.ptr)] and not ops.take(d)
