"""Strict loading of a GGUF file's tensors, and the projection object the forward pass calls.

`Loader` hands each tensor out at most once, asserts its NumPy shape, and `finish()` fails on any
tensor left unconsumed, so a file variant the adapter does not understand fails at load instead of
running wrong. `Proj` hides fusion: several linears that read the same input (q|k|v, gate|up) are
one weight when their GGUF types agree (`Device.upload_weight` with several parts), else separate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from orcd_core.errors import GGUFTensorError, UnsupportedTensorType
from orcd_core.gguf_file import TensorInfo


class Loader:
    """The tensors of one GGUF file, each consumed once, shapes asserted (NumPy order)."""

    def __init__(self, model, device, registry=None):
        if registry is None:
            from orcd_core.plugins import default_registry

            registry = default_registry()
        self.model, self.device, self.registry = model, device, registry
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.model.tensors

    def take(self, name: str, shape: Sequence[int]) -> TensorInfo:
        t = self.model.tensors.get(name)
        if t is None:
            raise GGUFTensorError(self.model.path, f"tensor {name!r} is missing (expected shape {list(shape)})")
        if tuple(t.np_shape) != tuple(int(s) for s in shape):
            raise GGUFTensorError(self.model.path, f"tensor {name!r} has shape {list(t.np_shape)}, expected {list(shape)}")
        if name in self.used:
            raise GGUFTensorError(self.model.path, f"tensor {name!r} is consumed twice")
        self.used.add(name)
        return t

    def fmt(self, t: TensorInfo):
        fmt = self.registry.quant_format(t.ggml_type)
        if fmt is None:
            raise UnsupportedTensorType(
                self.model.path,
                f"tensor {t.name!r} has type {t.type_name}, which no installed plugin provides "
                f"(installed: {self.registry.describe_installed()})",
            )
        return fmt

    def weight(self, name: str, shape: Sequence[int]):
        """A matrix kept in its GGUF type on the device."""
        t = self.take(name, shape)
        return self.device.upload_weight(name, [t], self.fmt(t))

    def host(self, name: str, shape: Sequence[int]) -> np.ndarray:
        """A small tensor (norm, bias, rope factors) as float32 on the host."""
        t = self.take(name, shape)
        return np.asarray(self.fmt(t).dequantize(t.data, t.np_shape), dtype=np.float32)

    def array(self, name: str, shape: Sequence[int]):
        return self.device.upload_array(name, self.host(name, shape))

    def optional_array(self, name: str, shape: Sequence[int]):
        return self.array(name, shape) if self.has(name) else None

    def proj(self, name: str, parts: Sequence[tuple[str, int]], n_in: int,
             biases: Sequence[str | None] | None = None) -> "Proj":
        """Linears `parts` = [(weight name, rows)] over one input of width `n_in`, fused when their
        types agree. `biases`: one tensor name per part (absent tensors count as zero bias)."""
        infos = [self.take(n, (rows, n_in)) for n, rows in parts]
        rows = [r for _, r in parts]
        bias_arrays = None
        if biases is not None and any(b is not None and self.has(b) for b in biases):
            bias_arrays = [self.host(b, (r,)) if b is not None and self.has(b) else np.zeros(r, np.float32)
                           for b, r in zip(biases, rows)]
        if len({t.ggml_type for t in infos}) == 1:
            w = self.device.upload_weight(name, infos, self.fmt(infos[0]))
            b = self.device.upload_array(name + ".bias", np.concatenate(bias_arrays)) if bias_arrays else None
            return Proj([(w, b)], rows)
        pairs = []
        for i, t in enumerate(infos):
            b = self.device.upload_array(t.name + ".bias", bias_arrays[i]) if bias_arrays else None
            pairs.append((self.device.upload_weight(t.name, [t], self.fmt(t)), b))
        return Proj(pairs, rows)

    def finish(self) -> None:
        unused = sorted(set(self.model.tensors) - self.used)
        if unused:
            more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
            raise GGUFTensorError(
                self.model.path, f"{self.model.architecture}: unexpected tensors {', '.join(map(repr, unused[:5]))}{more}"
            )


@dataclass
class Proj:
    """y_i = x @ W_i (+ b_i) for each part i; one matmul when the parts were fused at load."""

    weights: list[tuple[Any, Any]]  # (Weight, bias or None), one entry if fused
    rows: list[int]  # output width of each part

    @property
    def fused(self) -> bool:
        return len(self.weights) == 1 and len(self.rows) > 1

    def __call__(self, dev, x) -> tuple:
        if len(self.weights) == 1:
            y = dev.linear(x, *self.weights[0])  # [T, sum(rows)]
            if len(self.rows) == 1:
                return (y,)
            out, start = [], 0
            for r in self.rows:
                out.append(y[:, start : start + r])  # [T, r]
                start += r
            return tuple(out)
        return tuple(dev.linear(x, w, b) for w, b in self.weights)
