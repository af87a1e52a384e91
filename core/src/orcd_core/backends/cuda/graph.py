"""The decode loop on the GPU: one CUDA graph per step, replayed.

The first step runs op by op (it compiles/loads kernels and sizes the workspace); the second is
captured from the stream (relaxed mode) and every later step replays that graph. The step's inputs
live in small persistent device buffers: the captured `advance_step` kernel moves the sampled token
into the next step's input id, advances position, n_past and step index, and writes the token into
the repetition window (a ring whose oldest slot is overwritten). The graph ends with a 4-byte copy
of the token into pinned host memory: one small device->host copy per token, no host->device copy.
"""

from __future__ import annotations

import cupy
import numpy as np

from ...device import Decoder, Step
from ...generation import CudaError
from .kernels import i32, launch
from .memory import raw_alloc, view


class GraphDecoder(Decoder):
    def __init__(self, dev, forward, *, first_id: int, position: int, params, step_index: int, recent_ids):
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
        self._pinned = cupy.cuda.alloc_pinned_memory(4)
        self._tok = np.frombuffer(self._pinned, np.int32, 1)
        self.graph = None
        self.n_steps = 0
        dev.stream.synchronize()

    def _issue(self) -> None:
        """The step's ops, on the device's stream (eagerly, or into the capture)."""
        dev = self.dev
        step = Step(T=1, ids=self.ids, positions=self.pos, n_past=self.n_past)
        logits = self.forward(step)
        tok = dev.sample(logits, self.params, self.recent, self.step)
        launch(dev.core.fn("advance_step"), (1,), (32,),
               (tok, self.ids, self.pos, self.n_past, self.step, self.recent, i32(self.W), i32(self.step0)))
        cupy.cuda.runtime.memcpyAsync(self._tok.ctypes.data, tok.data.ptr, 4, cupy.cuda.runtime.memcpyDeviceToHost,
                                      dev.stream.ptr)

    def next(self) -> int:
        dev = self.dev
        dev._enter()
        if self.graph is None:
            dev.begin_step()
            if self.n_steps == 0:
                self._issue()
            else:
                mode = getattr(cupy.cuda.runtime, "streamCaptureModeRelaxed", None)
                dev.stream.begin_capture(mode) if mode is not None else dev.stream.begin_capture()
                try:
                    self._issue()
                finally:
                    graph = dev.stream.end_capture()
                self.graph = graph
                self.graph.upload(dev.stream) if hasattr(self.graph, "upload") else None
                self.graph.launch(dev.stream)
        else:
            self.graph.launch(dev.stream)
        try:
            dev.stream.synchronize()
        except cupy.cuda.runtime.CUDARuntimeError as exc:
            raise CudaError(f"decode step failed on GPU {dev.gpu}: {exc}") from exc
        self.n_steps += 1
        return int(self._tok[0])

    def close(self) -> None:
        self.graph = None
        self._mem = None
        self._pinned = None
