"""The CUDA backend (CuPy + our kernels). Importing this package imports CuPy: only
`orcd_core.backends.create_device("cuda")` does, never a plugin import."""

from .device import CudaDevice, GpuDeviceError

__all__ = ["CudaDevice", "GpuDeviceError"]
