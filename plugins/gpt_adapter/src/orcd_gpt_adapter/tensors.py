"""Strict, declarative access to a GGUF file's tensors for the adapters of this plugin.

Every tensor is taken at most once and its NumPy shape is asserted against what the config says;
`finish()` fails on any tensor of the file that the adapter did not consume, so a file with an
unexpected tensor (a variant this adapter does not understand) fails at load instead of running
wrong. Fusion (q|k|v, gate|up) is done here, at load, through `Device.upload_weight` with several
parts.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from orcd_core.errors import GGUFTensorError, UnsupportedTensorType
from orcd_core.gguf_file import TensorInfo


class Tensors:
    """The tensors of one GGUF file, handed out once each."""

    def __init__(self, model, device, registry=None):
        if registry is None:
            from orcd_core.plugins import default_registry

            registry = default_registry()
        self.model, self.device, self.registry = model, device, registry
        self.used: set[str] = set()

    # -- lookups --------------------------------------------------------------------------------

    def has(self, name: str) -> bool:
        return name in self.model.tensors

    def info(self, name: str, shape: Sequence[int]) -> TensorInfo:
        """The table entry of `name`, checked to have NumPy shape `shape`; marks it used."""
        t = self.model.tensors.get(name)
        if t is None:
            raise GGUFTensorError(self.model.path, f"tensor {name!r} is missing (expected shape {list(shape)})")
        if tuple(t.np_shape) != tuple(int(s) for s in shape):
            raise GGUFTensorError(
                self.model.path, f"tensor {name!r} has shape {list(t.np_shape)}, expected {list(shape)}"
            )
        if name in self.used:
            raise GGUFTensorError(self.model.path, f"tensor {name!r} is consumed twice")
        self.used.add(name)
        return t

    def fmt(self, t: TensorInfo):
        fmt = self.registry.quant_format(t.ggml_type)
        if fmt is None:
            raise UnsupportedTensorType(
                self.model.path, f"tensor {t.name!r} has type {t.type_name}, which no installed plugin provides"
            )
        return fmt

    # -- uploads --------------------------------------------------------------------------------

    def weight(self, name: str, shape: Sequence[int]):
        """A matrix (or expert stack) kept in its GGUF type on the device."""
        t = self.info(name, shape)
        return self.device.upload_weight(name, [t], self.fmt(t))

    def fused(self, name: str, parts: Sequence[tuple[str, Sequence[int]]]):
        """Several tensors of one type concatenated along their rows (axis -2) into one weight
        named `name`. Returns None, consuming nothing, when the parts' types differ."""
        infos = [self.model.tensors.get(n) for n, _ in parts]
        if any(t is None for t in infos) or len({t.ggml_type for t in infos}) != 1:
            return None
        infos = [self.info(n, s) for n, s in parts]
        return self.device.upload_weight(name, infos, self.fmt(infos[0]))

    def fused_f16(self, name: str, parts: Sequence[tuple[str, Sequence[int]]]):
        """The fallback of `fused` for parts of different types: each is dequantized on the host and
        the concatenation is uploaded as one F16 weight (more memory, same values up to fp16)."""
        dense = np.concatenate([self.host(n, s) for n, s in parts], axis=-2).astype(np.float16)
        f16 = self.registry.quant_format(1)
        raw = np.ascontiguousarray(dense).view(np.uint8).reshape(-1)
        t = TensorInfo(name, 1, "F16", tuple(reversed(dense.shape)), 0, raw.nbytes, raw)
        return self.device.upload_weight(name, [t], f16)

    def host(self, name: str, shape: Sequence[int]) -> np.ndarray:
        """A small tensor (norm weight, bias, sinks) dequantized to float32 on the host."""
        t = self.info(name, shape)
        return np.asarray(self.fmt(t).dequantize(t.data, t.np_shape), dtype=np.float32)

    def array(self, name: str, shape: Sequence[int]) -> Any:
        """A small tensor as a float32 device array."""
        return self.device.upload_array(name, self.host(name, shape))

    def optional_array(self, name: str, shape: Sequence[int]) -> Any:
        return self.array(name, shape) if self.has(name) else None

    def finish(self) -> None:
        """Fail when the file holds tensors that the adapter did not consume."""
        unused = sorted(set(self.model.tensors) - self.used)
        if unused:
            more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
            raise GGUFTensorError(
                self.model.path,
                f"{self.model.architecture}: unexpected tensors {', '.join(map(repr, unused[:5]))}{more}",
            )
