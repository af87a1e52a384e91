"""Sampling on the GPU, reproducing `orcd_core.sampling` (temperature -> repetition penalty ->
top-k -> top-p -> min-p -> inverse-CDF draw with the SplitMix64 uniform of (seed, step_index)), for
each row of a [B, V] block of logits with the row's own parameters.

Every input that changes per step or per request (logits, parameters, recent ids, step index) is a
device array (`RowState`) and every launch has a fixed geometry for a given B, so a sampled step is
captured into the decode graph like any other op and the graph serves any requests. Greedy rows skip
the exponentials and the selection inside the kernels. The float64 sums run in a different order
than NumPy's sequential cumsum; they can only change an id when the draw lands within ~1e-15
(relative) of a boundary, as sampling.py documents.
"""

from __future__ import annotations

import numpy as np

from ...generation import MAX_REPETITION_WINDOW
from ...sampling import penalties_on
from .kernels import NULL, i32, i64, launch
from .memory import align, raw_alloc, view

ARGMAX_BLOCKS = 64  # core.cu: partial (value, index) pairs per row

# (name, dtype, per-row count): the per-row state of a decode loop, one device block and one host copy
_FIELDS = (("ids", np.int32, 1), ("pos", np.int32, 1), ("step", np.int32, 1), ("window", np.int32, 1),
           ("top_k", np.int32, 1), ("temp", np.float32, 1), ("penalty", np.float32, 1), ("freq", np.float32, 1),
           ("presence", np.float32, 1), ("top_p", np.float64, 1),
           ("min_p", np.float64, 1), ("seed", np.uint64, 1), ("recent", np.int32, MAX_REPETITION_WINDOW))


class RowState:
    """`n` rows of decode state on the device: the next input id and position, the step index, the
    sampling parameters and the penalties' window (a ring of `window[b]` ids, slot step % window: the
    oldest is replaced by advance_rows). `fill` writes them from the host in one copy."""

    def __init__(self, n: int):
        self.n = int(n)
        self.rs = MAX_REPETITION_WINDOW  # the ring's row stride
        offs, off = {}, 0
        for name, dt, k in _FIELDS:
            offs[name] = off
            off = align(off + self.n * k * np.dtype(dt).itemsize)
        self.nbytes = off
        self._mem = raw_alloc(off)
        self._host = np.zeros(off, np.uint8)
        self._dev = view(self._mem, 0, (off,), np.uint8)
        for name, dt, k in _FIELDS:
            shape = (self.n, k) if k > 1 else (self.n,)
            setattr(self, name, view(self._mem, offs[name], shape, dt))
            setattr(self, "_h_" + name, self._host[offs[name]: offs[name] + self.n * k * np.dtype(dt).itemsize]
                    .view(dt).reshape(shape))

    def fill(self, rows, stream) -> None:
        """rows: [(id, position, step_index, SamplingParams, recent ids oldest first)]."""
        if len(rows) > self.n:
            raise ValueError(f"{len(rows)} rows for a state of {self.n}")
        self._host[:] = 0
        self._h_recent[:] = -1
        for b, (tok, pos, step, p, recent) in enumerate(rows):
            W = int(p.repetition_window)
            if W > self.rs:
                raise ValueError(f"repetition_window {W} exceeds {self.rs}")
            self._h_ids[b], self._h_pos[b], self._h_step[b] = tok, pos, step
            self._h_window[b] = W if penalties_on(p) else 0
            self._h_top_k[b] = int(p.top_k)
            self._h_temp[b] = max(float(p.temperature), 0.0)
            self._h_penalty[b] = float(p.repetition_penalty)
            self._h_freq[b], self._h_presence[b] = float(p.frequency_penalty), float(p.presence_penalty)
            self._h_top_p[b], self._h_min_p[b] = float(p.top_p), float(p.min_p)
            self._h_seed[b] = int(p.seed) & ((1 << 64) - 1)
            if W > 0:
                ids = ([-1] * W + [int(i) for i in recent])[-W:]
                for j, i in enumerate(ids):  # oldest at slot step % W: the first one replaced
                    self._h_recent[b, (step + j) % W] = i
        self._dev.set(self._host, stream=stream)


class Sampler:
    """Scratch for `rows` rows of one vocabulary size: l (float32), e (float64), argmax partials."""

    def __init__(self, device, V: int, rows: int):
        self.dev = device
        self.V, self.rows = int(V), int(rows)
        sizes = [self.rows * self.V * 4, self.rows * self.V * 8, self.rows * ARGMAX_BLOCKS * 4,
                 self.rows * ARGMAX_BLOCKS * 4, self.rows * 4]
        offs, off = [], 0
        for s in sizes:
            offs.append(off)
            off = align(off + s)
        self.nbytes = off
        self._mem = raw_alloc(off)
        self.l = view(self._mem, offs[0], (self.rows, self.V), np.float32)
        self.e = view(self._mem, offs[1], (self.rows, self.V), np.float64)
        self.pv = view(self._mem, offs[2], (self.rows, ARGMAX_BLOCKS), np.float32)
        self.pi = view(self._mem, offs[3], (self.rows, ARGMAX_BLOCKS), np.int32)
        self.vmax = view(self._mem, offs[4], (self.rows,), np.float32)

    def sample_rows(self, logits, st: RowState, *, greedy: bool = False):
        """logits [B, V] (B <= rows, rows contiguous) -> device int32 [B]: row b sampled with st's row b.
        `greedy`: the caller's word that every row is `plain_greedy` (graph.py keys its graphs on it):
        the argmax of the logits themselves, two launches instead of six (no copy of the logits, no
        penalty, exponential or selection kernel that a greedy row would exit at once). The same ids as
        the full path, which takes the argmax of an exact copy of the same logits."""
        core = self.dev.core
        B, V = int(logits.shape[0]), int(logits.shape[1])
        if B > self.rows or V != self.V:
            raise ValueError(f"sampler for {self.rows} x {self.V}, got logits {logits.shape}")
        out = self.dev.step_array((B,), np.int32)
        if greedy:
            if not logits.flags.c_contiguous:
                raise ValueError("sampler: the greedy argmax reads contiguous logits")
            launch(core.fn("argmax_part"), (ARGMAX_BLOCKS, B), (256,), (logits, i32(V), self.pv, self.pi), pdl=True)
            launch(core.fn("argmax_final"), (B,), (64,), (self.pv, self.pi, i32(ARGMAX_BLOCKS), out, NULL), pdl=True)
            return out
        gv = (V + 255) // 256
        launch(core.fn("sample_prep"), (gv, B), (256,), (logits, i64(V), self.l, i32(V), st.temp), pdl=True)
        launch(core.fn("sample_penalty"), (B,), (256,),
               (self.l, i32(V), st.recent, i32(st.rs), st.window, st.penalty, st.freq, st.presence), pdl=True)
        launch(core.fn("argmax_part"), (ARGMAX_BLOCKS, B), (256,), (self.l, i32(V), self.pv, self.pi), pdl=True)
        launch(core.fn("argmax_final"), (B,), (64,), (self.pv, self.pi, i32(ARGMAX_BLOCKS), out, self.vmax), pdl=True)
        launch(core.fn("sample_exp"), (gv, B), (256,), (self.l, self.vmax, self.e, i32(V), st.temp), pdl=True)
        launch(core.fn("sample_select"), (B,), (1024,),
               (self.l, self.e, i32(V), st.top_k, st.top_p, st.min_p, st.seed, st.temp, st.step, out), pdl=True)
        return out
