"""Prefill chunks on the GPU as CUDA graphs: one per chunk-length bucket, kept across requests.

A prefill chunk run op by op costs the host ~20 us of Python per kernel or cuBLAS call (a qwen2 chunk
of 512 tokens: ~600 of them, ~15 ms of host time over ~5.5 ms of GPU time; a 32-token prompt the same
launches for a fraction of the GPU time). So a chunk of R tokens is run as the graph of its bucket: the
smallest length of `planner.PREFILL_BUCKETS` that holds it. The graph reads everything that changes from device
buffers written by one host->device copy per call:

- ids and positions of Tb = bucket(R) tokens. The real tokens come first, except the last one, which
  takes the final index (the forward's logits are of its last index). The Tb - R pad tokens between
  them are at the positions after the last real token: attention is causal by position (a query sees
  the keys at positions <= its own), so no real token sees a pad; the pads' keys land in cache rows
  that the sequence's next tokens overwrite before anything reads them (a sliding-window ring holds
  the window plus the step's Tb tokens, as for any step of Tb tokens);
- the cache's per-layer K and V addresses (a one-column table: `KVBatch([cache], ...)`, which the
  attention reads through `kv_of`), so one graph serves every sequence of the engine's cache layout;
- n_past, the chunk's first position.

The first chunk of each (bucket, cache layout) runs the graph's ops one by one (kernels compile, cuBLAS
picks its algorithms; the same kernels with the same arguments, cuBLAS through the capture's bindings,
so the same logits as the replays); the second is captured (relaxed mode) and every later one replays.
`warm_up` does this for every bucket at load (`Device.warm_up`), for caches of the engine's layout, so
a request's result never depends on which requests came before it. Captured activations
come from a memory pool of the graphs' own, used only while capturing, so no array of anything else
ever lies where a replay writes; its free blocks are shared by the graphs (they replay one at a time
on the device's stream). Each replay's logits are copied out of the graph's buffer (the next replay
overwrites it). A chunk that needs every token's logits, would write past the cache's context, or
whose forward cannot be captured runs op by op, as the base `Device.prefill_chunk`. `ORCD_PREFILL_GRAPHS=0` turns the graphs off (A/B runs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import cupy
import numpy as np

from ...device import MAX_STEP_TOKENS, KVBatch, KVCache, Step
from ...generation import CudaError
from .memory import StepPool, raw_alloc, view
from .planner import PREFILL_BUCKETS, bucket, graph_key, layout


def _where(exc: BaseException) -> str:
    """file:line of the innermost frame of the exception's traceback (the op that could not be captured)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}" if tb is not None else "?"


@dataclass
class _Graph:
    graph: object
    io: cupy.ndarray  # int32 [2 Tb + 1]: ids | positions | n_past
    table: cupy.ndarray  # uint64 [L, 2, 1]: the cache's K and V addresses per layer
    logits: cupy.ndarray  # [1, V], in the graphs' pool
    table_mem: object  # (the table's allocation)


class PrefillGraphs:
    def __init__(self, dev, reserve_bytes: int = 0):
        self.dev = dev
        self.pool = StepPool()  # the captured steps' activations (never handed out outside a capture)
        self.reserve_bytes = int(reserve_bytes)
        self.graphs: dict[tuple, _Graph] = {}
        self.seen: set[tuple] = set()  # keys whose first chunk ran op by op
        self.failed: dict[int, str] = {}  # buckets whose forward could not be captured (any layout), and why
        self.off = os.environ.get("ORCD_PREFILL_GRAPHS", "1") == "0"
        self._epoch = dev.prefill_epoch
        self.replays = 0

    @property
    def nbytes(self) -> int:
        return self.pool.nbytes

    def run(self, eager, forward, ids, start: int, cache: KVCache, all_logits: bool):
        R = len(ids)
        Tb = bucket(R) if 0 < R <= MAX_STEP_TOKENS else 0
        key = self._key(Tb, start, cache) if Tb and not (self.off or all_logits) else None
        if key is None or Tb in self.failed:
            return eager(forward, ids, start, cache, all_logits=all_logits)
        dev = self.dev
        if dev.prefill_epoch != self._epoch:  # a buffer the graphs point into was replaced
            self.graphs.clear()
            self.seen.clear()
            self._epoch = dev.prefill_epoch
        tok, pos = layout(ids, start, Tb)
        io_host = np.concatenate([tok, pos, np.array([start], np.int32)])
        table_host = np.empty((cache.n_layers, 2, 1), np.uint64)
        for layer in range(cache.n_layers):
            table_host[layer, 0, 0] = cache.k[layer].data.ptr
            table_host[layer, 1, 0] = cache.v[layer].data.ptr
        g = self.graphs.get(key)
        if g is None:
            if key not in self.seen:  # the graph's own ops, op by op: kernels load, cuBLAS picks its algorithms
                self.seen.add(key)
                return self._padded(forward, Tb, cache, io_host, table_host)
            g = self._capture(forward, key, cache, io_host, table_host)
            if g is None:
                return eager(forward, ids, start, cache, all_logits=False)
        else:
            g.io.set(io_host, stream=dev.stream)  # (pageable: staged before return, safe to reuse)
            g.table.set(table_host, stream=dev.stream)
        try:
            g.graph.launch(dev.stream)
        except cupy.cuda.runtime.CUDARuntimeError as exc:
            raise CudaError(f"prefill step failed on GPU {dev.gpu}: {exc}") from exc
        self.replays += 1
        dev.begin_step(prefill=True)
        out = dev.step_array(tuple(g.logits.shape))  # the caller's copy (the next replay rewrites g.logits)
        cupy.cuda.runtime.memcpyAsync(out.data.ptr, g.logits.data.ptr, g.logits.nbytes,
                                      cupy.cuda.runtime.memcpyDeviceToDevice, dev.stream.ptr)
        return out

    def warm_up(self, forward, cache: KVCache) -> None:
        """Capture every bucket for caches of `cache`'s layout (the engine's, at load), so that every
        request's chunks replay a graph (or, for a bucket whose forward cannot be captured, run op by
        op) from the first request on. Writes garbage into `cache`."""
        def nothing(*_args, **_kw):
            return None

        for Tb in PREFILL_BUCKETS:
            if self._key(Tb, 0, cache) is None:
                continue
            for _ in range(3):  # op by op, captured, replayed (a replay checks the graph launches)
                self.run(nothing, forward, [0] * Tb, 0, cache, False)
                if Tb in self.failed:
                    break

    def _key(self, Tb: int, start: int, cache) -> tuple | None:
        if not isinstance(cache, KVCache):
            return None
        return graph_key(Tb, start, cache.n_ctx, [int(k.shape[0]) for k in cache.k], list(cache.window))

    def _inputs(self, Tb: int, cache: KVCache, io_host, table_host):
        """(step, kv, io, table, table memory) of a Tb-token chunk through the table, its buffers written."""
        dev = self.dev
        io = cupy.empty(io_host.shape, np.int32)  # (CuPy's pool)
        io.set(io_host, stream=dev.stream)
        table_mem = raw_alloc(table_host.nbytes)
        table = view(table_mem, 0, table_host.shape, np.uint64)
        table.set(table_host, stream=dev.stream)
        step = Step(Tb, io[:Tb], io[Tb : 2 * Tb], io[2 * Tb :])
        return step, KVBatch([cache], cache.n_ctx, list(cache.window), table), io, table, table_mem

    def _padded(self, forward, Tb: int, cache: KVCache, io_host, table_host):
        """The chunk as its graph runs it (the padded layout, the cache through the table, cuBLAS with the
        capture's bindings and workspace), op by op: the same kernels with the same arguments, so the
        same logits as every later replay of the graph."""
        dev = self.dev
        step, kv, *_ = self._inputs(Tb, cache, io_host, table_host)
        dev.prepare_capture()
        dev.begin_step(prefill=True)
        with dev.graph_gemms():
            return dev.contiguous(forward(step, kv, all_logits=False))

    def _capture(self, forward, key, cache: KVCache, io_host, table_host) -> _Graph | None:
        """Capture the chunk of `key`'s bucket; None (and the reason kept in `failed`: chunks of that
        bucket run op by op from then on, in every cache layout) when its forward cannot be captured."""
        dev = self.dev
        Tb = key[0]
        step, kv, io, table, table_mem = self._inputs(Tb, cache, io_host, table_host)
        if self.reserve_bytes and not self.pool.nbytes:
            self.pool.reserve(self.reserve_bytes)
        dev.prepare_capture()
        dev.begin_step(prefill=True)
        dev.use_allocator(self.pool.alloc)
        mode = getattr(cupy.cuda.runtime, "streamCaptureModeRelaxed", None)
        dev.stream.begin_capture(mode) if mode is not None else dev.stream.begin_capture()
        graph, failure = None, None
        try:
            with dev.graph_gemms():
                logits = dev.contiguous(forward(step, kv, all_logits=False))
        except (CudaError, NotImplementedError, RuntimeError, cupy.cuda.runtime.CUDARuntimeError) as exc:
            failure = f"{type(exc).__name__}: {exc} (at {_where(exc)})"
        finally:
            try:
                graph = dev.stream.end_capture()
            except cupy.cuda.runtime.CUDARuntimeError as exc:
                failure = failure or f"capture failed: {exc}"
            dev.begin_step(prefill=True)  # (back to the step pool)
        if failure is not None:
            self.failed[Tb] = failure
            return None
        graph.upload(dev.stream) if hasattr(graph, "upload") else None
        g = _Graph(graph=graph, io=io, table=table, logits=logits, table_mem=table_mem)
        self.graphs[key] = g
        return g

    def close(self) -> None:
        self.graphs.clear()
        self.seen.clear()
        self.failed.clear()
        self.pool.release()
