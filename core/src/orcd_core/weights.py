"""Strict, declarative loading of a GGUF file's tensors for architecture adapters, and the projection
object their forward passes call.

`TensorLoader` hands each tensor out at most once, asserts its NumPy shape against what the config
says, and `finish()` fails on any tensor of the file left unconsumed, so a file variant the adapter
does not understand fails at load instead of running wrong. `Proj` hides fusion: several linears that
read the same input (q|k|v, gate|up) are one weight when their GGUF types agree
(`Device.upload_weight` with several parts), else separate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from orcd_core.errors import GGUFTensorError, UnsupportedTensorType
from orcd_core.gguf_file import TensorInfo


class TensorLoader:
    """The tensors of one GGUF file, each consumed once, shapes asserted (NumPy order)."""

    def __init__(self, model, device, registry=None):
        if registry is None:
            from orcd_core.plugins import default_registry

            registry = default_registry()
        self.model, self.device, self.registry = model, device, registry
        self.used: set[str] = set()

    # -- lookups --------------------------------------------------------------------------------

    def has(self, name: str) -> bool:
        return name in self.model.tensors

    def take(self, name: str, shape: Sequence[int]) -> TensorInfo:
        """The table entry of `name`, checked to have NumPy shape `shape`; marks it used."""
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

    # -- uploads --------------------------------------------------------------------------------

    def weight(self, name: str, shape: Sequence[int]):
        """A matrix (or expert stack) kept in its GGUF type on the device."""
        t = self.take(name, shape)
        return self.device.upload_weight(name, [t], self.fmt(t))

    def host(self, name: str, shape: Sequence[int]) -> np.ndarray:
        """A small tensor (norm weight, bias, rope factors, sinks) dequantized to float32 on the host."""
        t = self.take(name, shape)
        return np.asarray(self.fmt(t).dequantize(t.data, t.np_shape), dtype=np.float32)

    def array(self, name: str, shape: Sequence[int]) -> Any:
        """A small tensor as a float32 device array."""
        return self.device.upload_array(name, self.host(name, shape))

    def optional_array(self, name: str, shape: Sequence[int]) -> Any:
        return self.array(name, shape) if self.has(name) else None

    def proj(self, name: str, parts: Sequence[tuple[str, int]], n_in: int,
             biases: Sequence[str | None] | None = None) -> "Proj":
        """Linears `parts` = [(weight name, rows)] over one input of width `n_in`, fused into one
        weight `name` when their types agree, else kept apart. `biases`: one tensor name (or None) per
        part; absent ones count as zero (llama.cpp's q/k/v biases are optional)."""
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

    def proj_split(self, prefix: str, rows: Sequence[int], n_in: int) -> "Proj":
        """One stored tensor `{prefix}.weight` (+ optional `.bias`) whose output rows are several
        projections (GPT-2's c_attn): applied as one matmul, then split by `rows`."""
        p = self.proj(prefix + ".weight", [(prefix + ".weight", sum(rows))], n_in, [prefix + ".bias"])
        return Proj(p.weights, list(rows))

    def fused(self, name: str, parts: Sequence[tuple[str, Sequence[int]]]):
        """Several tensors of one type concatenated along their rows (axis -2) into one weight
        named `name`. Returns None, consuming nothing, when the parts' types differ."""
        infos = [self.model.tensors.get(n) for n, _ in parts]
        if any(t is None for t in infos) or len({t.ggml_type for t in infos}) != 1:
            return None
        infos = [self.take(n, s) for n, s in parts]
        return self.device.upload_weight(name, infos, self.fmt(infos[0]))

    def fused_f16(self, name: str, parts: Sequence[tuple[str, Sequence[int]]]):
        """The fallback of `fused` for parts of different types: each is dequantized on the host and
        the concatenation is uploaded as one F16 weight (more memory, same values up to fp16)."""
        dense = np.concatenate([self.host(n, s) for n, s in parts], axis=-2).astype(np.float16)
        f16 = self.registry.quant_format(1)
        raw = np.ascontiguousarray(dense).view(np.uint8).reshape(-1)
        t = TensorInfo(name, 1, "F16", tuple(reversed(dense.shape)), 0, raw.nbytes, raw)
        return self.device.upload_weight(name, [t], f16)

    def finish(self) -> None:
        """Fail when the file holds tensors that the adapter did not consume."""
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
