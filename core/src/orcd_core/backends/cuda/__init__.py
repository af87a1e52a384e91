"""The CUDA backend (CuPy + our kernels). `CudaDevice` imports CuPy when it is first named (only
`orcd_core.backends.create_device("cuda")` does, never a plugin import); `planner` (the VRAM plan of a
model) needs no CuPy and imports anywhere."""

from __future__ import annotations

__all__ = ["CudaDevice", "GpuDeviceError"]


def __getattr__(name: str):
    if name in __all__:
        from . import device

        return getattr(device, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
