"""Device backends, which implement `orcd_core.device.Device`: `reference` (NumPy on the CPU,
orcd_core.backends.reference) and `cuda` (CuPy, orcd_core.backends.cuda).

Choosing one: `create_device("reference")`; `create_device("cuda")` imports CuPy (only then) and
fails with one clear line where CuPy or a GPU is missing. There is no silent fallback from one to
the other; importing this package imports no CuPy."""

from __future__ import annotations

import importlib

from ..device import Device
from ..errors import OrcdError

BACKENDS = ("reference", "cuda")


class BackendUnavailable(OrcdError):
    """The requested backend cannot run on this machine (no CuPy, no GPU, unknown name)."""


def create_device(backend: str, gpu_device: int = 0, **opts) -> Device:
    """A new device of the named backend ("reference" | "cuda")."""
    if backend == "reference":
        from .reference import ReferenceDevice

        return ReferenceDevice(**opts)
    if backend == "cuda":
        try:
            importlib.import_module("cupy")
        except ImportError as exc:
            raise BackendUnavailable(
                f"the cuda backend needs CuPy (install orcd-worker[cuda12] or [cuda13]): {exc}; "
                "pass --backend reference to run on the CPU"
            ) from None
        try:
            module = importlib.import_module("orcd_core.backends.cuda")
        except ModuleNotFoundError as exc:
            if exc.name == "orcd_core.backends.cuda":
                raise BackendUnavailable("the cuda backend is not part of this installation") from None
            raise
        return module.CudaDevice(gpu_device=gpu_device, **opts)
    raise BackendUnavailable(f"unknown backend {backend!r}, expected one of {', '.join(BACKENDS)}")


def cuda_usable(gpu_device: int = 0) -> bool:
    """Whether CuPy imports and sees a GPU with index `gpu_device` (used to pick the default backend)."""
    try:
        cupy = importlib.import_module("cupy")
        return int(cupy.cuda.runtime.getDeviceCount()) > gpu_device
    except Exception:  # no CuPy, no driver, no device: all mean "not usable"
        return False
