"""Compiling and launching our CUDA sources through CuPy (NVRTC), with on-disk caching.

Each source (`core.cu`, `floats.cu`, a quant plugin's `.cu`) becomes one `cupy.RawModule`, compiled
once per process for the device's own architecture (NVRTC picks `sm_XY` from the current device) with
`-std=c++17` and the constants the sources share with the launchers as `-D` options
(`orcd_core.kernels.constants`). CuPy caches the compiled binary on disk, keyed on the full (include-expanded) source
text and options; the cache lives under `${ORCD_CACHE_DIR:-~/.cache/orcd-worker}/kernels` unless
`CUPY_CACHE_DIR` says otherwise.

`launch()` validates the launch geometry before the launch, and with `ORCD_CUDA_CHECK=1` synchronizes
after each launch so an asynchronous fault is reported at the kernel that caused it (tests run so).
`launch(..., pdl=True)` launches with programmatic stream serialization (`cuLaunchKernelEx` through
ctypes: CuPy's launch takes no attributes) where the GPU has it (sm_90 on; `ORCD_PDL=0` turns it off): the kernel
may start while the one ahead of it ends, and must `pdl_wait()` (common.cuh) before it reads what that
one wrote.
"""

from __future__ import annotations

import os
from pathlib import Path

import cupy
import numpy as np

from ...generation import CudaError
from . import pdl as _pdl
from ...kernels.constants import (GEMV_X_RMS, GEMV_X_SILU, Q8_GROUP, Q8_META_BYTES, XS_CHUNK_ALIGN, XS_MAX_BYTES,
                                  define_options)

COMPILE_OPTIONS = ("-std=c++17", *define_options())
_CHECK = os.environ.get("ORCD_CUDA_CHECK", "") not in ("", "0")


def _cache_dir() -> Path:
    base = Path(os.environ.get("ORCD_CACHE_DIR") or Path.home() / ".cache" / "orcd-worker")
    return base / "kernels"


def ensure_cache_dir() -> None:
    if "CUPY_CACHE_DIR" not in os.environ:
        d = _cache_dir()
        d.mkdir(parents=True, exist_ok=True)
        os.environ["CUPY_CACHE_DIR"] = str(d)


class KernelSet:
    """One compiled source; `fn(name)` returns its kernel (looked up once)."""

    def __init__(self, label: str, source: str):
        ensure_cache_dir()
        self.label = label
        try:
            self.module = cupy.RawModule(code=source, options=COMPILE_OPTIONS)
            self.module.compile()
        except cupy.cuda.compiler.CompileException as exc:
            raise CudaError(f"compiling {label} failed: {str(exc).strip().splitlines()[0]}") from exc
        self._fns: dict[str, object] = {}
        self._smem: dict[str, int] = {}  # kernel -> the dynamic shared-memory limit set on it

    def fn(self, name: str, max_dynamic_smem: int = 0):
        """The kernel `name`; `max_dynamic_smem` raises its dynamic shared-memory limit (the default
        limit is 48 KB) once, at the first lookup that asks for it."""
        f = self._fns.get(name)
        if f is None:
            try:
                f = self.module.get_function(name)
            except Exception as exc:  # a missing symbol: the format's source lacks the uniform name
                raise CudaError(f"{self.label} has no kernel {name!r}: {exc}") from exc
            self._fns[name] = f
        if max_dynamic_smem > 48 << 10 and max_dynamic_smem > self._smem.get(name, 0):
            f.max_dynamic_shared_size_bytes = int(max_dynamic_smem)
            self._smem[name] = int(max_dynamic_smem)
        return f


def launch(fn, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0, pdl: bool = False) -> None:
    """Launch `fn` on the current stream after validating the geometry (kept cheap: it runs for every
    op of a prefill step, where Python time is on the critical path). `pdl`: the kernel may start
    before the one ahead of it ends (its source calls pdl_wait(); taken only where pdl_enabled())."""
    n = len(grid)
    if (not 0 < grid[0] < 2**31 or (n > 1 and not 0 < grid[1] <= 65535) or (n > 2 and not 0 < grid[2] <= 65535)
            or not 0 < block[0] <= 1024 or len(block) != 1):
        raise CudaError(f"kernel {getattr(fn, 'kernel', fn)}: invalid grid {grid} / block {block}")
    if pdl and pdl_enabled():
        kernel = getattr(fn, "kernel", fn)  # (CuPy's RawKernel loads its module in this context here)
        err = _pdl.launch(kernel.ptr, grid, block, args, shared_mem, cupy.cuda.get_current_stream().ptr)
        if err:
            raise CudaError(f"kernel {kernel}: cuLaunchKernelEx failed (CUresult {err})")
    else:
        fn(grid, block, args, shared_mem=shared_mem)
    if _CHECK and not cupy.cuda.get_current_stream().is_capturing():
        try:
            cupy.cuda.get_current_stream().synchronize()
        except cupy.cuda.runtime.CUDARuntimeError as exc:
            raise CudaError(f"kernel {getattr(fn, 'kernel', fn)} failed: {exc}") from exc


def pdl_enabled() -> bool:
    """A GPU of compute capability 9.0 or more, unless ORCD_PDL=0 (A/B runs); read once."""
    if _pdl.STATE.get("on") is None:
        _pdl.STATE["on"] = (os.environ.get("ORCD_PDL", "1") != "0"
                            and int(cupy.cuda.Device().compute_capability) >= 90)
    return bool(_pdl.STATE["on"])


def blocks(n: int, per: int) -> int:
    """Blocks of a 1-D grid that covers `n` items at `per` items a block (at least one)."""
    return max(1, (int(n) + per - 1) // per)


def xs_bytes(n_vectors: int, K: int, budget: int = XS_MAX_BYTES) -> int:
    """Dynamic shared memory of a GEMV kernel that stages `n_vectors` activation vectors of K floats
    within `budget` bytes (quant_kernels.cuh xs_chunk: all of K, or chunks of a multiple of
    XS_CHUNK_ALIGN elements)."""
    per = K if 4 * n_vectors * K <= budget else (budget // (4 * n_vectors)) & ~(XS_CHUNK_ALIGN - 1)
    return 4 * n_vectors * per


def q8_row_bytes(K: int) -> int:
    """Bytes of one activation row of K elements quantized to int8 (q8.cuh's q8_row_bytes: the int8, then a
    float4 of scale and sums per Q8_GROUP elements); also the int8-activation GEMV's dynamic shared memory."""
    return K + K // Q8_GROUP * Q8_META_BYTES


def stage_vectors(mode: int, T: int) -> int:
    """Vectors of K floats the tensor-core GEMV stages for T rows (quant_kernels.cuh stage_vectors): x,
    plus the silu mode's up halves or the RMS mode's norm weight."""
    return 2 * T if mode == GEMV_X_SILU else T + 1 if mode == GEMV_X_RMS else T


# kernel scalar arguments must carry their C type (CuPy passes a Python int as a 64-bit value)
i32 = np.int32
i64 = np.int64
f32 = np.float32

NULL = np.uint64(0)
