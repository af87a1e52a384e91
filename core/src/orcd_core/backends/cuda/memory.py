"""VRAM for the CUDA backend: weight arenas, the per-step workspaces, and the chunked upload.

Everything is plain device memory (`cudaMalloc` through `cupy.cuda.Memory`, never managed memory):
weights, KV caches and the decode workspace are single allocations of their own; prefill activations
come from a `StepPool`, a CuPy memory pool owned by the device (not CuPy's global one), whose held
bytes are reported as workspace. So the bytes we account for are the bytes the driver holds, and
freeing a KV cache gives its memory back at once.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import cupy
import numpy as np

from ...generation import VramOOM
from ...shape import ALLOCATION_ALIGNMENT, align

_MASK = ALLOCATION_ALIGNMENT - 1  # a power of two


def raw_alloc(nbytes: int) -> cupy.cuda.MemoryPointer:
    """`cudaMalloc` of `nbytes` (at least 256-byte aligned by the driver); raises
    `cupy.cuda.memory.OutOfMemoryError` when it does not fit."""
    mem = cupy.cuda.Memory(max(int(nbytes), 1))
    return cupy.cuda.MemoryPointer(mem, 0)


def view(ptr: cupy.cuda.MemoryPointer, offset: int, shape, dtype) -> cupy.ndarray:
    return cupy.ndarray(shape, dtype=dtype, memptr=ptr + int(offset))


class Arena:
    """A bump allocator over one device allocation (256-byte aligned suballocations)."""

    def __init__(self, nbytes: int, label: str):
        self.label = label
        self.size = align(nbytes)
        self.base = raw_alloc(self.size)
        self.used = 0

    def take(self, nbytes: int) -> int | None:
        """Offset of a new suballocation, or None when it does not fit."""
        off = align(self.used)
        if off + nbytes > self.size:
            return None
        self.used = off + int(nbytes)
        return off

    @property
    def ptr(self) -> int:
        return int(self.base.ptr)


class Workspace:
    """Per-step activations. `reset()` (at each `begin_step`) rewinds the bump pointer, so a replayed
    CUDA graph finds its buffers at the same addresses. A step that needs more than the arena holds
    spills into extra segments; the next `reset()` replaces them all by one arena of the high-water
    size (never during a capture: the decode graph is captured after an eager step of the same shape)."""

    def __init__(self, nbytes: int):
        self.arena = Arena(max(nbytes, 1 << 20), "workspace")
        self.extra: list[Arena] = []
        self.high_water = 0
        self._step_bytes = 0
        self.epoch = 0  # counts replacements of the arena (captured graphs hold its addresses)

    @property
    def nbytes(self) -> int:
        return self.arena.size + sum(a.size for a in self.extra)

    def reset(self) -> None:
        self.high_water = max(self.high_water, self._step_bytes)
        if self.extra:
            self.extra = []
            self.arena = None  # free first, then take the larger one
            self.arena = Arena(align(self.high_water + (1 << 20)), "workspace")
            self.epoch += 1
        self.arena.used = 0
        self._step_bytes = 0

    def alloc(self, shape, dtype) -> cupy.ndarray:
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        arena = self.arena
        off = (arena.used + _MASK) & ~_MASK  # the bump allocation, inlined (this runs for every op)
        end = off + nbytes
        self._step_bytes += end - arena.used
        if end <= arena.size:
            arena.used = end
            return cupy.ndarray(shape, dtype, memptr=arena.base + off)
        for a in self.extra:
            off = a.take(nbytes)
            if off is not None:
                return view(a.base, off, shape, dtype)
        if cupy.cuda.get_current_stream().is_capturing():
            raise RuntimeError("workspace exhausted during CUDA graph capture")
        seg = Arena(max(align(nbytes), self.arena.size), "workspace")
        self.extra.append(seg)
        return view(seg.base, seg.take(nbytes), shape, dtype)


class StepPool:
    """Activations of prefill steps (never graph-captured): a memory pool of the device's own, so an
    array's memory is reused as soon as the adapter drops it (reference counting) and a step needs
    about one layer's activations rather than all of them. Reuse is stream-ordered: the device runs
    everything on its one stream, so a kernel that reuses freed memory runs after the kernels that
    used it. With ORCD_CUDA_CHECK=1 every allocation is filled with NaN bytes, so an op that leaves an
    element unwritten shows. Running out of VRAM is `VramOOM` (the request fails, the worker goes on)."""

    def __init__(self):
        self._pool = cupy.cuda.MemoryPool()
        self._poison = os.environ.get("ORCD_CUDA_CHECK", "") not in ("", "0")

    @property
    def nbytes(self) -> int:
        """Bytes the pool holds from the driver (in use or cached for reuse)."""
        return int(self._pool.total_bytes())

    def reserve(self, nbytes: int) -> None:
        """Take `nbytes` from the driver now and keep them cached: later steps carve their arrays out
        of it (the pool splits free blocks), so a prefill within the estimate allocates nothing."""
        if nbytes > 0:
            try:
                mem = self._pool.malloc(int(nbytes))
            except cupy.cuda.memory.OutOfMemoryError:
                free, _ = cupy.cuda.runtime.memGetInfo()
                raise VramOOM(f"a prefill pool of {nbytes} bytes does not fit ({free} bytes free)",
                              required=int(nbytes), available=int(free)) from None
            del mem  # back to the pool's free list, still held

    def release(self) -> None:
        self._pool.free_all_blocks()

    def alloc(self, shape, dtype) -> cupy.ndarray:
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        try:
            mem = self._pool.malloc(nbytes)
        except cupy.cuda.memory.OutOfMemoryError:
            free, _ = cupy.cuda.runtime.memGetInfo()
            raise VramOOM(f"prefill activations: {nbytes} more bytes do not fit ({free} bytes free)",
                          required=int(nbytes), available=int(free)) from None
        if self._poison and nbytes:
            cupy.cuda.runtime.memsetAsync(mem.ptr, 0xFF, nbytes, cupy.cuda.get_current_stream().ptr)
        return cupy.ndarray(shape, dtype, memptr=mem)


@dataclass
class DeviceTensor:
    """A weight's bytes on the device: `data` is a uint8 view [rows, row_bytes] (or [n_bytes])."""

    data: cupy.ndarray
    rows: int
    cols: int
    row_bytes: int
    ptr: int


class ChunkedUploader:
    """Host -> device copies of mmap'd tensor bytes in bounded chunks through two pinned staging
    buffers. While chunk i is copied by the DMA engine from buffer i % 2, the host reads chunk i+1
    from the file into the other buffer; an event per buffer says when it may be refilled. No copy of
    the whole file is ever made on the host."""

    def __init__(self, stream: cupy.cuda.Stream, chunk_bytes: int):
        self.stream = stream
        self.chunk = max(int(chunk_bytes), 4096)
        self._pinned = [cupy.cuda.alloc_pinned_memory(self.chunk) for _ in range(2)]
        self._host = [np.frombuffer(p, dtype=np.uint8, count=self.chunk) for p in self._pinned]
        self._events = [None, None]
        self._turn = 0
        self.bytes_copied = 0

    def copy(self, dst_ptr: int, src: np.ndarray) -> None:
        """Copy the bytes of `src` (a uint8 view, e.g. of the mapped file) to device address `dst_ptr`."""
        src = src.reshape(-1)
        n = src.size
        o = 0
        while o < n:
            k = min(self.chunk, n - o)
            b = self._turn
            ev = self._events[b]
            if ev is not None:
                ev.synchronize()  # the previous copy out of this buffer has finished
            np.copyto(self._host[b][:k], src[o : o + k])  # the disk read (page faults) happens here
            cupy.cuda.runtime.memcpyAsync(dst_ptr + o, self._host[b].ctypes.data, k,
                                          cupy.cuda.runtime.memcpyHostToDevice, self.stream.ptr)
            ev = cupy.cuda.Event(disable_timing=True)
            ev.record(self.stream)
            self._events[b] = ev
            self._turn ^= 1
            o += k
        self.bytes_copied += n

    def finish(self) -> None:
        self.stream.synchronize()
        self._events = [None, None]

    def close(self) -> None:
        self.finish()
        self._host = []
        self._pinned = []
