"""Every CUDA source of the core and of the installed quant plugins compiles, without a GPU.

Runs in CI: with `nvcc` when it is on PATH (a cubin for sm_90),
else with NVRTC loaded from the CUDA wheels (`nvidia-cuda-nvrtc`) through ctypes. Skipped only when
neither compiler exists on the machine. Sources are include-expanded exactly as the CUDA backend
feeds them to NVRTC, so what compiles here is what runs there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import shutil
import subprocess
import sys

import pytest

from orcd_core import kernels as ksrc
from orcd_core.kernels.constants import define_options
from orcd_core.plugins import default_registry

ARCHS = ("sm_90",)


def _registry_formats():
    return list(default_registry().quant_formats.values())


def _all_sources() -> dict[str, str]:
    out = dict(ksrc.core_sources())
    for fmt in _registry_formats():
        if fmt.cuda_source is not None:
            out.setdefault("%s/%s" % tuple(fmt.cuda_source), ksrc.expand(fmt.cuda_source_text()))
    return out


def _load_nvrtc():
    names = []
    for base in sys.path:
        names += glob.glob(os.path.join(base, "nvidia", "cu*", "lib", "libnvrtc.so*"))
        names += glob.glob(os.path.join(base, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*"))
    found = ctypes.util.find_library("nvrtc")
    if found:
        names.append(found)
    for n in names:
        try:
            return ctypes.CDLL(n)
        except OSError:
            continue
    return None


def _compile_nvrtc(lib, name: str, source: str, arch: str, defines=define_options()) -> tuple[bool, str]:
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None)
    assert rc == 0, f"nvrtcCreateProgram: {rc}"
    opts = [b"-std=c++17", f"--gpu-architecture={arch}".encode(), *(d.encode() for d in defines)]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc == 0, log.value.decode(errors="replace")


def test_every_format_of_the_cuda_plugins_names_a_source():
    """The built-in quant formats and the core's floats all ship CUDA kernels."""
    names = {f.name for f in _registry_formats() if f.cuda_source is not None}
    expected = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "MXFP4"}
    assert expected <= names, f"formats without cuda_source: {sorted(expected - names)}"


def _compile(label: str, source: str, arch: str, tmp_path, defines=define_options()) -> tuple[bool, str]:
    """(compiled, log) with nvcc when on PATH, else NVRTC; skips when neither exists."""
    nvcc = shutil.which("nvcc")
    if nvcc:
        src = tmp_path / (label.replace("/", "_"))
        src.write_text(source)
        r = subprocess.run([nvcc, "-std=c++17", f"-arch={arch}", "--cubin", "-Werror", "all-warnings", *defines,
                            "-o", str(tmp_path / "out.cubin"), str(src)], capture_output=True, text=True)
        return r.returncode == 0, r.stderr
    lib = _load_nvrtc()
    if lib is None:
        pytest.skip("neither nvcc nor NVRTC (nvidia-cuda-nvrtc) is installed")
    return _compile_nvrtc(lib, label, source, arch, defines)


@pytest.mark.parametrize("label", sorted(_all_sources()))
def test_source_compiles(label, tmp_path):
    source = _all_sources()[label]
    for arch in ARCHS:
        ok, log = _compile(label, source, arch, tmp_path)
        assert ok, f"{label} ({arch}):\n{log[-4000:]}"


def test_a_compile_without_the_shared_constants_stops_at_the_check(tmp_path):
    """The sources define none of the table's constants: without the -D options common.cuh's #error fires."""
    ok, log = _compile("core.cu", ksrc.core_sources()["core.cu"], ARCHS[0], tmp_path, defines=())
    assert not ok and "orcd_core.kernels.constants.define_options()" in log, log[-2000:]


def test_uniform_kernel_names_per_format():
    """Each format's source defines gemv_/dequant_f16_/get_rows_ + its name (the backend's lookup)."""
    for fmt in _registry_formats():
        if fmt.cuda_source is None:
            continue
        text = ksrc.expand(fmt.cuda_source_text())
        assert f"ORCD_QUANT_KERNELS({fmt.name}," in text, f"{fmt.name}: no kernels instantiated in {fmt.cuda_source}"


# Machine code per decode GEMV at most (bytes of its .text section for sm_90). The batched GEMVs once
# were 250-390 KB (every copy of the item dot unrolled per token and per loop form, shuffles in divergent
# branches) and ran 5-10x the one-token kernel's time; at 74 KB they are a fraction of that.
GEMV_TEXT_MAX = {"gemv_": 48 << 10, "gemv_t4_": 64 << 10, "gemv_t8_": 96 << 10, "gemv_tc_": 72 << 10,
                 "gemv_q8_": 48 << 10, "gemv_q8_t8_": 96 << 10}


def _text_sizes(cubin: bytes) -> dict[str, int]:
    """{kernel: bytes} of the `.text.KERNEL` sections of an ELF64 cubin."""
    import struct

    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)

    def header(i):
        return struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize)

    names = header(shstrndx)[4]
    out = {}
    for i in range(shnum):
        h = header(i)
        name = cubin[names + h[0]: cubin.index(b"\0", names + h[0])].decode()
        if name.startswith(".text."):
            out[name[6:]] = h[5]
    return out


def _cubin(label: str, source: str, tmp_path) -> bytes:
    """The sm_90 cubin of a source, with nvcc when on PATH, else NVRTC; skips when neither exists."""
    nvcc = shutil.which("nvcc")
    if nvcc:
        src, out = tmp_path / label.replace("/", "_"), tmp_path / "out.cubin"
        src.write_text(source)
        subprocess.run([nvcc, "-std=c++17", f"-arch={ARCHS[0]}", "--cubin", *define_options(), "-o", str(out), str(src)],
                       check=True, capture_output=True)
        return out.read_bytes()
    lib = _load_nvrtc()
    if lib is None:
        pytest.skip("neither nvcc nor NVRTC (nvidia-cuda-nvrtc) is installed")
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), label.encode(), 0, None, None) == 0
    opts = [b"-std=c++17", f"--gpu-architecture={ARCHS[0]}".encode(), *(d.encode() for d in define_options())]
    assert lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts)) == 0
    size = ctypes.c_size_t()
    lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
    buf = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetCUBIN(prog, buf)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return buf.raw


@pytest.mark.parametrize("label", [k for k in sorted(_all_sources()) if k not in ("core.cu", "moe.cu")])
def test_decode_gemvs_stay_small(label, tmp_path):
    sizes = _text_sizes(_cubin(label, _all_sources()[label], tmp_path))
    gemvs = {k: v for k, v in sizes.items() if k.startswith("gemv_")}
    assert gemvs, f"{label}: no decode GEMV in {sorted(sizes)}"
    too_big = {k: v for k, v in gemvs.items()
               if v > GEMV_TEXT_MAX[next(p for p in ("gemv_q8_t8_", "gemv_q8_", "gemv_t8_", "gemv_t4_", "gemv_tc_", "gemv_")
                                         if k.startswith(p))]}
    assert not too_big, f"{label}: decode GEMVs over their machine-code budget (bytes): {too_big}"
