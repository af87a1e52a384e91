"""The decode loop on the GPU: one CUDA graph per step, replayed, one step ahead of the host.

The first step runs op by op (it compiles/loads kernels and sizes the workspace); the next two are
captured from the stream (relaxed mode), one graph per parity of the step index, and every later step
replays the graph of its parity. The step's inputs live in small persistent device buffers: the
captured `advance_step` kernel moves the sampled token into the next step's input id, advances
position, n_past and step index, and writes the token into the repetition window (a ring whose oldest
slot is overwritten). Each graph ends with a 4-byte copy of the token into its own slot of pinned host
memory and an event: no host->device copy at all, and one small device->host copy per token.

Pipelining: since step k + 1 needs nothing from the host, `next()` launches it before it waits for
step k's token, so the GPU runs step k + 1 while the host detokenizes, matches stops and streams
token k. The two parities keep step k's token from being overwritten by step k + 1's copy. A step is
never launched past `max_steps`; when the caller stops early (end of text, a stop sequence, a
cancel) the one step in flight is discarded by `close()`, which waits for it.
"""

from __future__ import annotations

import cupy
import numpy as np

from ...device import Decoder, Step
from ...generation import CudaError
from .kernels import i32, launch
from .memory import raw_alloc, view


class GraphDecoder(Decoder):
    def __init__(self, dev, forward, *, first_id: int, position: int, params, step_index: int, recent_ids,
                 max_steps: int | None = None):
        dev._enter()
        self.dev, self.forward, self.params = dev, forward, params
        self.W = max(int(params.repetition_window), 1)
        recent = [int(i) for i in recent_ids][-self.W:]
        recent = [-1] * (self.W - len(recent)) + recent  # oldest first: slot k % W is replaced at step k
        self._mem = raw_alloc(4 * (8 + self.W))
        buf = view(self._mem, 0, (8 + self.W,), np.int32)
        host = np.array([first_id, position, position, step_index, 0, 0, 0, 0] + recent, np.int32)
        buf.set(host, stream=dev.stream)
        self.ids, self.pos, self.n_past, self.step = buf[0:1], buf[1:2], buf[2:3], buf[3:4]
        self.recent = buf[8:]
        self.step0 = int(step_index)
        self._pinned = cupy.cuda.alloc_pinned_memory(8)
        self._tok = np.frombuffer(self._pinned, np.int32, 2)  # slot k % 2: step k's token
        self._done = [cupy.cuda.Event(block=False, disable_timing=True) for _ in range(2)]
        self.graphs: list = [None, None]
        self.max_steps = None if max_steps is None else int(max_steps)
        self.n_launched = 0  # steps issued to the GPU
        self.n_steps = 0  # tokens returned
        dev.stream.synchronize()

    def _issue(self, slot: int) -> None:
        """The step's ops, on the device's stream (eagerly, or into the capture)."""
        dev = self.dev
        step = Step(T=1, ids=self.ids, positions=self.pos, n_past=self.n_past)
        logits = self.forward(step)
        tok = dev.sample(logits, self.params, self.recent, self.step)
        launch(dev.core.fn("advance_step"), (1,), (32,),
               (tok, self.ids, self.pos, self.n_past, self.step, self.recent, i32(self.W), i32(self.step0)))
        cupy.cuda.runtime.memcpyAsync(self._tok.ctypes.data + 4 * slot, tok.data.ptr, 4,
                                      cupy.cuda.runtime.memcpyDeviceToHost, dev.stream.ptr)

    def _launch(self) -> None:
        """Issue step `n_launched` (eager for the first, captured for the next two, then replayed)."""
        dev = self.dev
        k, slot = self.n_launched, self.n_launched % 2
        try:
            if k == 0:
                dev.begin_step()
                self._issue(slot)
            elif self.graphs[slot] is None:
                dev.begin_step()
                mode = getattr(cupy.cuda.runtime, "streamCaptureModeRelaxed", None)
                dev.stream.begin_capture(mode) if mode is not None else dev.stream.begin_capture()
                try:
                    self._issue(slot)
                finally:
                    graph = dev.stream.end_capture()
                self.graphs[slot] = graph
                graph.upload(dev.stream) if hasattr(graph, "upload") else None
                graph.launch(dev.stream)
            else:
                self.graphs[slot].launch(dev.stream)
            self._done[slot].record(dev.stream)
        except cupy.cuda.runtime.CUDARuntimeError as exc:
            raise CudaError(f"decode step failed on GPU {dev.gpu}: {exc}") from exc
        self.n_launched += 1

    def next(self) -> int:
        dev = self.dev
        dev._enter()
        k = self.n_steps
        if self.max_steps is not None and k >= self.max_steps:
            raise RuntimeError(f"decoder: more than max_steps={self.max_steps} steps asked for")
        if self.n_launched == k:
            self._launch()
        if self.n_launched == k + 1 and (self.max_steps is None or k + 1 < self.max_steps):
            self._launch()  # step k + 1 runs while the host handles token k
        try:
            self._done[k % 2].synchronize()
        except cupy.cuda.runtime.CUDARuntimeError as exc:
            raise CudaError(f"decode step failed on GPU {dev.gpu}: {exc}") from exc
        self.n_steps += 1
        return int(self._tok[k % 2])

    def close(self) -> None:
        try:  # a step still in flight writes the KV cache and our buffers: let it finish first
            self.dev.stream.synchronize()
        except cupy.cuda.runtime.CUDARuntimeError:
            pass
        self.graphs = [None, None]
        self._mem = None
        self._pinned = None
