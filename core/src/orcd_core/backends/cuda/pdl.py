"""Programmatic dependent launch: `cuLaunchKernelEx` with programmatic stream serialization, through
ctypes (CuPy's kernel launch takes no launch attributes). A kernel so launched may start while the
kernel ahead of it on the stream ends; its source calls `pdl_wait()` (common.cuh) before it reads what
an earlier kernel wrote. `kernels.launch(..., pdl=True)` uses it where `kernels.pdl_enabled()`.

This module imports without CuPy (its structures and argument packing are checked on the CPU:
core/tests/kernels/test_pdl_launch.py); libcuda is loaded at the first launch.
"""

from __future__ import annotations

import ctypes

import numpy as np

LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # cuda.h CUlaunchAttributeID

STATE: dict[str, object] = {}  # "on": kernels.pdl_enabled()'s answer; "lib", "attr": set at the first launch


class LaunchAttribute(ctypes.Structure):
    """cuda.h CUlaunchAttribute: the id, padding to 8 bytes, a 64-byte value union (72 bytes)."""
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_char * 64)]


class LaunchConfig(ctypes.Structure):
    """cuda.h CUlaunchConfig (56 bytes: the stream at 32, the attributes at 40, their count at 48)."""
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(LaunchAttribute)), ("n_attrs", ctypes.c_uint)]


_ARG_TYPES = {np.dtype(np.int32): ctypes.c_int32, np.dtype(np.int64): ctypes.c_int64,
              np.dtype(np.uint32): ctypes.c_uint32, np.dtype(np.uint64): ctypes.c_uint64,
              np.dtype(np.float32): ctypes.c_float}


def kernel_arg(a):
    """One kernel argument as the ctypes value the kernel's parameter holds: a device array's address
    (anything with `.data.ptr`, as a CuPy array), or a NumPy scalar of its C type (as CuPy's own launch
    takes them)."""
    ptr = getattr(getattr(a, "data", None), "ptr", None)
    if ptr is not None and not isinstance(a, np.generic):
        return ctypes.c_void_p(int(ptr))
    t = _ARG_TYPES.get(getattr(a, "dtype", None))
    if t is None or not isinstance(a, np.generic):
        raise TypeError(f"kernel argument {a!r}: a device array or a NumPy scalar of int32, int64, uint32, "
                        "uint64 or float32")
    return t(a.item())


def _lib():
    if "lib" not in STATE:
        lib = ctypes.CDLL("libcuda.so.1")
        lib.cuLaunchKernelEx.argtypes = [ctypes.POINTER(LaunchConfig), ctypes.c_void_p,
                                         ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p)]
        lib.cuLaunchKernelEx.restype = ctypes.c_int
        attr = LaunchAttribute(id=LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION)
        attr.value = (1).to_bytes(4, "little") + bytes(60)  # programmaticStreamSerializationAllowed = 1
        STATE.update(lib=lib, attr=attr)
    return STATE["lib"]


def launch(function_ptr: int, grid: tuple, block: tuple, args: tuple, shared_mem: int, stream_ptr: int) -> int:
    """cuLaunchKernelEx of the CUfunction at `function_ptr` on the stream at `stream_ptr`, programmatic
    stream serialization allowed; returns the CUresult (0: launched)."""
    lib = _lib()
    vals = [kernel_arg(a) for a in args]
    params = (ctypes.c_void_p * len(vals))(*[ctypes.addressof(v) for v in vals])
    g = tuple(grid) + (1,) * (3 - len(grid))
    cfg = LaunchConfig((ctypes.c_uint * 3)(*g), (ctypes.c_uint * 3)(block[0], 1, 1), int(shared_mem),
                       ctypes.c_void_p(stream_ptr), ctypes.pointer(STATE["attr"]), 1)
    return int(lib.cuLaunchKernelEx(ctypes.byref(cfg), ctypes.c_void_p(int(function_ptr)), params, None))
