"""`WeightStore`: the model's weights in VRAM, in their GGUF types.

It owns the weight arenas (one 256-byte-aligned allocation sized by the load plan; more only if an
adapter uploads more than the file holds), fills them from the memory-mapped file through a
`ChunkedUploader` (bounded pinned staging buffers), reports load progress as bytes arrive, and proves
residency: every arena is device memory, never managed or host memory. `CudaDevice` keeps one and
delegates `upload_weight` / `upload_array` to it; nothing else in the backend touches the arenas.
"""

from __future__ import annotations

import cupy
import numpy as np

from ...device import LoadProgress, Weight
from ...errors import InsufficientVram
from .memory import Arena, ChunkedUploader, DeviceTensor, view

UNPLANNED_SEGMENT_BYTES = 256 << 20  # an upload without a load plan (a kernel test) takes VRAM in these


class WeightStore:
    """Weights of one model on one GPU (`where` names it in errors, e.g. "GPU 0 (NVIDIA H200)")."""

    def __init__(self, stream: cupy.cuda.Stream, chunk_bytes: int, where: str):
        self.stream = stream
        self.chunk_bytes = int(chunk_bytes)
        self.where = where
        self.arenas: list[Arena] = []
        self.model_path = ""
        self.planned = 0  # bytes of the file's tensors (the progress total), 0 without a plan
        self.uploaded = 0  # bytes placed so far (tensors and float arrays)
        self._uploader: ChunkedUploader | None = None
        self._progress: LoadProgress | None = None

    @property
    def nbytes(self) -> int:
        """VRAM the arenas hold."""
        return sum(a.size for a in self.arenas)

    def reserve(self, model_path: str, arena_bytes: int, tensor_bytes: int, progress=None) -> None:
        """The planned arena (raises CuPy's OutOfMemoryError when it does not fit; the caller turns
        that into InsufficientVram with the whole plan) and the progress of `tensor_bytes`."""
        self.model_path = model_path
        self.planned = int(tensor_bytes)
        self.arenas.append(Arena(arena_bytes, "weights"))
        self._uploader = ChunkedUploader(self.stream, self.chunk_bytes)
        self._progress = LoadProgress(progress, self.planned)
        self._progress.start()

    def _place(self, nbytes: int) -> tuple[cupy.cuda.MemoryPointer, int]:
        for a in self.arenas:
            off = a.take(nbytes)
            if off is not None:
                return a.base, off
        try:  # no (or a full) arena: a new segment, small when a plan exists (it was exceeded)
            a = Arena(max(nbytes, UNPLANNED_SEGMENT_BYTES if not self.planned else (1 << 20)), "weights")
        except cupy.cuda.memory.OutOfMemoryError:
            raise InsufficientVram(self.model_path or "(model)",
                                   f"VRAM on {self.where} ran out while uploading {nbytes} more weight bytes") from None
        self.arenas.append(a)
        return a.base, a.take(nbytes)

    def upload(self, name: str, parts, fmt) -> Weight:
        """`parts` (TensorInfos of one format and row length) as one weight: rows concatenated, or
        for stacked experts (3-D parts) each expert's rows of every part together."""
        if not parts:
            raise ValueError(f"weight {name!r}: no parts")
        shapes = [tuple(p.np_shape) for p in parts]
        for p in parts:
            if int(p.ggml_type) != int(fmt.ggml_type):
                raise ValueError(f"tensor {p.name!r} is {p.type_name}, not {fmt.name}")
        if any(len(s) != len(shapes[0]) or s[-1] != shapes[0][-1] for s in shapes):
            raise ValueError(f"weight {name!r}: parts {shapes} do not share a row length")
        cols = shapes[0][-1]
        row_bytes = fmt.row_bytes(cols)
        nbytes = sum(p.nbytes for p in parts)
        if self._uploader is None:
            self._uploader = ChunkedUploader(self.stream, self.chunk_bytes)
        base, off = self._place(nbytes)
        dst = int(base.ptr) + off
        o = dst
        if len(shapes[0]) == 3 and len(parts) > 1:  # stacked experts: concatenate rows per expert
            n_exp = shapes[0][0]
            if any(s[0] != n_exp for s in shapes):
                raise ValueError(f"weight {name!r}: parts {shapes} differ in expert count")
            for e in range(n_exp):
                for p in parts:
                    per = p.nbytes // n_exp
                    self._uploader.copy(o, p.data.reshape(-1)[e * per : (e + 1) * per])
                    o += per
            shape = (n_exp, sum(s[1] for s in shapes), cols)
        else:
            for p in parts:
                self._uploader.copy(o, p.data)
                o += p.nbytes
            shape = (sum(s[0] for s in shapes),) + shapes[0][1:] if len(shapes[0]) > 1 else (sum(s[0] for s in shapes),)
        if self._progress is not None:
            self._progress.add(nbytes)
        self.uploaded += nbytes
        rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
        data = view(base, off, (rows, row_bytes), np.uint8)
        return Weight(name=name, shape=tuple(int(s) for s in shape), fmt=fmt,
                      data=DeviceTensor(data, rows, cols, row_bytes, dst), nbytes=nbytes)

    def upload_array(self, name: str, array) -> cupy.ndarray:
        """A float32 array (norm weights, biases) placed in the arena; synchronous."""
        host = np.ascontiguousarray(np.asarray(array, dtype=np.float32))
        base, off = self._place(host.nbytes)
        out = view(base, off, host.shape, np.float32)
        self.stream.synchronize()
        out.set(host, stream=self.stream)
        self.stream.synchronize()
        self.uploaded += host.nbytes
        return out

    def finish(self) -> None:
        """Wait for the last chunk, drop the staging buffers, report 100%."""
        if self._uploader is not None:
            self._uploader.close()
            self._uploader = None
        self.stream.synchronize()
        if self._progress is not None:
            self._progress.finish()
            self._progress = None

    def prove_resident(self, device: cupy.cuda.Device) -> None:
        """Every arena is device memory (cudaPointerGetAttributes: type device, no host pointer),
        checked at its first and last byte; raises RuntimeError naming the arena otherwise."""
        with device:
            for a in self.arenas:
                for ptr in (a.ptr, a.ptr + a.size - 1):
                    attrs = cupy.cuda.runtime.pointerGetAttributes(ptr)
                    if int(attrs.type) != 2 or int(attrs.hostPointer or 0) != 0:
                        raise RuntimeError(f"arena {a.label} at {ptr:#x}: memory type {attrs.type}, "
                                           f"host pointer {attrs.hostPointer}")

    def release(self) -> None:
        """Drop every arena and staging buffer (the memory goes back when no view holds it)."""
        if self._uploader is not None:
            try:
                self._uploader.close()
            except Exception:
                pass
            self._uploader = None
        self._progress = None
        self.arenas = []
