"""The programmatic-dependent-launch path (kernels.py `launch(..., pdl=True)`) without a GPU: its
ctypes structures have cuda.h's layout (CUlaunchConfig 56 bytes with the stream at 32, the attributes
at 40 and their count at 48; CUlaunchAttribute 72 bytes with its value at 8: read from CUDA 13.0's
cuda.h with gcc's sizeof/offsetof), and kernel arguments become the C values CuPy's own launch passes.
The launch itself runs on the GPU only (tensor-core decode GEMVs; docs/perf-notes.md); this module imports without
CuPy."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from orcd_core.backends.cuda import pdl as K


def test_the_launch_structures_have_cuda_h_layout():
    assert ctypes.sizeof(K.LaunchConfig) == 56
    assert K.LaunchConfig.stream.offset == 32 and K.LaunchConfig.attrs.offset == 40
    assert K.LaunchConfig.n_attrs.offset == 48 and K.LaunchConfig.shared_mem.offset == 24
    assert ctypes.sizeof(K.LaunchAttribute) == 72 and K.LaunchAttribute.value.offset == 8


def test_kernel_arguments_keep_their_c_types():
    vals = [K.kernel_arg(a) for a in (np.int32(-3), np.int64(1 << 40), np.float32(0.5), np.uint64(0))]
    assert [type(v) for v in vals] == [ctypes.c_int32, ctypes.c_int64, ctypes.c_float, ctypes.c_uint64]
    assert [v.value for v in vals] == [-3, 1 << 40, 0.5, 0]
    for bad in (3, 0.5, np.float64(1.0)):  # a Python number's C type is not known; no double parameters
        with pytest.raises(TypeError):
            K.kernel_arg(bad)

    class DeviceArray:  # what the launch reads of a CuPy array: its address
        class data:
            ptr = 0x7F0000001000

    arg = K.kernel_arg(DeviceArray())
    assert type(arg) is ctypes.c_void_p and arg.value == 0x7F0000001000
