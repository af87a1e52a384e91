"""cuBLAS calls a CUDA graph capture can record.

cuBLAS supports stream capture, but CuPy's bindings refuse every cuBLAS call while a stream captures
("calling cuBLAS API during stream capture is currently unsupported"). A captured prefill chunk
(prefill.py) therefore calls the same library through ctypes: the libcublas that CuPy loaded, found
among the process's mapped files, so the handle CuPy created is one of its own. Outside a capture the
device keeps CuPy's bindings.

While capturing, cuBLAS gets a workspace of ours (cublasSetWorkspace, after each cublasSetStream, which
resets it): the captured GEMM kernels then point into memory that lives as long as the device, and
cuBLAS allocates nothing during the capture.
"""

from __future__ import annotations

import ctypes

from ...generation import CudaError
from .memory import raw_alloc

WORKSPACE_BYTES = 32 << 20  # cuBLAS's recommended workspace on Hopper
POINTER_MODE_HOST = 0
_P, _I, _L = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong


def _loaded_library(stem: str) -> str:
    """The path of the shared library `stem` (e.g. "libcublas.so") mapped into this process."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.rsplit(None, 1)[-1] if "/" in line else ""
            name = path.rsplit("/", 1)[-1]
            if name == stem or name.startswith(stem + "."):
                return path
    raise CudaError(f"{stem} is not loaded in this process (CuPy's cuBLAS module loads it)")


class CapturableCublas:
    def __init__(self):
        from cupy_backends.cuda.libs import cublas  # noqa: F401 (loads libcublas into the process)

        lib = ctypes.CDLL(_loaded_library("libcublas.so"))
        self._set_stream = lib.cublasSetStream_v2
        self._set_stream.argtypes = [_P, _P]
        self._set_workspace = lib.cublasSetWorkspace_v2
        self._set_workspace.argtypes = [_P, _P, ctypes.c_size_t]
        self._set_pointer_mode = lib.cublasSetPointerMode_v2
        self._set_pointer_mode.argtypes = [_P, _I]
        self._gemm_ex = lib.cublasGemmEx
        self._gemm_ex.argtypes = [_P, _I, _I, _I, _I, _I, _P, _P, _I, _I, _P, _I, _I, _P, _P, _I, _I, _I, _I]
        self._gemm_sb = lib.cublasGemmStridedBatchedEx
        self._gemm_sb.argtypes = [_P, _I, _I, _I, _I, _I, _P, _P, _I, _I, _L, _P, _I, _I, _L, _P, _P, _I, _I, _L, _I,
                                  _I, _I]
        self._workspace = raw_alloc(WORKSPACE_BYTES)

    @property
    def nbytes(self) -> int:
        return WORKSPACE_BYTES

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise CudaError(f"{what} failed (cublasStatus_t {status})")

    def bind(self, handle: int, stream_ptr: int) -> None:
        """The handle on the capturing stream, with our workspace, scalars read from host memory."""
        h = _P(handle)
        self._check(self._set_stream(h, _P(stream_ptr)), "cublasSetStream")
        self._check(self._set_workspace(h, _P(self._workspace.ptr), WORKSPACE_BYTES), "cublasSetWorkspace")
        self._check(self._set_pointer_mode(h, POINTER_MODE_HOST), "cublasSetPointerMode")

    def gemm_ex(self, handle: int, transa: int, transb: int, m: int, n: int, k: int, alpha: int, a: int,
                a_type: int, lda: int, b: int, b_type: int, ldb: int, beta: int, c: int, c_type: int, ldc: int,
                compute_type: int, algo: int) -> None:
        """cublasGemmEx, arguments as CuPy's `cublas.gemmEx` takes them (pointers as ints)."""
        self._check(self._gemm_ex(_P(handle), transa, transb, m, n, k, _P(alpha), _P(a), a_type, lda, _P(b), b_type,
                                  ldb, _P(beta), _P(c), c_type, ldc, compute_type, algo), "cublasGemmEx")

    def gemm_strided_batched_ex(self, handle: int, transa: int, transb: int, m: int, n: int, k: int, alpha: int,
                                a: int, a_type: int, lda: int, stride_a: int, b: int, b_type: int, ldb: int,
                                stride_b: int, beta: int, c: int, c_type: int, ldc: int, stride_c: int, batch: int,
                                compute_type: int, algo: int) -> None:
        """cublasGemmStridedBatchedEx (pointers as ints, strides in elements): `batch` GEMMs of one
        shape, operand i at a + i stride_a and so on (the grouped MoE prefill's experts), through these
        bindings in and out of a capture (after `bind`)."""
        self._check(self._gemm_sb(_P(handle), transa, transb, m, n, k, _P(alpha), _P(a), a_type, lda, stride_a, _P(b),
                                  b_type, ldb, stride_b, _P(beta), _P(c), c_type, ldc, stride_c, batch, compute_type,
                                  algo), "cublasGemmStridedBatchedEx")

