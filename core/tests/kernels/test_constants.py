"""The constants the CUDA sources share with their launchers have one home, orcd_core.kernels.constants
(passed to every compile as -D options). Checked on the source text, without a GPU or a compiler: the
table, the names the sources use, the `#error` check in common.cuh and the launchers must agree."""

from __future__ import annotations

import ast
import re
from importlib import resources
from pathlib import Path

from orcd_core import kernels as ksrc
from orcd_core.kernels import constants
from orcd_core.plugins import default_registry

CUDA_BACKEND = Path(ksrc.__file__).resolve().parents[1] / "backends" / "cuda"
_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
_GUARD = re.compile(r"#if\s+(!defined\(\w+\)(?:\s*\|\|\s*\\?\s*!defined\(\w+\))*)\s*#error", re.S)


def _sources() -> dict[str, str]:
    """Every CUDA file of the core and of the installed quant formats, unexpanded, comments removed."""
    out = {}
    for f in resources.files(ksrc).iterdir():
        if f.name.endswith((".cu", ".cuh")):
            out[f.name] = _COMMENT.sub(" ", f.read_text(encoding="utf-8"))
    for fmt in default_registry().quant_formats.values():
        if fmt.cuda_source is not None:
            out.setdefault("%s/%s" % tuple(fmt.cuda_source), _COMMENT.sub(" ", fmt.cuda_source_text()))
    return out


def _guard_names(text: str) -> list[str]:
    m = _GUARD.search(text)
    assert m, "common.cuh has no `#if !defined(...) || ... #error` check of the shared constants"
    return re.findall(r"defined\((\w+)\)", m.group(1))


def test_the_table_is_ints_and_options():
    table = constants.table()
    assert len(table) >= 10 and all(type(v) is int for v in table.values())
    assert constants.define_options() == tuple(f"-D{k}={v}" for k, v in sorted(table.items()))
    assert constants.GEMV_MAX_T == table["GEMV_MAX_T"]


def test_common_cuh_checks_exactly_the_table():
    names = _guard_names(_sources()["common.cuh"])
    assert len(names) == len(set(names))
    assert set(names) == set(constants.table()), (
        f"only in the table: {sorted(set(constants.table()) - set(names))}; "
        f"only in common.cuh: {sorted(set(names) - set(constants.table()))}")


def test_every_constant_is_used_by_a_source_and_defined_by_none():
    sources = _sources()
    guard = _GUARD.search(sources["common.cuh"])
    sources["common.cuh"] = sources["common.cuh"][: guard.start()] + sources["common.cuh"][guard.end():]
    unused, defined = [], []
    for name in constants.table():
        word = re.compile(rf"\b{name}\b")
        if not any(word.search(text) for text in sources.values()):
            unused.append(name)
        defined += [f"{label}: {name}" for label, text in sources.items()
                    if re.search(rf"^\s*#\s*define\s+{name}\b", text, re.M)]
    assert not unused, f"constants no CUDA source uses (drop them from the table): {unused}"
    assert not defined, f"sources define a shared constant (it belongs in kernels/constants.py): {defined}"


def test_the_launchers_assign_none_of_them():
    """backends/cuda/*.py import the table's names; a module-level `NAME = ...` would be a second copy."""
    names = set(constants.table())
    found = []
    for path in sorted(CUDA_BACKEND.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, (ast.AnnAssign, ast.AugAssign)) else []
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name) and n.id in names:
                        found.append(f"{path.name}:{node.lineno}: {n.id}")
    assert not found, found


def test_the_checks_see_a_drift():
    """The scanners catch a source that defines a name and a guard that misses one."""
    text = _COMMENT.sub(" ", "#define GEMV_MAX_T 8 // GEMV_WARPS\n")
    assert re.search(r"^\s*#\s*define\s+GEMV_MAX_T\b", text, re.M) and "GEMV_WARPS" not in text
    assert _guard_names("#if !defined(A) || \\\n    !defined(B)\n#error \"x\"\n#endif") == ["A", "B"]


def test_the_tensor_core_staging_sizes_mirror_the_source():
    """backends/cuda/kernels.py's stage_vectors and xs_bytes mirror quant_kernels.cuh's stage_vectors and
    xs_chunk (the launcher passes the shared memory the kernel then uses): the same expressions."""
    src = _sources()["quant_kernels.cuh"]
    assert re.search(r"return mode == GEMV_X_SILU \? 2 \* T : mode == GEMV_X_RMS \? T \+ 1 : T;", src)
    assert re.search(r"return 4 \* T \* K <= budget \? K : \(budget / \(4 \* T\)\) & ~\(XS_CHUNK_ALIGN - 1\);", src)
    from orcd_core.kernels.constants import GEMV_X_PLAIN, GEMV_X_RMS, GEMV_X_SILU, XS_CHUNK_ALIGN, XS_TC_MAX_BYTES

    kernels_py = (CUDA_BACKEND / "kernels.py").read_text()
    assert "return 2 * T if mode == GEMV_X_SILU else T + 1 if mode == GEMV_X_RMS else T" in kernels_py
    assert "(budget // (4 * n_vectors)) & ~(XS_CHUNK_ALIGN - 1)" in kernels_py
    assert XS_TC_MAX_BYTES // (4 * 2 * 8) >= XS_CHUNK_ALIGN  # 8 rows of silu operands: a chunk fits
    assert len({GEMV_X_PLAIN, GEMV_X_RMS, GEMV_X_SILU}) == 3


def test_the_quantized_row_size_mirrors_the_source():
    """kernels.py's q8_row_bytes is q8.cuh's: the launcher sizes the quantized row and the GEMV's shared
    memory by it, the kernels lay the row out by theirs."""
    src = _sources()["q8.cuh"]
    assert re.search(r"return \(i64\)K \+ \(i64\)\(K / Q8_GROUP\) \* Q8_META_BYTES;", src)
    assert "return K + K // Q8_GROUP * Q8_META_BYTES" in (CUDA_BACKEND / "kernels.py").read_text()
