"""`CudaDevice`: the device interface on an NVIDIA GPU, through CuPy and our own kernels.

Weights stay in their GGUF type in VRAM arenas held by a `WeightStore` (store.py: upload from the
memory-mapped file in bounded chunks, load progress, residency), sized by `planner.plan_load`. A decode-size
`linear` (T <= GEMV_MAX_T) is one dequantize-in-registers GEMV; a prefill-size one dequantizes the weight
to fp16 (in row chunks through one scratch buffer) and runs cuBLAS (fp16 in, fp32 accumulate and out).
Prefill chunks replay CUDA graphs per length bucket (prefill.py), decode steps per row count (graph.py).
Activations live in a per-step workspace; KV caches are fp16, one cudaMalloc per request.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from typing import Any, Sequence

import cupy
import numpy as np
from cupy_backends.cuda.libs import cublas

from ... import kernels as ksrc
from ...kernels.constants import AD_CHUNK, AD_MAX_SPLITS, AP_MAXD, AP_TC_QT, GEMV_MAX_R, GEMV_MAX_T, GEMV_TC_WARPS, GEMV_WARPS
from ...kernels.constants import XS_MAX_BYTES, XS_TC_MAX_BYTES
from ...kernels.constants import GEMV_X_PLAIN, GEMV_X_RMS, GEMV_X_SILU, Q8_QUANT_THREADS, Q8_T8_ROWS, Q8_WARPS
from ...device import MAX_BATCH, Device, Fence, KVBatch, KVCache, RopeSpec, Step, Weight
from ...errors import InsufficientVram, OrcdError
from ...generation import CudaError, VramOOM
from ...sampling import plain_greedy
from ...shape import kv_bytes, kv_rows
from .fusion import DeferredOps
from .kernels import NULL, KernelSet, f32, i32, i64, launch, q8_row_bytes, stage_vectors, xs_bytes
from .kernels import blocks as _blocks
from .memory import StepPool, Workspace, align, raw_alloc, view
from .prefill import PrefillGraphs
from .store import WeightStore
from .planner import (DEQUANT_SCRATCH_BYTES, decode_gemv, decode_grid_splits, gemv_tc_k_split, plan_load,
                      prefill_attention_tc, prefill_attention_tc_smem)

assert MAX_BATCH <= GEMV_MAX_T, "a batched decode step's rows must fit the decode GEMV"
GEMV_GROUP_ROWS = GEMV_MAX_T  # rows of a decode GEMV per launch (more rows: several launches over the same weight)
MAX_HEADS = 1024  # (row, head) split counters of the decode attention
# the decode attention launches by PDL (behind the q|k|v GEMVs) while its grid has at most this many
# blocks (launched early, they wait on SMs the GEMV ahead still uses). Measured on an H100 (session 7,
# calls 5-6, bench -b 1: grids of 14, 32 and 64 blocks): qwen2 1,404 -> 1,444 tok/s with PDL, served
# (448 blocks at 4,096 positions) 1,370 over SSE; gpt-oss 470 -> 456 (-3%, not explained by its grid
# size; docs/perf-notes.md). Larger grids (gpt-oss served: 2,048) are not measured with PDL, so they
# launch without it
ATTN_PDL_MAX_BLOCKS = 1024


class GpuDeviceError(OrcdError):
    """`--gpu-device` names no GPU of this machine."""


def _device_count() -> int:
    try:
        return int(cupy.cuda.runtime.getDeviceCount())
    except cupy.cuda.runtime.CUDARuntimeError:
        return 0


class _EventFence(Fence):
    def __init__(self, event, gpu):
        self.event, self.gpu = event, gpu

    def wait(self) -> None:
        try:
            self.event.synchronize()
        except cupy.cuda.runtime.CUDARuntimeError as exc:
            raise CudaError(f"prefill failed on GPU {self.gpu}: {exc}") from exc


class CudaDevice(Device):
    """The CUDA backend (one GPU per process)."""

    name = "cuda"
    plans_memory = True

    def __init__(self, gpu_device: int = 0, *, load_chunk_mb: float = 1, residency_check_s: float = 60.0):
        n = _device_count()
        if not 0 <= int(gpu_device) < n:
            raise GpuDeviceError(f"--gpu-device {gpu_device}: this machine has {n} CUDA device(s)"
                                 + (f" (valid: 0..{n - 1})" if n else ""))
        self.gpu = int(gpu_device)
        self.dev = cupy.cuda.Device(self.gpu)
        self.dev.use()
        props = cupy.cuda.runtime.getDeviceProperties(self.gpu)
        self.gpu_name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        self.sm = f"{props['major']}{props['minor']}"
        self.n_sm = int(props["multiProcessorCount"])
        self.cuda_runtime_version = int(cupy.cuda.runtime.runtimeGetVersion())
        self.decode_gemv = self._decode_gemv()
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.stream.use()
        self.weights = WeightStore(self.stream, int(float(load_chunk_mb) * (1 << 20)),
                                   f"GPU {self.gpu} ({self.gpu_name})")
        self._modules: dict[str, KernelSet] = {}
        self._by_fmt: dict[int, KernelSet] = {}  # ggml type -> its compiled source (looked up per op)
        self.core = self.core_kernels("core.cu")
        self._kv_live: dict[int, int] = {}
        self._kv_mem: dict[int, Any] = {}
        self.workspace = Workspace(8 << 20)  # decode steps (graph-captured): fixed addresses
        self.pool = StepPool()  # prefill steps: arrays reused once dropped
        self._scratch_epoch = 0  # counts replacements of the dequantize scratch (captured prefills hold it)
        self.prefill_graphs = PrefillGraphs(self)  # prefill chunks replayed as CUDA graphs (prefill.py)
        self._ws_alloc = self.workspace.alloc
        # decode attention: per-head counters of finished splits (each step's last split resets its own)
        self._attn_counters = view(raw_alloc(4 * MAX_HEADS), 0, (MAX_HEADS,), np.uint32)
        self._attn_counters.fill(0)
        self._counters: dict[str, cupy.ndarray] = {}  # counters(): other kernels' completion counters
        self._optional_kernels: dict[tuple[str, str], bool] = {}  # (format, kind) -> has_kernel
        self.stream.synchronize()
        self._scratch: cupy.ndarray | None = None  # fp16 dequantized rows for prefill GEMMs
        self._healthy = True
        self.residency_failure: str | None = None
        self._cublas = cublas.create()
        self._cublas_capture = None  # ctypes bindings for captured GEMMs (made before the first capture)
        self._graph_gemms = False  # GEMMs as a captured prefill runs them (see graph_gemms)
        self._one = np.array([1.0], np.float32)
        self._zero = np.array([0.0], np.float32)
        self._one_ptr, self._zero_ptr = self._one.ctypes.data, self._zero.ctypes.data  # (.ctypes costs ~1-3 us a read)
        self._check_s = float(residency_check_s)
        self._timer: threading.Timer | None = None
        self._closed = False
        self.sampler = None  # created at the first sample (MAX_BATCH rows of the vocabulary)
        self._sample_state = None  # the one-row state of `sample` (a prefill's first token)
        self._attn_part = None  # decode attention partials, shared by every layer (see attention)
        self._attn_epoch = 0
        self.deferred = DeferredOps()  # ops fused into their consumers (fusion.py)

    # ---- plumbing --------------------------------------------------------------------------------
    def counters(self, key: str, n: int) -> cupy.ndarray:
        """`n` uint32 zeros for the completion counters of a kernel (each launch leaves them zero: the
        thread that completes a group resets its counter), one buffer a key at a fixed address for the
        captured steps. Made at the first call, on the step's stream, which must come before any capture
        (a first decode step runs op by op: graph.py, prefill.py); a later call asks for at most `n`."""
        mem = self._counters.get(key)
        if mem is None:
            if self.stream.is_capturing():
                raise RuntimeError(f"{key}: completion counters cannot be made during a CUDA graph capture")
            mem = view(raw_alloc(4 * n), 0, (n,), np.uint32)
            cupy.cuda.runtime.memsetAsync(mem.data.ptr, 0, mem.nbytes, self.stream.ptr)
            self._counters[key] = mem
        if n > mem.size:
            raise RuntimeError(f"{key}: {n} completion counters asked for, {mem.size} made")
        return mem

    def _decode_gemv(self) -> str:
        """planner.decode_gemv for this GPU (ORCD_DECODE_GEMV overrides the choice)."""
        try:
            return decode_gemv(int(self.sm), os.environ.get("ORCD_DECODE_GEMV") or None)
        except ValueError as exc:
            raise GpuDeviceError(f"GPU {self.gpu} ({self.gpu_name}): {exc}") from None

    def make_current(self) -> None:
        """Make this GPU and our stream current for the calling thread (CuPy keeps both per thread)."""
        self.dev.use()
        self.stream.use()

    def _module(self, label: str, source: str) -> KernelSet:
        ks = self._modules.get(label)
        if ks is None:
            ks = self._modules[label] = KernelSet(label, source)
        return ks

    def core_kernels(self, name: str) -> KernelSet:
        """A source of `orcd_core.kernels` ("core.cu", "moe.cu"), compiled on first use."""
        ks = self._modules.get(name)
        return ks if ks is not None else self._module(name, ksrc.expand(ksrc.read(name)))

    def format_kernels(self, fmt) -> KernelSet:
        ks = self._by_fmt.get(fmt.ggml_type)
        if ks is None:
            if fmt.cuda_source is None:
                raise NotImplementedError(f"tensor type {fmt.name} has no CUDA kernels (its plugin sets no cuda_source)")
            label = "%s/%s" % tuple(fmt.cuda_source)
            ks = self._modules.get(label) or self._module(label, ksrc.expand(fmt.cuda_source_text()))
            self._by_fmt[fmt.ggml_type] = ks
        return ks

    def step_array(self, shape, dtype=np.float32) -> cupy.ndarray:
        return self._ws_alloc(shape, dtype)

    def contiguous(self, x) -> cupy.ndarray:
        """x as a C-contiguous float32 device array (copying a row-strided view into the workspace)."""
        self.deferred.ready(x)
        if x.dtype != np.float32:
            raise TypeError(f"expected float32 activations, got {x.dtype}")
        if x.flags.c_contiguous:
            return x
        rows = x.shape[0]
        cols = int(np.prod(x.shape[1:]))
        inner = x[0] if x.ndim > 1 else x
        if x.ndim < 2 or x.strides[-1] != 4 or (inner.size > 0 and not inner.flags.c_contiguous):
            raise ValueError(f"unsupported strided activation: shape {x.shape}, strides {x.strides}")
        y = self.step_array(x.shape)
        launch(self.core.fn("copy_rows_f32"), (_blocks(rows * cols, 256),), (256,),
               (x, y, i32(rows), i32(cols), i64(x.strides[0] // 4)))
        return y

    def _rows(self, x) -> tuple[cupy.ndarray, int]:
        """(x, token stride in elements) for an activation whose rows may be a column slice (q|k|v,
        gate|up splits): everything after the first axis must be C-contiguous; else a copy."""
        self.deferred.ready(x)
        if x.dtype != np.float32:
            raise TypeError(f"expected float32 activations, got {x.dtype}")
        shape, strides = x.shape, x.strides
        inner = math.prod(shape[1:])
        if x.flags.c_contiguous:
            return x, inner
        expect = 4
        for n, st in zip(reversed(shape[1:]), reversed(strides[1:])):
            if st != expect and n != 1:
                break
            expect *= n
        else:
            if strides[0] % 4 == 0:
                return x, strides[0] // 4
        x = self.contiguous(x)
        return x, inner

    # ---- loading ---------------------------------------------------------------------------------
    def prepare_load(self, model, *, n_ctx: int, shape, progress=None, n_seq: int = 1) -> None:
        self.make_current()
        plan = plan_load(model.tensors.values(), shape, n_ctx=n_ctx, n_seq=n_seq)
        free, total = cupy.cuda.runtime.memGetInfo()
        if plan.total > free:
            raise InsufficientVram(
                model.path,
                f"not enough VRAM on GPU {self.gpu} ({self.gpu_name}): {plan.total} bytes required "
                f"({plan.describe()}), {free} bytes available of {total}")
        try:
            self.weights.reserve(str(model.path), plan.weights, plan.tensor_bytes, progress)
            scratch = plan.scratch
            self._scratch = view(raw_alloc(scratch), 0, (scratch // 2,), np.float16) if scratch else None
            self.workspace = Workspace(plan.workspace)
            self._ws_alloc = self.workspace.alloc
            self.pool.reserve(plan.prefill_pool)
            self.prefill_graphs.reserve_bytes = plan.prefill_graphs  # taken at the first capture
        except (cupy.cuda.memory.OutOfMemoryError, VramOOM) as exc:
            self.weights.release()
            self.pool.release()
            raise InsufficientVram(model.path, f"VRAM allocation on GPU {self.gpu} failed: {exc}") from None

    @staticmethod
    def kv_bytes_estimate(shape, n_ctx: int) -> int:
        """Bytes of one KV cache of `n_ctx` positions, as `new_kv_cache` allocates it (sliding-window
        layers per `shape.kv_windows` hold a bounded ring): `orcd_core.shape.kv_bytes`."""
        return kv_bytes(shape, n_ctx)

    def upload_weight(self, name: str, parts, fmt) -> Weight:
        self.make_current()
        return self.weights.upload(name, parts, fmt)

    def upload_array(self, name: str, array) -> cupy.ndarray:
        self.make_current()
        return self.weights.upload_array(name, array)

    def finish_load(self) -> None:
        """Wait for the last chunk, drop the staging buffers, check residency, start the timer."""
        self.make_current()
        self.weights.finish()
        self.check_residency()
        if self._check_s > 0 and self._timer is None:
            self._schedule()

    # ---- health ----------------------------------------------------------------------------------
    def check_residency(self) -> bool:
        """Every weight arena is device memory (cudaPointerGetAttributes: type device, no host
        pointer), checked at its first and last byte. A failure marks the device unhealthy."""
        try:
            self.weights.prove_resident(self.dev)
        except Exception as exc:  # any failure to prove residency is a failure
            self._healthy = False
            self.residency_failure = str(exc)
            return False
        return True

    def _schedule(self) -> None:
        def tick():
            if self._closed:
                return
            self.check_residency()
            self._schedule()

        self._timer = threading.Timer(self._check_s, tick)
        self._timer.daemon = True
        self._timer.start()

    @property
    def healthy(self) -> bool:
        return self._healthy

    # ---- memory ----------------------------------------------------------------------------------
    def new_kv_cache(self, n_layers: int, n_ctx: int, n_kv_heads: int, head_dim: int,
                     window: Sequence[int] | None = None) -> KVCache:
        self.make_current()
        windows = list(window) if window is not None else [0] * n_layers
        if len(windows) != n_layers:
            raise ValueError(f"window has {len(windows)} entries for {n_layers} layers")
        rows = [kv_rows(w, n_ctx) for w in windows]
        per_row = n_kv_heads * head_dim * 2
        sizes = [align(r * per_row) for r in rows]
        total = 2 * sum(sizes)
        try:
            base = raw_alloc(total)
        except (cupy.cuda.memory.OutOfMemoryError, cupy.cuda.runtime.CUDARuntimeError) as exc:
            free, _ = cupy.cuda.runtime.memGetInfo()
            raise VramOOM(f"KV cache of {total} bytes ({n_ctx} positions) does not fit: {free} bytes free on "
                          f"GPU {self.gpu}", required=total, available=int(free)) from exc
        k, v, off = [], [], 0
        for r, sz in zip(rows, sizes):
            k.append(view(base, off, (r, n_kv_heads, head_dim), np.float16))
            off += sz
            v.append(view(base, off, (r, n_kv_heads, head_dim), np.float16))
            off += sz
        cache = KVCache(n_layers, n_ctx, n_kv_heads, head_dim, k, v, windows, total)
        self._kv_live[id(cache)] = total
        self._kv_mem[id(cache)] = base
        return cache

    def free_kv_cache(self, cache: KVCache) -> None:
        self._kv_live.pop(id(cache), None)
        mem = self._kv_mem.pop(id(cache), None)
        cache.k, cache.v = [], []
        del mem  # the last reference: cudaFree

    def to_device(self, array, dtype: str = "int32") -> cupy.ndarray:
        """A small host array (ids, positions) as a device array that outlives the step (CuPy's pool:
        callers build a Step's inputs before `begin_step`)."""
        self.make_current()
        if self.stream.is_capturing():
            raise CudaError("to_device inside a captured step (step inputs must be device buffers)")
        host = np.ascontiguousarray(np.asarray(array, dtype=dtype))
        out = cupy.empty(host.shape, host.dtype)
        out.set(host, stream=self.stream)
        return out

    def to_host(self, array) -> np.ndarray:
        self.deferred.ready(array)
        try:
            out = cupy.asnumpy(array, stream=self.stream)
            self.stream.synchronize()
        except cupy.cuda.runtime.CUDARuntimeError as exc:
            raise CudaError(f"GPU {self.gpu}: {exc}") from exc
        return out

    def fence(self) -> Fence:
        """`Device.fence`: an event recorded on the device's stream (its wait releases the GIL)."""
        ev = cupy.cuda.Event(block=False, disable_timing=True, interprocess=False)
        ev.record(self.stream)
        return _EventFence(ev, self.gpu)

    def begin_step(self, *, prefill: bool = False) -> None:
        self.make_current()
        self.workspace.reset()
        self.deferred.reset()
        self._ws_alloc = self.pool.alloc if prefill else self.workspace.alloc

    def prepare_capture(self) -> None:
        """What a capture of GEMMs needs, made outside it: cuBLAS bindings that run during a capture."""
        if self._cublas_capture is None:
            from .cublas_capture import CapturableCublas

            self._cublas_capture = CapturableCublas()

    @contextlib.contextmanager
    def graph_gemms(self):
        """GEMMs through the capture's cuBLAS bindings and workspace, also outside a capture: a prefill
        chunk run op by op then computes exactly what its captured graph computes."""
        self._graph_gemms = True
        try:
            yield
        finally:
            self._graph_gemms = False

    def warm_up(self, forward, cache) -> None:
        """Capture the prefill graphs of every chunk length for caches of `cache`'s layout (prefill.py)."""
        self.make_current()
        self.prefill_graphs.warm_up(forward, cache)

    def use_allocator(self, alloc) -> None:
        """The step's arrays from `alloc(shape, dtype)` until the next `begin_step` (a captured prefill
        chunk's from the graphs' own pool)."""
        self._ws_alloc = alloc

    def prefill_chunk(self, forward, ids, start_pos: int, cache, *, all_logits: bool = False):
        """`Device.prefill_chunk`, replayed as the CUDA graph of the chunk's length bucket where it can
        be (prefill.py), else op by op."""
        self.make_current()
        return self.prefill_graphs.run(self._prefill_eager, forward, ids, int(start_pos), cache, all_logits)

    def _prefill_eager(self, forward, ids, start_pos, cache, *, all_logits=False):
        """`Device.prefill_chunk` op by op, its logits computed before it returns (a deferred output GEMV
        would otherwise run only when read, and not at all once the next step begins)."""
        return self.contiguous(super().prefill_chunk(forward, ids, start_pos, cache, all_logits=all_logits))

    def memory_report(self) -> dict[str, int]:
        return {
            "weights": self.weights.nbytes,
            "kv_cache": sum(self._kv_live.values()),
            "workspace": self.workspace.nbytes + self.pool.nbytes + self.prefill_graphs.nbytes
            + (self._scratch.nbytes if self._scratch is not None else 0)
            + (self.sampler.nbytes if self.sampler is not None else 0)
            + (self._attn_part[0] if self._attn_part is not None else 0)
            + (self._cublas_capture.nbytes if self._cublas_capture is not None else 0),
        }

    def vram_bytes_used(self) -> int:
        return sum(self.memory_report().values())

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        try:
            self.stream.synchronize()
        except Exception:
            pass
        self.weights.release()
        self.prefill_graphs.close()
        self._cublas_capture = None
        self._scratch = None
        self._kv_mem.clear()
        self._kv_live.clear()
        self.workspace = None
        self.pool.release()
        self.sampler = None
        self._sample_state = None
        self._attn_part = None
        if self._cublas:
            cublas.destroy(self._cublas)
            self._cublas = 0

    # ---- ops -------------------------------------------------------------------------------------
    def embedding(self, table: Weight, ids) -> cupy.ndarray:
        t = table.data
        T = int(ids.shape[0])
        if t.cols % 32:
            raise ValueError(f"embedding {table.name}: row length {t.cols} is not a multiple of 32")
        out = self.step_array((T, t.cols))
        ks = self.format_kernels(table.fmt)
        n_items = t.cols // 32
        launch(ks.fn(f"get_rows_{table.fmt.name}"), (_blocks(n_items, 128), T), (128,),
               (t.data, i64(t.row_bytes), ids, out, i32(t.rows), i32(t.cols)))
        return out

    def _gemv_input(self, x, T: int, K: int, tc: bool, staged: bool = True):
        """(mode, x, x row stride, aux, aux row stride, eps, record) of a decode GEMV over the T rows of x:
        a deferred rms_norm (all of T x K staged at once, within the kernel's budget; the tensor-core
        kernel stages the norm weight too) or silu_mul producing x is fused into the GEMV's staging
        instead of being launched (`record`: that deferred op; None for a plain x). `staged` False: the
        consumer is quantize_q8, which takes the norm for any T and K (no staging budget)."""
        d = self.deferred.exact(x, "rms_norm")
        fits = (not staged or (4 * stage_vectors(GEMV_X_RMS, T) * K <= XS_TC_MAX_BYTES if tc else 4 * T * K <= XS_MAX_BYTES))
        if d is not None and fits:
            return GEMV_X_RMS, d.args["x"], K, d.args["weight"], 0, d.args["eps"], d
        d = self.deferred.exact(x, "silu_mul")
        if d is not None:
            return GEMV_X_SILU, d.args["gate"], d.args["gs"], d.args["up"], d.args["us"], 0.0, d
        x, xs = self._rows(x)
        if T > 1 and (xs % 4 or x.data.ptr % 16):  # staged as float4s
            x, xs = self.contiguous(x), K
        return GEMV_X_PLAIN, x, xs, NULL, 0, 0.0, None

    def linear(self, x, w: Weight, bias=None) -> cupy.ndarray:
        t = w.data
        if len(w.shape) != 2:
            raise ValueError(f"linear: weight {w.name!r} has shape {w.shape}; expert stacks go through moe()")
        if x.ndim == 2 and x.shape[0] <= GEMV_MAX_T and x.dtype == np.float32:
            return self._gemv(x, w, bias)
        x = self.contiguous(x)
        T, K = x.shape
        N = t.rows
        _check_linear(w, K, bias)
        y = self.step_array((T, N))
        x16 = self.step_array((T, K), np.float16)
        launch(self.core.fn("f32_to_f16"), (_blocks(T * K, 256),), (256,), (x, x16, i64(T * K)))
        self.dequant_gemm(w, 0, N, K, x16.data.ptr, T, y.data.ptr)
        if bias is not None:
            return self.add(y, bias)
        return y

    def _gemv(self, x, w: Weight, bias) -> cupy.ndarray:
        """The decode linear of T <= GEMV_MAX_T rows (one token, or one per sequence of a batched
        step), deferred: an `add` of a residual absorbs it into the GEMV's epilogue (`add`); any other
        read launches it plain. Its input may be a deferred norm or silu_mul. Each row's result does not
        depend on how many rows share the launch (quant_kernels.cuh), so a sequence decodes the same alone
        or batched. The kernel: gemv_tc_* (tensor cores, all T rows in one launch; its K split from K
        alone), or gemv_/gemv_t4_/gemv_t8_* (R rows per warp): `decode_gemv`, planner.decode_gemv's choice."""
        t = w.data
        T, K, N = int(x.shape[0]), int(x.shape[1]), t.rows
        _check_linear(w, K, bias)
        G = min(T, GEMV_GROUP_ROWS)  # rows per launch (each row's result is the same for any grouping)
        tc = self.decode_gemv == "tc"
        if self.decode_gemv == "q8" and self.has_kernel(w.fmt, "gemv_q8"):
            y = self._gemv_q8(x, w, bias, N, K)
            if y is not None:
                return y
        mode, src, s_src, aux, s_aux, eps, _ = self._gemv_input(x, G, K, tc)
        fmod = self.format_kernels(w.fmt)
        if tc:
            R = gemv_tc_k_split(N, K)  # (the kernels' R argument: rows per warp, or the tensor-core kernel's K split)
            grid, threads = (_blocks(N, 16 * (GEMV_TC_WARPS // R)),), 32 * GEMV_TC_WARPS
        else:
            R = _rows_per_warp(N, K)
            grid, threads = (_blocks(N, GEMV_WARPS * R),), 32 * GEMV_WARPS
        b = bias if bias is not None else NULL
        parts = []
        for g0 in range(0, T, G):
            g = min(G, T - g0)
            kind = "gemv_tc" if tc else "gemv" if g == 1 else "gemv_t4" if g <= 4 else "gemv_t8"
            smem = xs_bytes(stage_vectors(mode, g), K, XS_TC_MAX_BYTES) if tc else xs_bytes(g, K)
            parts.append((g0, g, fmod.fn(f"{kind}_{w.fmt.name}", max_dynamic_smem=smem), smem))

        def run(y, res=NULL):
            for g0, g, fn, smem in parts:
                xg = src[g0:] if g0 else src
                ag = aux[g0:] if g0 and s_aux else aux
                rg = res[g0:] if g0 and res is not NULL else res
                launch(fn, grid, (threads,),
                       (t.data, i64(t.row_bytes), xg, i64(s_src), y[g0:] if g0 else y, b, i32(N), i32(K), i32(g), i32(R),
                        ag, i64(s_aux), rg, f32(eps), i32(mode)),
                       shared_mem=smem, pdl=tc)  # tensor-core GEMVs: weights requested while the kernel ahead
                #            ends (8 rows of qwen2 +11%; the FMA kernels' one row lost 12%: docs/perf-notes.md)

        return self.deferred.defer("gemv", self.step_array((T, N)), run)

    def _gemv_q8(self, x, w: Weight, bias, N: int, K: int):
        """The decode linear of T <= GEMV_MAX_T rows on the int8-activation GEMV (gemv_q8_* for one row,
        gemv_q8_t8_* for more: each row's values as a lone row's; planner.decode_gemv "q8"): x through its
        input op (a deferred rms_norm or silu_mul, else as given) quantized by quantize_q8 into the step's
        workspace, then the GEMV; deferred as _gemv's (a residual add is absorbed into its epilogue). GEMVs
        that read the same deferred op share its quantized rows (q, k and v of one norm): whichever of them
        launches first quantizes; an x written together with its int8 rows (a "q8row" record: the decode
        attention's output) needs no quantize at all. None where the input is not 16-byte aligned (the
        float path takes it)."""
        t = w.data
        T = int(x.shape[0])
        pre = self.deferred.same_memory(x, "q8row")  # x written together with its int8 rows (the attention)
        if pre is not None:
            mode, src, s_src, aux, s_aux, eps = GEMV_X_PLAIN, x, K, NULL, 0, 0.0
            shared = {"xq": pre.args["xq"], "ready": True}
        else:
            mode, src, s_src, aux, s_aux, eps, rec = self._gemv_input(x, T, K, False, staged=False)
            if (src.data.ptr % 16 or (aux is not NULL and aux.data.ptr % 16)
                    or (T > 1 and (s_src % 4 or s_aux % 4))):
                return None
            shared = rec.args.setdefault("q8", {}) if rec is not None else {}
            if "xq" not in shared:
                shared["xq"] = self.step_array((T, q8_row_bytes(K)), np.uint8)
        xq = shared["xq"]
        qgrid, qthreads = _quantize_grid(mode, T, K)
        quantize = self.core.fn("quantize_q8")
        smem = T * q8_row_bytes(K)
        fn = self.format_kernels(w.fmt).fn(f"gemv_q8{'' if T == 1 else '_t8'}_{w.fmt.name}", max_dynamic_smem=smem)
        # one weight row a warp: the cold sweep of qwen2's and phi3's decode GEMVs (H100, profile_step
        # --sweep, R = 1, 2, 4, 8) has R = 1 fastest alone at every shape (phi3's gate|up 16384 x 3072 Q4_K
        # 12.1 us against 14.3 at R = 2, qwen2's 9728 x 896 Q5_0 5.7 against 7.1 at R = 4) and within 10% at
        # 8 rows (docs/perf-notes.md); the kernel's R stays for the sweep. A batched launch's warp takes
        # Q8_T8_ROWS rows together (each token's x read once for them)
        R = 1
        grid = (_blocks(N, Q8_WARPS * R * (1 if T == 1 else Q8_T8_ROWS)),)
        b = bias if bias is not None else NULL

        def run(y, res=NULL):
            if not shared.get("ready"):
                launch(quantize, qgrid, (qthreads,),
                       (src, i64(s_src), aux, i64(s_aux), f32(eps), i32(mode), i32(K), xq), pdl=True)
                shared["ready"] = True
            launch(fn, grid, (32 * Q8_WARPS,), (t.data, i64(t.row_bytes), xq, y, b, i32(N), i32(K), i32(T), i32(R), res),
                   shared_mem=smem, pdl=True)

        return self.deferred.defer("gemv", self.step_array((T, N)), run)

    def quantize_rows(self, x, T: int, K: int, out=None):
        """The T rows of x (contiguous float32 [T, K]) quantized to int8 by quantize_q8 (q8.cuh rows, into
        `out` or the step's workspace; launched by PDL)."""
        if out is None:
            out = self.step_array((T, q8_row_bytes(K)), np.uint8)
        grid, threads = _quantize_grid(GEMV_X_PLAIN, T, K)
        launch(self.core.fn("quantize_q8"), grid, (threads,),
               (x, i64(K), NULL, i64(0), f32(0.0), i32(GEMV_X_PLAIN), i32(K), out), pdl=True)
        return out

    def quantize_norm_rows(self, y):
        """If `y` is a deferred RMS norm of T rows of K (K % 32 == 0, its input and weight 16-byte aligned):
        one quantize_q8_xf launch (RMS mode, one block a row) writes y itself (float32) and its int8 rows, and
        the record is done; returns those rows, else None (y then is as it was). For a consumer that reads
        both, the MoE: its router the floats, its experts the int8 rows (moe.py)."""
        d = self.deferred.exact(y, "rms_norm")
        if d is None or y.ndim != 2:
            return None
        T, K = int(y.shape[0]), int(y.shape[1])
        x, w = d.args["x"], d.args["weight"]
        if K % 32 or x.data.ptr % 16 or w.data.ptr % 16 or not x.flags.c_contiguous or not self.deferred.take(d):
            return None
        self.deferred.ready(x)
        xq = self.step_array((T, q8_row_bytes(K)), np.uint8)
        grid, threads = _quantize_grid(GEMV_X_RMS, T, K)
        launch(self.core.fn("quantize_q8_xf"), grid, (threads,),
               (x, i64(K), w, i64(0), f32(d.args["eps"]), i32(GEMV_X_RMS), i32(K), xq, y), pdl=True)
        return xq

    def has_kernel(self, fmt, kind: str) -> bool:
        """Whether the format's source has the kernel `<kind>_<name>` (an optional one: "gemv_q8", where its
        plugin instantiates ORCD_QUANT_KERNELS_Q8; "moe_gemv_glu_q8", ORCD_MOE_KERNELS_Q8); looked up once."""
        key = (fmt.name, kind)
        has = self._optional_kernels.get(key)
        if has is None:
            try:
                self.format_kernels(fmt).fn(f"{kind}_{fmt.name}")
                has = True
            except (CudaError, NotImplementedError):
                has = False
            self._optional_kernels[key] = has
        return has

    def dequant_gemm(self, w: Weight, row0: int, N: int, K: int, x16_ptr: int, n_tok: int, y_ptr: int) -> None:
        """y[n_tok, N] (row stride N, float32) = x16[n_tok, K] (fp16) @ W[row0 : row0 + N, :K]^T: the rows
        dequantized to fp16 through the device's scratch in chunks, cuBLAS with fp32 accumulation. The
        prefill path of `linear`."""
        scratch = self._scratch
        if scratch is None or scratch.size < K:  # prepare_load sizes it; else the first prefill does
            if self.stream.is_capturing():
                raise RuntimeError("the dequantize scratch cannot grow during a CUDA graph capture")
            nbytes = max(DEQUANT_SCRATCH_BYTES, align(K * 2))
            self._scratch = None
            self._scratch = scratch = view(raw_alloc(nbytes), 0, (nbytes // 2,), np.float16)
            self._scratch_epoch += 1
        chunk = max(1, min(N, scratch.size // K))
        dq = self.format_kernels(w.fmt).fn(f"dequant_f16_{w.fmt.name}")
        if self._graph_gemms or self.stream.is_capturing():  # CuPy's refuse to run in a capture (cublas_capture.py)
            if self._cublas_capture is None:
                raise RuntimeError("cuBLAS capture bindings not prepared before the capture")
            gemm = self._cublas_capture.gemm_ex
            self._cublas_capture.bind(self._cublas, self.stream.ptr)
        else:
            gemm = cublas.gemmEx
            cublas.setStream(self._cublas, self.stream.ptr)
            cublas.setPointerMode(self._cublas, cublas.CUBLAS_POINTER_MODE_HOST)
        for r0 in range(0, N, chunk):
            n = min(chunk, N - r0)
            launch(dq, (_blocks(n * (K // 32), 128),), (128,),
                   (w.data.data, i64(w.data.row_bytes), scratch, i32(row0 + r0), i32(n), i32(K)))
            # column-major view: C[n, n_tok] (= y row-major [n_tok, N] at column r0) = W^T[K, n]^T X[K, n_tok]
            # (fp16 A and B: CUDA_R_16F = 2; fp32 C: CUDA_R_32F = 0; CUBLAS_COMPUTE_32F = 68; default algorithm)
            gemm(self._cublas, cublas.CUBLAS_OP_T, cublas.CUBLAS_OP_N, n, n_tok, K,
                 self._one_ptr, scratch.data.ptr, 2, K, x16_ptr, 2, K,
                 self._zero_ptr, y_ptr + 4 * r0, 0, N, 68, -1)

    def rms_norm(self, x, weight, eps: float) -> cupy.ndarray:
        x = self.contiguous(x)
        D = x.shape[-1]
        rows = x.size // D
        y = self.step_array(x.shape)

        if rows <= GEMV_MAX_T and D % 4 == 0:
            # decode rows: a GEMV consuming it stages the norm itself (fusion.py); else rms_norm_rows,
            # the same arithmetic at the GEMV's block size
            def run(out):
                launch(self.core.fn("rms_norm_rows"), (rows,), (32 * GEMV_WARPS,), (x, weight, out, i32(D), f32(eps)))

            return self.deferred.defer("rms_norm", y, run, x=x, weight=weight, eps=float(eps))
        launch(self.core.fn("rms_norm_f32"), (rows,), (_norm_threads(D),), (x, weight, y, i32(D), f32(eps)))
        return y

    def layer_norm(self, x, weight, bias, eps: float) -> cupy.ndarray:
        x = self.contiguous(x)
        D = x.shape[-1]
        rows = x.size // D
        y = self.step_array(x.shape)
        launch(self.core.fn("layer_norm_f32"), (rows,), (_norm_threads(D),),
               (x, weight if weight is not None else NULL, bias if bias is not None else NULL, y, i32(D), f32(eps)))
        return y

    def rope(self, x, positions, spec: RopeSpec) -> cupy.ndarray:
        """One token: deferred, `attention` ropes q and k while it writes the KV cache (rope_kv_write)."""
        x, xs = self._rows(x)
        T, H, hd = x.shape
        if spec.n_rot > hd or spec.n_rot % 2 or hd % 2:
            raise ValueError(f"rope: n_rot {spec.n_rot} for head dim {hd}")
        rargs = self._rope_args(spec)
        fn = self.core.fn("rope_f32")

        def run(y):
            launch(fn, (_blocks(T * H * (hd // 2), 128),), (128,), (x, i64(xs), y, positions, *rargs[:1], i32(T), i32(H),
                                                                    i32(hd), *rargs[1:]))

        y = self.step_array(x.shape)
        if T > GEMV_MAX_T:  # a prefill step: every deferred output would stay held until the step ends
            run(y)
            return y
        return self.deferred.defer("rope", y, run, x=x, stride=xs, positions=positions, rargs=rargs)

    def _rope_args(self, spec: RopeSpec) -> tuple:
        """(freq_factors, n_rot, neox, theta_scale, freq_scale, ext_factor, attn_factor, corr0, corr1) as
        rope_f32 and rope_kv_write take them."""
        theta_scale = float(np.power(np.float32(spec.base), np.float32(-2.0) / np.float32(spec.n_rot), dtype=np.float32))
        c0 = c1 = 0.0
        if spec.ext_factor != 0.0:
            from ...rope import yarn_corr_dims

            c0, c1 = yarn_corr_dims(spec.n_rot, spec.n_ctx_orig, spec.base, spec.beta_fast, spec.beta_slow)
        ff = spec.freq_factors if spec.freq_factors is not None else NULL
        return (ff, i32(spec.n_rot), i32(1 if spec.neox else 0), f32(theta_scale), f32(spec.freq_scale),
                f32(spec.ext_factor), f32(spec.attn_factor), f32(c0), f32(c1))

    def attention(self, q, k, v, cache: KVCache | KVBatch, layer: int, step: Step, *, scale: float,
                  sinks=None, window: int = 0) -> cupy.ndarray:
        dq, dk = self.deferred.exact(q, "rope"), self.deferred.exact(k, "rope")
        fused = (dq is not None and dk is not None and dq.args["positions"] is dk.args["positions"]
                 and dq.args["rargs"][0] is dk.args["rargs"][0] and dq.args["rargs"][1:] == dk.args["rargs"][1:])
        if fused:  # q and k roped here, k and v written to the cache in the same launch
            q, k = dq.out, dk.out  # (for their shapes only: neither is written)
            ks = dk.args["stride"]
            v, vs = self._rows(v)
        else:
            q = self.contiguous(q)
            (k, ks), (v, vs) = self._rows(k), self._rows(v)
        T, Hq, hd = q.shape
        Hkv = k.shape[1]
        if Hq % Hkv or k.shape != (T, Hkv, hd) or v.shape != (T, Hkv, hd):
            raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape}")
        if hd > AP_MAXD or hd % 8:
            raise NotImplementedError(f"attention: head dim {hd} (supported: multiples of 8 up to {AP_MAXD})")
        tabled = isinstance(cache, KVBatch)  # caches through the table: captured steps serve any sequence
        # a batched decode step (row t: one token of the sequence whose cache is caches[t]), or a captured
        # prefill chunk of one sequence (one cache, one table column, T tokens: backends/cuda/prefill.py)
        one_seq = tabled and len(cache.caches) == 1 and T > 1
        if tabled:
            kvs = int(cache.table.shape[2])
            if (len(cache.caches) != T and not one_seq) or (one_seq and kvs != 1):
                raise ValueError(f"attention: {T} rows for {len(cache.caches)} caches in a table of {kvs} columns")
            proto = cache.caches[0]
            kc = vc = NULL
            n_rows = int(proto.k[layer].shape[0])
            kvp = np.uint64(cache.table.data.ptr + layer * 2 * kvs * 8)  # the layer's [2, columns] addresses
            per_seq = T if one_seq else 1
        else:
            kc, vc = cache.k[layer], cache.v[layer]
            n_rows, kvp, kvs, per_seq = int(kc.shape[0]), NULL, 0, T
        if n_rows < cache.n_ctx and (window <= 0 or per_seq + window - 1 > n_rows):
            # a ring: this step's keys are written before its queries read, so the ring must hold the
            # window's past keys and the step's own
            raise ValueError(f"attention: layer {layer} keeps {n_rows} positions; a step of {per_seq} tokens with "
                             f"window {window} needs {per_seq + max(window, 1) - 1}")
        decode = T == 1 or (tabled and not one_seq)
        # a decode step's attention ropes q and its own key itself and writes k and v to the cache (one
        # launch a layer fewer); a prefill's through rope_kv_write first
        rope_here = fused and decode and dq.args["positions"] is step.positions
        if fused and not rope_here:
            q = self.step_array((T, Hq, hd))
            launch(self.core.fn("rope_kv_write"), (_blocks(T * (Hq + 2 * Hkv) * (hd // 2), 128),), (128,),
                   (dq.args["x"], i64(dq.args["stride"]), dk.args["x"], i64(ks), v, i64(vs), q, kc, vc, kvp, i32(kvs),
                    dq.args["positions"], dq.args["rargs"][0], i32(T), i32(Hq), i32(Hkv), i32(hd), i32(n_rows),
                    *dq.args["rargs"][1:]), pdl=True)
        elif not fused:
            launch(self.core.fn("kv_write"), (_blocks(T * Hkv * hd, 256),), (256,),
                   (k, i64(ks), v, i64(vs), kc, vc, kvp, i32(kvs), step.positions, i32(T), i32(Hkv), i32(hd), i32(n_rows)))
        out = self.step_array((T, Hq, hd))
        sk = sinks if sinks is not None else NULL
        if decode:
            # a query sees at most `span` keys (the window's, or the context's); a launch whose rows'
            # positions are bounded (a KVBatch's `span`: the batched decode graphs, captured per bound)
            # sizes its splits for that bound; splits past a row's own keys exit at once
            span = min(window, cache.n_ctx) if window > 0 else cache.n_ctx
            S_room = decode_grid_splits(span)
            if S_room > AD_MAX_SPLITS:
                raise NotImplementedError(f"attention: a context of {span} positions needs {S_room} splits "
                                          f"(at most {AD_MAX_SPLITS}: {AD_CHUNK * AD_MAX_SPLITS} positions)")
            S = decode_grid_splits(min(span, cache.span)) if tabled and cache.span > 0 else S_room
            if T * Hq > MAX_HEADS:
                raise NotImplementedError(f"attention: {T} rows of {Hq} query heads (at most {MAX_HEADS} in all)")
            part_o, part_ml = self._attn_partials(T, Hq * S, hd, room=Hq * S_room)
            # decode rows on the int8 GEMVs: the output quantized by the attention itself for the o
            # projection (a "q8row" record: _gemv_q8 takes it instead of launching quantize_q8)
            xq = (self.step_array((T, q8_row_bytes(Hq * hd)), np.uint8)
                  if self.decode_gemv == "q8" and hd % 32 == 0 else NULL)
            if rope_here:  # q, k and v as the GEMVs wrote them, and the rope's arguments
                qx, qs = dq.args["x"], dq.args["stride"]
                rope = (dk.args["x"], i64(ks), v, i64(vs), *dq.args["rargs"])
            else:
                qx, qs = q, Hq * hd
                rope = (NULL, i64(0), NULL, i64(0), NULL, i32(0), i32(0), f32(0), f32(0), f32(0), f32(0), f32(0), f32(0))
            launch(self.core.fn("attn_decode_part"), (Hq, S, T), (128,),
                   (qx, i64(qs), kc, vc, kvp, i32(kvs), step.positions, part_o, part_ml, i32(Hq), i32(Hkv), i32(hd),
                    i32(n_rows), f32(scale), i32(window), self._attn_counters, sk, out, xq, *rope),
                   pdl=Hq * S * T <= ATTN_PDL_MAX_BLOCKS)
            if xq is not NULL:
                self.deferred.defer("q8row", out, lambda _: None, xq=xq)
        elif prefill_attention_tc(int(self.sm), hd):
            smem = prefill_attention_tc_smem(hd)
            launch(self.core.fn(f"attn_prefill_tc_{hd}", max_dynamic_smem=smem), (_blocks(T, AP_TC_QT), Hq), (128,),
                   (q, kc, vc, kvp, i32(kvs), step.positions, sk, out, i32(T), i32(Hq), i32(Hkv), i32(n_rows),
                    f32(scale), i32(window)), shared_mem=smem)
        else:
            launch(self.core.fn("attn_prefill"), (_blocks(T, 16), Hq), (128,),
                   (q, kc, vc, kvp, i32(kvs), step.positions, sk, out, i32(T), i32(Hq), i32(Hkv), i32(hd), i32(n_rows),
                    f32(scale), i32(window)))
        return out

    def _attn_partials(self, T: int, per_row: int, hd: int, room: int = 0) -> tuple[cupy.ndarray, cupy.ndarray]:
        """The decode attention's split partials of T rows of `per_row` (head, split) pairs: output
        [n, hd], max and sum [n, 2]. One buffer for every layer (their attentions run one after the
        other on the stream) at a fixed address for the captured graphs: sized for GEMV_MAX_T rows of
        max(per_row, room) pairs at the first need (`room`: what the context's longest span takes, so
        that launches bounded to shorter spans fit in it too); grown (outside a capture; the graphs are
        then recaptured) only if a later step needs more."""
        def nbytes(n):
            return align(n * hd * 4) + n * 2 * 4

        n = T * per_row
        if self._attn_part is None or self._attn_part[0] < nbytes(n):
            if self.stream.is_capturing():
                raise RuntimeError("the attention partials cannot grow during a CUDA graph capture")
            size = nbytes(max(n, GEMV_MAX_T * max(per_row, room)))
            self._attn_part = None  # (free first)
            self._attn_part = (size, raw_alloc(size))
            self._attn_epoch += 1
        mem = self._attn_part[1]
        return view(mem, 0, (n, hd), np.float32), view(mem, align(n * hd * 4), (n, 2), np.float32)

    @property
    def prefill_epoch(self) -> int:
        """Changes whenever a buffer that captured prefill chunks point into is replaced."""
        return self._scratch_epoch

    @property
    def graph_epoch(self) -> int:
        """Changes whenever a buffer that captured decode graphs point into is replaced."""
        return self.workspace.epoch * 1_000_003 + self._attn_epoch

    def _eltwise(self, name: str, *arrays) -> cupy.ndarray:
        arrays = [self.contiguous(a) for a in arrays]
        n = arrays[0].size
        if any(a.shape != arrays[0].shape for a in arrays):
            raise ValueError(f"{name}: shapes {[a.shape for a in arrays]}")
        y = self.step_array(arrays[0].shape)
        launch(self.core.fn(name), (_blocks(n, 256),), (256,), (*arrays, y, i64(n)))
        return y

    def add(self, a, b) -> cupy.ndarray:
        for g, r in ((b, a), (a, b)):  # a deferred one-token GEMV takes the other operand as its residual
            d = self.deferred.exact(g, "gemv")
            if d is not None and r.shape == g.shape and self.deferred.exact(r, "gemv") is None:
                r = self.contiguous(r)
                y = self.step_array(g.shape)
                d.launch(y, r)
                return y
        a, b = self.contiguous(a), self.contiguous(b)
        if b.shape != a.shape and not (b.ndim == 1 and b.shape[0] == a.shape[-1]):
            raise ValueError(f"add: shapes {a.shape} and {b.shape}")
        y = self.step_array(a.shape)
        launch(self.core.fn("add_f32"), (_blocks(a.size, 256),), (256,), (a, b, y, i64(a.size), i64(b.size)))
        return y

    def silu_mul(self, gate, up) -> cupy.ndarray:
        (g, gs), (u, us) = self._rows(gate), self._rows(up)
        if g.shape != u.shape:
            raise ValueError(f"silu_mul: shapes {g.shape} and {u.shape}")
        rows = g.shape[0] if g.ndim > 1 else 1
        cols = g.size // rows
        y = self.step_array(g.shape)

        def run(out):
            launch(self.core.fn("silu_mul_f32"), (_blocks(g.size, 256),), (256,),
                   (g, i64(gs if g.ndim > 1 else cols), u, i64(us if u.ndim > 1 else cols), out, i32(rows), i32(cols)))

        if rows <= GEMV_MAX_T and cols % 4 == 0:  # decode rows: the down GEMV stages silu(g) * u itself
            return self.deferred.defer("silu_mul", y, run, gate=g, up=u, gs=gs if g.ndim > 1 else cols,
                                       us=us if u.ndim > 1 else cols)
        run(y)
        return y

    def gelu(self, x) -> cupy.ndarray:
        return self._eltwise("gelu_f32", x)

    def moe(self, x, router, router_bias, gate_up, gate_up_bias, down, down_bias, *, top_k, act,
            alpha=1.702, limit=7.0):
        from .moe import moe  # backends/cuda/moe.py: routing on the GPU, expert GEMVs / grouped GEMMs

        return moe(self, x, router, router_bias, gate_up, gate_up_bias, down, down_bias, top_k=top_k, act=act,
                   alpha=alpha, limit=limit)

    def logits_last(self, x) -> cupy.ndarray:
        return x[-1]

    def sampler_for(self, V: int):
        """The sampler's scratch for MAX_BATCH rows of this vocabulary (made once: graphs hold it)."""
        from .sampler import Sampler

        if self.sampler is None or self.sampler.V != V:
            self.sampler = Sampler(self, V, MAX_BATCH)
        return self.sampler

    def sample(self, logits, params, recent_ids, step_index) -> cupy.ndarray:
        """One row (a prefill's last logits): the batched sampler on a one-row state written from
        the host (never inside a captured step)."""
        from .sampler import RowState

        logits = self.contiguous(logits).reshape(1, -1)
        recent = [] if recent_ids is None else [int(i) for i in self.to_host(recent_ids).reshape(-1) if i >= 0]
        step = int(self.to_host(step_index).reshape(-1)[0])
        if self._sample_state is None:
            self._sample_state = RowState(1)
        self._sample_state.fill([(0, 0, step, params, recent)], self.stream)
        return self.sampler_for(int(logits.shape[1])).sample_rows(logits, self._sample_state,
                                                                   greedy=plain_greedy(params))

    # ---- decode loop ------------------------------------------------------------------------------
    def batch_decoder(self, forward, *, max_rows: int):
        from .graph import GraphBatchDecoder

        return GraphBatchDecoder(self, forward, max_rows=max_rows)


def _quantize_grid(mode: int, T: int, K: int) -> tuple[tuple[int, int], int]:
    """(grid, threads) of quantize_q8 over T rows of K: the RMS mode one block a row (the norm's sum over
    all of K, up to 1,024 threads), the others Q8_QUANT_THREADS threads a block, as many as cover K."""
    if mode == GEMV_X_RMS:
        return (1, T), min(1024, -(-K // 128) * 32)
    return (_blocks(K // 4, Q8_QUANT_THREADS), T), Q8_QUANT_THREADS


def _check_linear(w: Weight, K: int, bias) -> None:
    """x's width against the weight's, the GEMV's 32-element items, the bias's shape."""
    t = w.data
    if K != t.cols:
        raise ValueError(f"linear {w.name}: x has {K} columns, the weight {t.cols}")
    if K % 32:
        raise NotImplementedError(f"linear {w.name}: row length {K} is not a multiple of 32")
    if bias is not None and bias.shape != (t.rows,):
        raise ValueError(f"linear {w.name}: bias shape {bias.shape}, expected ({t.rows},)")


def _rows_per_warp(N: int, K: int) -> int:
    """The GEMV's R: short rows (< 64 items of 32 weights) of a tall matrix share a warp, which gives
    each lane several independent items in flight (measured: docs/perf-notes.md)."""
    return 1 if K // 32 >= 64 or N < 4096 else GEMV_MAX_R



def _norm_threads(D: int) -> int:
    return 1024 if D >= 4096 else 512 if D >= 1024 else 256
