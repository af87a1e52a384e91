"""Sampling on the GPU, reproducing `orcd_core.sampling` (temperature -> repetition penalty ->
top-k -> top-p -> min-p -> inverse-CDF draw with the SplitMix64 uniform of (seed, step_index)).

Every input that changes per step (logits, recent ids, step index) is a device array and every
launch has a fixed geometry, so a sampled step is captured into the decode graph like any other op.
The float64 sums run in a different order than NumPy's sequential cumsum; they can only change an
id when the draw lands within ~1e-15 (relative) of a boundary, as sampling.py documents.
"""

from __future__ import annotations

import numpy as np

from .kernels import f32, i32, launch
from .memory import align, raw_alloc, view

ARGMAX_BLOCKS = 64  # blocks of argmax_part: partial (value, index) pairs (the kernels take the count)


class Sampler:
    """Scratch for one vocabulary size: l (float32 [V]), e (float64 [V]), argmax partials."""

    def __init__(self, device, V: int):
        self.dev = device
        self.V = int(V)
        self.nbytes = self.V * 4 + self.V * 8 + ARGMAX_BLOCKS * 8 + 1024
        self._mem = raw_alloc(self.nbytes)
        self.l = view(self._mem, 0, (self.V,), np.float32)
        off = align(self.V * 4)
        self.e = view(self._mem, off, (self.V,), np.float64)
        off += align(self.V * 8)
        self.pv = view(self._mem, off, (ARGMAX_BLOCKS,), np.float32)
        self.pi = view(self._mem, off + 256, (ARGMAX_BLOCKS,), np.int32)
        self.vmax = view(self._mem, off + 512, (1,), np.float32)

    def sample(self, logits, params, recent_ids, step_index):
        dev, core = self.dev, self.dev.core
        V = int(logits.size)
        out = dev._ws((1,), np.int32)
        temp = float(params.temperature)
        launch(core.fn("sample_prep"), ((V + 255) // 256,), (256,), (logits, self.l, i32(V), f32(max(temp, 0.0))))
        W = int(params.repetition_window)
        if params.repetition_penalty != 1.0 and W > 0 and recent_ids is not None and recent_ids.size:
            recent = recent_ids.reshape(-1)[-W:]
            launch(core.fn("sample_penalty"), (1,), (256,),
                   (self.l, i32(V), recent, i32(recent.size), f32(params.repetition_penalty)))
        launch(core.fn("argmax_part"), (ARGMAX_BLOCKS,), (256,), (self.l, i32(V), self.pv, self.pi))
        launch(core.fn("argmax_final"), (1,), (64,), (self.pv, self.pi, i32(ARGMAX_BLOCKS), out, self.vmax))
        if temp <= 0:
            return out
        launch(core.fn("sample_exp"), ((V + 255) // 256,), (256,), (self.l, self.vmax, self.e, i32(V)))
        top_k = int(params.top_k) if 0 < int(params.top_k) < V else 0
        launch(core.fn("sample_select"), (1,), (1024,),
               (self.l, self.e, i32(V), i32(top_k), np.float64(params.top_p), np.float64(params.min_p),
                np.uint64(int(params.seed) & ((1 << 64) - 1)), step_index, out))
        return out
