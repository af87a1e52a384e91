"""The batched decode loop on the GPU: one CUDA graph per row count, kept across requests, replayed one
step ahead of the host.

A step of B rows (B sequences, one token each) reads everything it needs from persistent device
buffers: the rows' input ids, positions, step indices, sampling parameters and repetition windows
(`RowState`) and, per layer, the rows' KV-cache addresses (`table`, through the `KVBatch`). So the
graph of B rows serves any B sequences: when the rows change (a request joins or leaves) the host
rewrites those buffers from its own copy of each row (`DecodeRow`) with two copies, and the same graph
replays. The first step of each B runs op by op (kernels load, the workspace finds its size); the next
two are captured (relaxed mode), one graph per parity of the step count, and every later step of B
rows replays the graph of its parity. A step whose rows are all greedy without penalties
(`sampling.plain_greedy`, as the host's rows say) takes graphs of its own, whose sampler is the argmax
of the logits (two launches; Sampler.sample_rows): a graph's key is (rows, bound, parity, greedy). A
graph also holds a bound of its rows' positions (`span`, a power of two from planner.SPAN_MIN up to
the context): its attention launches only the splits that a position under the bound can need (a
served row's cache spans the whole context: 128 splits a head at 32,768 positions, where a row at
position 300 needs 3); a step whose rows reach the bound takes the next bound's graphs. `warm_up` runs
every row count's first steps at load. The captured `advance_rows` kernel moves each sampled token into
its row's next input, advances its position and step index and writes the token into its window.
Each graph ends with a copy of the B tokens into its own slot of pinned host memory and an event: no
host->device copy per step, one small device->host copy.

Pipelining: while the rows stay the same, `step()` launches step k + 1 before it waits for step k's
tokens, so the GPU runs k + 1 while the host detokenizes, matches stops and streams step k's tokens
(the two parities keep step k's tokens from being overwritten by k + 1's). A row is never launched
past its budget. When the rows change, the step in flight finishes first (its tokens for rows that
left are dropped), then the buffers are rewritten. A graph holds the workspace's and the attention
scratch's addresses: when either is replaced (it grew), every graph is dropped and recaptured.
"""

from __future__ import annotations

import collections
import time

import cupy
import numpy as np

from ...device import BatchDecoder, DecodeRow, KVBatch, Step
from ...generation import CudaError
from ...sampling import plain_greedy, token_logprobs
from .kernels import i32, launch
from .memory import raw_alloc, view
from .planner import decode_span_bound
from .sampler import RowState


class GraphBatchDecoder(BatchDecoder):
    def __init__(self, dev, forward, *, max_rows: int):
        super().__init__(dev, forward, max_rows=max_rows)
        dev.make_current()
        self.dev = dev
        self.st = RowState(self.max_rows)
        self.kv: KVBatch | None = None  # created with the table at the first rows (it needs their layout)
        self._table_mem = None
        self._pinned = cupy.cuda.alloc_pinned_memory(8 * self.max_rows)
        self._tok = np.frombuffer(self._pinned, np.int32, 2 * self.max_rows).reshape(2, self.max_rows)
        # per parity: the step's start and end on the stream (timed: gpu_s, the device's time for the step)
        self._start = [cupy.cuda.Event(block=False) for _ in range(2)]
        self._done = [cupy.cuda.Event(block=False) for _ in range(2)]
        self.graphs: dict[tuple[int, int, int, bool], object] = {}  # (rows, span, parity, greedy) -> graph
        self._eager_done: set[tuple[int, bool]] = set()  # (rows, greedy) whose first (eager) step ran
        self._logits: dict[tuple[int, int, int, bool], cupy.ndarray] = {}  # graph key -> the step's logits [B, V]
        self._epoch = dev.graph_epoch
        self._flight: collections.deque = collections.deque()  # (rows of the step, parity, graph key)
        self._n_launched = 0

    # -- the rows' device state ---------------------------------------------------------------------
    def _upload(self) -> None:
        """Rewrite the state and the KV table from the host's rows (no step in flight)."""
        rows = self.rows
        proto = rows[0].cache
        if self.kv is None:
            L, n = proto.n_layers, self.max_rows
            self._table_mem = raw_alloc(L * 2 * n * 8)
            table = view(self._table_mem, 0, (L, 2, n), np.uint64)
            self.kv = KVBatch([], proto.n_ctx, list(proto.window), table)
            self._table_host = np.zeros((L, 2, n), np.uint64)
        for r in rows:
            c = r.cache
            if c.n_ctx != self.kv.n_ctx or list(c.window) != self.kv.window or c.n_layers != proto.n_layers:
                raise ValueError("batch decoder: every row's KV cache must have the engine's layout "
                                 f"(n_ctx {self.kv.n_ctx}, windows {self.kv.window})")
        host = self._table_host
        host[:] = 0
        for b, r in enumerate(rows):
            for layer in range(proto.n_layers):
                host[layer, 0, b] = r.cache.k[layer].data.ptr
                host[layer, 1, b] = r.cache.v[layer].data.ptr
        self.kv.table.set(host, stream=self.dev.stream)
        self.kv.caches = [r.cache for r in rows]
        self.st.fill([(r.id, r.position, r.step_index, r.params, r.recent) for r in rows], self.dev.stream)
        self.changed = False

    def warm_up(self, cache) -> None:
        """Every row count's eager step and two graphs (the smallest bound of positions), for greedy rows
        and for sampled ones, before the first request, as vLLM captures its decode graphs at start-up:
        max_rows .. 1 rows of `cache` (the rows share it; what they write there is never read) take three
        steps each. Otherwise the first batch to reach a row count pays them under load (an eager step and
        two captures, ~tens of ms)."""
        from ...generation import SamplingParams

        if self.rows:
            raise RuntimeError("batch decoder: warm_up with rows joined")
        kinds = (SamplingParams(temperature=0.0, repetition_window=0),  # the argmax sampler's graphs
                 SamplingParams(temperature=1.0, repetition_window=0))  # the full sampler's
        # (the most rows first: the workspace takes its size once)
        for B, params in ((B, p) for B in range(self.max_rows, 0, -1) for p in kinds):
            rows = [DecodeRow(cache=cache, id=0, position=0, step_index=0, params=params, recent=[], budget=3)
                    for _ in range(B)]
            for r in rows:
                self.join(r)
            try:
                for _ in range(3):  # the eager step, then one capture of each parity
                    self.step()
            finally:  # (a failure, such as running out of VRAM, leaves no scratch row behind)
                for r in rows:
                    if r in self.rows:
                        self.leave(r)
                try:
                    self.dev.stream.synchronize()
                finally:
                    self._flight.clear()

    # -- one step -----------------------------------------------------------------------------------
    def _span(self, rows) -> int:
        """The bound of the rows' positions for a step launched now: the host's rows lag the device's
        by the steps in flight (at most one), so a step launched now has positions up to the rows'
        highest + 1; any step replayed later under the same bound checks it again here."""
        return decode_span_bound(max(r.position for r in rows) + 2 + len(self._flight), self.kv.n_ctx)

    def _issue(self, B: int, parity: int, key) -> None:
        """The step's ops on the device's stream (eagerly, or into the capture)."""
        dev, st = self.dev, self.st
        step = Step(T=B, ids=st.ids[:B], positions=st.pos[:B], n_past=st.pos[:B])
        self.kv.span = key[1]
        logits = dev.contiguous(self.forward(step, self.kv))  # [B, V]
        self._logits[key] = logits  # (the addresses a replay of this graph writes)
        tok = dev.sampler_for(int(logits.shape[1])).sample_rows(logits, st, greedy=key[3])
        launch(dev.core.fn("advance_rows"), (1,), (32,),
               (tok, st.ids, st.pos, st.step, st.recent, i32(st.rs), st.window, i32(B)), pdl=True)
        cupy.cuda.runtime.memcpyAsync(self._tok[parity].ctypes.data, tok.data.ptr, 4 * B,
                                      cupy.cuda.runtime.memcpyDeviceToHost, dev.stream.ptr)

    def _launch(self) -> None:
        dev, rows = self.dev, list(self.rows)
        B, parity = len(rows), self._n_launched % 2
        for r in rows:
            if r.budget is not None and r.budget < 1:
                raise RuntimeError("batch decoder: a row ran past its budget")
        if dev.graph_epoch != self._epoch:  # a buffer the graphs point into was replaced
            self.graphs.clear()
            self._logits.clear()
            self._eager_done.clear()
            self._epoch = dev.graph_epoch
        greedy = all(plain_greedy(r.params) for r in rows)
        key = (B, self._span(rows), parity, greedy)
        self._start[parity].record(dev.stream)  # (reached when the step before it ends, if it was queued)
        try:
            if (B, greedy) not in self._eager_done:
                dev.begin_step()
                self._issue(B, parity, key)
                self._eager_done.add((B, greedy))
            elif key not in self.graphs:
                dev.begin_step()
                mode = getattr(cupy.cuda.runtime, "streamCaptureModeRelaxed", None)
                dev.stream.begin_capture(mode) if mode is not None else dev.stream.begin_capture()
                try:
                    self._issue(B, parity, key)
                finally:
                    graph = dev.stream.end_capture()
                graph.upload(dev.stream) if hasattr(graph, "upload") else None
                graph.launch(dev.stream)
                self.graphs[key] = graph
            else:
                self.graphs[key].launch(dev.stream)
            self._done[parity].record(dev.stream)
        except cupy.cuda.runtime.CUDARuntimeError as exc:
            raise CudaError(f"decode step failed on GPU {dev.gpu}: {exc}") from exc
        for r in rows:
            if r.budget is not None:
                r.budget -= 1
        self._flight.append((rows, parity, key))
        self._n_launched += 1

    def step(self) -> list:
        self.dev.make_current()
        if not self._flight:
            if not self.rows:
                return []
            if self.changed:
                self._upload()
            self._launch()
        if (not self.changed and len(self._flight) == 1 and self.rows
                and all(r.budget is None or r.budget >= 1 for r in self.rows)
                and all(r.logprobs is None for r in self.rows)):  # (log-probabilities read the step's logits)
            self._launch()  # step k + 1 runs while the host handles step k's tokens
        rows, parity, key = self._flight.popleft()
        t0 = time.perf_counter()
        try:
            self._done[parity].synchronize()
            self.wait_s = time.perf_counter() - t0  # (the GPU time the host's work did not cover)
            self.gpu_s = cupy.cuda.get_elapsed_time(self._start[parity], self._done[parity]) / 1e3
        except cupy.cuda.runtime.CUDARuntimeError as exc:
            raise CudaError(f"decode step failed on GPU {self.dev.gpu}: {exc}") from exc
        members = {id(r) for r in self.rows}
        want = [b for b, r in enumerate(rows) if id(r) in members and r.logprobs is not None]
        if want and self._flight:  # the next step would have overwritten these logits: never launched then
            raise RuntimeError("batch decoder: log-probabilities asked of a step with another in flight")
        logits = None
        if want:
            try:
                logits = cupy.asnumpy(self._logits[key][want], stream=self.dev.stream)
                self.dev.stream.synchronize()
            except cupy.cuda.runtime.CUDARuntimeError as exc:
                raise CudaError(f"decode step failed on GPU {self.dev.gpu}: {exc}") from exc
        out = []
        for b, r in enumerate(rows):
            if id(r) in members:  # (a row that left since: its token is dropped)
                tok = int(self._tok[parity, b])
                if r.logprobs is not None:
                    r.last_logprobs = token_logprobs(logits[want.index(b)], tok, r.logprobs)
                r.advance(tok)
                out.append((r, tok))
        return out

    def close(self) -> None:
        try:  # a step still in flight writes KV caches and our buffers: let it finish first
            self.dev.stream.synchronize()
        except cupy.cuda.runtime.CUDARuntimeError:
            pass
        self._flight.clear()
        self.graphs.clear()
        self._logits.clear()
        self._table_mem = None
        self._pinned = None
