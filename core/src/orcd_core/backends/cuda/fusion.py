"""Deferred ops: how the CUDA device fuses an op into the one that consumes it, with no change to the
models' forward passes.

A model writes `linear(rms_norm(x))`, `add(x, linear(h))`, `attention(rope(q), rope(k), v)`. On the
GPU each of those would be a launch of its own; in a decode step (one token) most of them are a few
microseconds of launch latency for kilobytes of work. So some ops do not launch at once: they return
their (unwritten) output array and leave a `Deferred` record keyed by that array's memory. A consumer
that knows how to absorb the producer fuses it (the GEMV stages `rms_norm(x) * w` or `silu(g) * u`
while loading x, adds a residual in its epilogue; the decode attention ropes q and k and writes the KV
cache itself, a prefill's `rope_kv_write` ropes them while writing it); every other read of a deferred
array goes through `Deferred.ready`, which launches the producer first. Activations are never written
twice within a step (bump workspace, pool arrays kept alive by the record), so launching a producer
later in the stream gives the same values.

The records live for one step: `DeferredOps.reset()` at `begin_step` (a record left unread then was
never needed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(eq=False)
class Deferred:
    """One deferred op: `out` is its unwritten output, `launch(out)` writes it; `kind` and `args`
    describe it to the consumers that can absorb it."""

    kind: str  # "rms_norm" | "silu_mul" | "gemv" | "rope" | "q8row" (written; args["xq"]: its int8 twin)
    out: Any  # cupy.ndarray
    launch: Callable[[Any], None]
    args: dict = field(default_factory=dict)
    lo: int = 0
    hi: int = 0


class DeferredOps:
    """The deferred records of the current step, looked up by the memory an array reads."""

    def __init__(self) -> None:
        self._pending: list[Deferred] = []

    def reset(self) -> None:
        self._pending.clear()

    def defer(self, kind: str, out, launch: Callable[[Any], None], **args) -> Any:
        ptr = int(out.data.ptr)
        self._pending.append(Deferred(kind, out, launch, args, ptr, ptr + int(out.nbytes)))
        return out

    def exact(self, x, kind: str) -> Deferred | None:
        """The record whose output is exactly `x` (same memory and size: not a view of part of it)."""
        ptr = _ptr(x) if self._pending else None
        if ptr is None:
            return None
        for d in self._pending:
            if d.lo == ptr and d.kind == kind and d.out.size == x.size and d.out.shape == x.shape:
                return d
        return None

    def same_memory(self, x, kind: str) -> Deferred | None:
        """The record of `kind` whose output is x's memory, whatever x's shape (a reshaped view of it)."""
        ptr = _ptr(x) if self._pending else None
        if ptr is None:
            return None
        for d in self._pending:
            if d.kind == kind and d.lo == ptr and d.hi == ptr + int(x.nbytes):
                return d
        return None

    def take(self, d: Deferred) -> bool:
        """Remove `d` without launching it (its consumer launches it its own way); False if it was not
        pending any more (something read its output first: it is launched already)."""
        if d in self._pending:
            self._pending.remove(d)
            return True
        return False

    def ready(self, x) -> None:
        """Launch the producer of any deferred memory that `x` reads (before `x` is read)."""
        ptr = _ptr(x) if self._pending else None
        if ptr is None:
            return
        end = ptr + max(int(x.nbytes), 1)
        hit = [d for d in self._pending if d.lo < end and ptr < d.hi]
        for d in hit:
            self._pending.remove(d)
            d.launch(d.out)

    def __len__(self) -> int:
        return len(self._pending)


def _ptr(x) -> int | None:
    """The device address of a CuPy array (None for anything else: host arrays, None)."""
    p = getattr(getattr(x, "data", None), "ptr", None)
    return int(p) if p is not None else None
