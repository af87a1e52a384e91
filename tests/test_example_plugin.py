"""A third-party plugin works: build examples/orcd-quant-example as a wheel, install it with orcd-core
and orcd-server (local paths) into a fresh virtual environment, and show that the worker discovers it
there. Everything comes from uv's cache (`--offline`): the workspace's own `uv sync` filled it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "orcd-quant-example"


def uv_executable() -> str:
    uv = os.environ.get("UV") or shutil.which("uv")  # `uv run` sets UV to its own executable
    if not uv:
        pytest.fail("uv is needed to build and install the example plugin (the README's test command uses it)")
    return uv


def run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "ORCD_LOAD_PLUGINS", "UV_PROJECT_ENVIRONMENT")}
    env.update(kwargs.pop("env", {}))
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=600, **kwargs)
    assert proc.returncode == 0 or kwargs.get("check") is False, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv with the example wheel, orcd-core and orcd-server (local paths), and the
    third-party packages at the versions of uv.lock (exported as a pylock.toml, so that uv installs
    exact cached files offline instead of resolving against an index it cannot reach)."""
    uv = uv_executable()
    tmp = tmp_path_factory.mktemp("example-plugin")
    run([uv, "build", "--wheel", "--offline", "--quiet", EXAMPLE, "-o", tmp / "wheels"])
    (wheel,) = (tmp / "wheels").glob("orcd_quant_example-0.1.0-*.whl")
    lock = tmp / "pylock.toml"
    run([uv, "export", "--frozen", "--quiet", "--all-packages", "--no-emit-workspace", "--format", "pylock.toml", "-o", lock], cwd=ROOT)
    venv = tmp / "venv"
    run([uv, "venv", "--offline", "--quiet", "--python", sys.executable, venv])
    python = venv / "bin" / "python"
    run([uv, "pip", "install", "--offline", "--quiet", "--python", python, "-r", lock])
    run([uv, "pip", "install", "--offline", "--quiet", "--no-deps", "--python", python, wheel, ROOT / "core", ROOT / "server"])
    run([uv, "pip", "check", "--offline", "--quiet", "--python", python])  # every dependency is satisfied
    return venv


def test_fresh_venv_has_only_what_was_installed(venv):
    code = "import importlib.metadata as m, json; print(json.dumps([d.metadata['Name'] for d in m.distributions()]))"
    names = set(json.loads(run([venv / "bin" / "python", "-c", code]).stdout))
    assert {"orcd-quant-example", "orcd-core", "orcd-server"} <= names
    assert not names & {"orcd-quant-q4k", "orcd-quant-legacy", "orcd-llama-adapter", "orcd-worker"}


def test_orcd_worker_plugins_discovers_the_example(venv):
    proc = run([venv / "bin" / "orcd-worker", "plugins", "--json"])
    entries = {e["name"]: e for e in json.loads(proc.stdout)}
    assert set(entries) == {"orcd-core", "orcd-quant-example"}
    example = entries["orcd-quant-example"]
    assert example["version"] == "0.1.0" and example["quant_types"] == ["IQ4_NL"] and example["error"] is None
    assert example["entry_point"] == "quant-example"


def test_load_plugins_discovers_the_example_and_check_supported_accepts_iq4_nl(venv, tmp_path):
    code = f"""
import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from orcd_core.errors import UnsupportedTensorType
from orcd_core.gguf_file import check_supported, open_gguf
from orcd_core.plugins import load_plugins

reg = load_plugins()
assert not reg.failed, reg.failed
fmt = reg.quant_format(20)
print(type(fmt).__module__, fmt.name, reg.owner("quant", 20))

w = GGUFWriter({str(tmp_path / "iq4.gguf")!r}, "llama")
raw = fmt.random_blocks(np.random.default_rng(0), 4).reshape(2, 36)
w.add_tensor("blk.0.w", raw, raw_shape=raw.shape, raw_dtype=GGMLQuantizationType.IQ4_NL)
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
model = open_gguf({str(tmp_path / "iq4.gguf")!r})
try:
    check_supported(model, reg)
except UnsupportedTensorType as exc:
    raise SystemExit("IQ4_NL not accepted: " + str(exc))
except Exception as exc:  # no llama adapter here: the architecture is what is missing, not the type
    print(type(exc).__name__)
values = fmt.dequantize(model.tensors["blk.0.w"].data, (2, 64))
print(values.shape, bool(np.isfinite(values).all()))
"""
    proc = run([venv / "bin" / "python", "-c", code])
    lines = proc.stdout.splitlines()
    assert lines == ["orcd_quant_example.iq4_nl IQ4_NL quant-example", "UnsupportedArchitecture", "(2, 64) True"], proc.stdout


def test_the_examples_own_tests_pass_in_the_fresh_venv(venv):
    proc = run([venv / "bin" / "python", "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests"], cwd=EXAMPLE)
    # the CUDA kernel tests skip as a module: no CuPy in this venv
    assert "4 passed, 1 skipped" in proc.stdout and "could not import 'cupy'" in proc.stdout, proc.stdout


def test_the_examples_gpu_tests_collect_cleanly_without_a_gpu(venv):
    proc = run([venv / "bin" / "python", "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "-rs", "-p", "no:cacheprovider",
                "tests"], cwd=EXAMPLE, check=False)
    assert proc.returncode == 5, proc.stdout + proc.stderr  # pytest's "no tests collected": skipped, not an error
    assert "SKIPPED [1]" in proc.stdout and "could not import 'cupy'" in proc.stdout, proc.stdout
    assert "no tests collected (4 deselected)" in proc.stdout and "error" not in proc.stdout.lower(), proc.stdout


def test_the_examples_cuda_source_compiles_for_hopper(tmp_path):
    """iq4_nl.cu, expanded as the CUDA backend expands it, compiles with nvcc for sm_90 (with the -D options of the constants table) into the
    kernels the backend launches, none spilling (where nvcc is installed; the kernels' results are checked on a GPU by
    the example's tests/test_iq4_nl_cuda.py, marker `gpu`)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc here")
    from orcd_core.kernels import expand
    from orcd_core.kernels.constants import define_options

    source = tmp_path / "iq4_nl.cu"
    source.write_text(expand((EXAMPLE / "src" / "orcd_quant_example" / "iq4_nl.cu").read_text(encoding="utf-8")))
    cubin = tmp_path / "iq4_nl.cubin"
    proc = run([nvcc, "-arch=sm_90", "-std=c++17", *define_options(), "-cubin", "-Xptxas", "-v", "-o", cubin, source])
    symbols = cubin.read_bytes()
    kernels = ("gemv_tc_IQ4_NL", "gemv_IQ4_NL", "gemv_t4_IQ4_NL", "gemv_t8_IQ4_NL", "dequant_f16_IQ4_NL", "get_rows_IQ4_NL")
    for kernel in kernels:
        assert f".text.{kernel}".encode() in symbols, kernel
    spills = re.findall(r"(\d+) bytes spill stores", proc.stderr)
    assert spills == ["0"] * len(kernels), proc.stderr  # the level lookup stays in registers (no local-memory table)
