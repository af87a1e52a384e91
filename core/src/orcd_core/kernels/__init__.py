"""CUDA sources shared by every backend-facing package: `common.cuh` (fp16 helpers, warp/block
reductions), `quant_kernels.cuh` (the GEMV / dequantize / row-gather templates every tensor format
instantiates), `moe_kernels.cuh` (the expert-indexed GEMV templates), `core.cu` (one module of the
op families, a file each: `norm.cuh`, `rope.cuh`, `eltwise.cuh`, `kv.cuh`, `attention.cuh`,
`sampling.cuh`, `step.cuh`), `moe.cu` (mixture-of-experts routing and grouping) and
`floats.cu` (F32/F16/BF16). The numbers they share with their Python launchers are `constants.py`'s
table, passed to every compile as `-D` options.

`expand(text)` inlines `#include "name.cuh"` lines from this folder, so a plugin's `.cu` compiles
with NVRTC without an include path, and the on-disk kernel cache (keyed on the full source text)
sees header changes. Nothing here imports CuPy.
"""

from __future__ import annotations

import re
from importlib import resources

_PRAGMA_ONCE = re.compile(r"^\s*#\s*pragma\s+once\s*$", re.M)
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([A-Za-z0-9_.]+)"\s*$', re.M)


def read(name: str) -> str:
    """The text of one file of this folder."""
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def expand(text: str, _seen: set[str] | None = None) -> str:
    """`text` with each `#include "x.cuh"` of this folder inlined once (`#pragma once` semantics)."""
    seen = set() if _seen is None else _seen

    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name in seen:
            return f"// (already included: {name})"
        seen.add(name)
        body = _PRAGMA_ONCE.sub("", expand(read(name), seen))
        return f"// ---- begin {name}\n{body}\n// ---- end {name}"

    return _INCLUDE.sub(sub, text)


def core_sources() -> dict[str, str]:
    """The core's own kernels, expanded: {"core.cu": ..., "moe.cu": ...} (floats.cu comes with the
    F32/F16/BF16 formats)."""
    return {name: expand(read(name)) for name in ("core.cu", "moe.cu")}
