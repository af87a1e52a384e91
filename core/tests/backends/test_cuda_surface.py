"""The CUDA device's collaborators (graph.py, moe.py, sampler.py, fusion.py, ...) use its public surface
only (issue 15): no `_private` member of another object, and every attribute they read off the device
is one that CudaDevice (or the Device contract it implements) defines. Checked on the syntax trees, so
it runs in CI without a GPU; a renamed or removed device member fails here, not on the GPU machine."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "src" / "orcd_core"
CUDA = CORE / "backends" / "cuda"
COLLABORATORS = sorted(p for p in CUDA.glob("*.py") if p.name not in ("device.py", "__init__.py"))
DEVICE_NAMES = {"dev", "device"}  # how the collaborators call the CudaDevice they are given


def _class_members(path: Path, name: str) -> set[str]:
    """Methods, class attributes and `self.X = ...` attributes of class `name` in `path`."""
    cls = next(n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef) and n.name == name)
    out = set()
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.add(node.name)
        elif isinstance(node, ast.Assign):
            out |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out.add(node.target.id)
    for node in ast.walk(cls):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AnnAssign, ast.AugAssign)) else []
        for t in targets:
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                out.add(t.attr)
    return out


def _is_device(expr: ast.expr) -> bool:
    """`dev`, `device`, or `self.dev` / `self.device`."""
    if isinstance(expr, ast.Name):
        return expr.id in DEVICE_NAMES
    return (isinstance(expr, ast.Attribute) and expr.attr in DEVICE_NAMES
            and isinstance(expr.value, ast.Name) and expr.value.id == "self")


def test_the_check_sees_the_collaborators():
    assert {"graph.py", "moe.py", "sampler.py", "fusion.py"} <= {p.name for p in COLLABORATORS}


@pytest.mark.parametrize("path", COLLABORATORS, ids=lambda p: p.name)
def test_collaborators_touch_no_private_member_of_another_object(path):
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "private members reached from outside their class:\n" + "\n".join(found)


def test_what_the_collaborators_read_off_the_device_exists():
    defined = _class_members(CUDA / "device.py", "CudaDevice") | _class_members(CORE / "device.py", "Device")
    assert {"step_array", "contiguous", "make_current", "format_kernels", "dequant_gemm"} <= defined
    used = {}
    for path in COLLABORATORS:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and _is_device(node.value):
                used.setdefault(node.attr, f"{path.name}:{node.lineno}")
    assert len(used) >= 10, used  # the collaborators do use the device (the check is not vacuous)
    missing = {a: where for a, where in used.items() if a not in defined}
    assert not missing, f"attributes read off the device that CudaDevice does not define: {missing}"


def test_the_weight_arenas_are_the_stores_alone():
    """Weights (arenas, the chunked upload, load progress, residency) live in store.py's WeightStore;
    CudaDevice delegates to it and no other file of the backend allocates arenas or uploads chunks."""
    owners = {"store.py", "memory.py"}  # memory.py defines Arena and ChunkedUploader
    found = []
    for path in sorted(CUDA.glob("*.py")):
        if path.name in owners:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Name) and node.id in ("Arena", "ChunkedUploader", "LoadProgress"):
                found.append(f"{path.name}:{node.lineno}: {node.id}")
    assert not found, found
    store = _class_members(CUDA / "store.py", "WeightStore")
    assert {"reserve", "upload", "upload_array", "finish", "prove_resident", "release", "arenas"} <= store
    device = _class_members(CUDA / "device.py", "CudaDevice")
    assert not {"arenas", "_place", "_uploader"} & device
