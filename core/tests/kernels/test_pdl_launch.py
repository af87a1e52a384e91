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


def _pdl_launched_kernels() -> set[str]:
    """Names of the kernels the CUDA backend launches with `pdl=True` by a literal name (`*.fn("name")`)."""
    import ast
    from pathlib import Path

    import orcd_core.backends.cuda as pkg

    names = set()
    for path in Path(pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "launch"):
                continue
            pdl = [k.value for k in node.keywords if k.arg == "pdl"]
            if not pdl or (isinstance(pdl[0], ast.Constant) and not pdl[0].value):
                continue
            f = node.args[0] if node.args else None
            if (isinstance(f, ast.Call) and getattr(f.func, "attr", "") == "fn" and f.args
                    and isinstance(f.args[0], ast.Constant) and isinstance(f.args[0].value, str)):
                names.add(f.args[0].value)
    return names


def _kernel_body(source: str, name: str, kind: str = "__global__") -> str | None:
    """The body of the `kind` ("__global__", or "__device__" for a device function) function `name`."""
    import re

    m = re.search(kind + r'\s+(?:__forceinline__\s+)?void\s+(?:__launch_bounds__\([^)]*\)\s*)?' + re.escape(name)
                  + r'\s*\(', source)
    if m is None:
        return None
    depth, i = 0, m.end() - 1
    while True:  # the parameter list
        depth += {"(": 1, ")": -1}.get(source[i], 0)
        if depth == 0:
            break
        i += 1
    start = source.index("{", i)
    depth, j = 0, start
    while True:
        depth += {"{": 1, "}": -1}.get(source[j], 0)
        if depth == 0:
            return source[start + 1:j]
        j += 1


def _code(source: str) -> str:
    """The source without its comments (a comment that names pdl_wait() or a return is not code)."""
    import re

    return re.sub(r"//[^\n]*|/\*.*?\*/", "", source, flags=re.S)


def test_every_kernel_launched_by_pdl_waits_before_it_can_return():
    """A kernel launched by PDL that could end before its pdl_wait() would break the chain: the kernel
    behind it waits for its end only, so it could read what the kernel ahead had not written yet (a
    greedy row's sample_exp returns at once, and advance_rows reads the argmax two launches back). So
    each one's body, comments left out, calls pdl_wait() before its first `return` (checked on the
    sources, for the kernels launched by a literal name, or for the device function a kernel's body
    begins by calling, as quantize_q8 and quantize_q8_xf call quantize_q8_rows; the GEMVs' and MoE
    kernels' names are built, so they are not covered here)."""
    from pathlib import Path

    import orcd_core.kernels as kdir

    source = "\n".join(p.read_text() for p in sorted(Path(kdir.__file__).parent.glob("*.cu*")))
    names = _pdl_launched_kernels()
    assert {"sample_prep", "argmax_final", "sample_select", "advance_rows"} <= names  # the parse finds them
    checked = 0
    for name in sorted(names):
        body = _kernel_body(source, name)
        if body is None:  # (a template's instance, named at its macro: not this check's)
            continue
        checked += 1
        body = _code(body)
        if "pdl_wait()" not in body:  # a wrapper of one device function (a template's instance): its body
            import re

            call = re.match(r"\s*(\w+)\s*(?:<[^>]*>)?\s*\(", body)
            inner = call and _kernel_body(source, call.group(1), "__device__")
            if inner is not None:
                body = _code(inner)
        wait = body.find("pdl_wait()")
        ret = body.find("return")
        assert wait >= 0, f"{name}: launched by PDL, never calls pdl_wait()"
        assert ret < 0 or wait < ret, f"{name}: may return before pdl_wait()"
    assert checked >= 8
