"""Shared pieces of the GPU test modules (core's CUDA backend tests, plugins' kernel tests).

At the top of a GPU test module (after `pytestmark = pytest.mark.gpu`):

    cupy = require_cuda_gpu()   # skips the whole module without CuPy or a CUDA GPU

and, for a module-wide `CudaDevice(0)` as fixture `dev`:

    from orcd_core.testing.cuda import cuda_dev  # noqa: F401 (provides the fixture `dev`)

`synth_dir`, `synth_cut`, `load_engine` and `run_ids` serve the whole-model tests: a session directory of
synthetic GGUFs ($ORCD_SYNTH_DIR, reused when present), a 2-layer full-width cut of an architecture in it,
an `Engine` on a backend, greedy ids of one request.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def require_cuda_gpu():
    """CuPy, or skip the calling module when CuPy is missing or sees no CUDA GPU (no driver included)."""
    cupy = pytest.importorskip("cupy")
    try:
        n_gpu = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no driver
        n_gpu = 0
    if n_gpu == 0:
        pytest.skip("no CUDA GPU", allow_module_level=True)
    return cupy


@pytest.fixture(scope="module", name="dev")
def cuda_dev():
    """`CudaDevice(0)` without the residency check, closed after the module. Its one-token decode GEMVs are
    the float ones ("ffma", the exact path the ops' thresholds are written for); a test of the int8 ones
    ("q8", an engine's default for one sequence) sets `decode_gemv` itself."""
    from orcd_core.backends.cuda import CudaDevice

    d = CudaDevice(0, residency_check_s=0)
    d.decode_gemv = "ffma"
    yield d
    d.close()


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    d = os.environ.get("ORCD_SYNTH_DIR")
    return Path(d) if d else tmp_path_factory.mktemp("synth")


def synth_cut(synth_dir: Path, arch: str) -> Path:
    """The synthetic full-width 2-layer cut of `arch` (seed 5) in `synth_dir`, written on first use: the
    whole-model GPU tests' file (qwen2 / phi3 Q4_K_M, gpt-oss MXFP4 experts and sliding-window rings)."""
    from orcd_core.testing import synth

    path = synth_dir / f"{arch}-full-2-batch.gguf"
    if not path.exists():
        synth.synthesize(arch, path, size="full", layers=2, seed=5)
    return path


def load_engine(path, backend, **kw):
    from orcd_core.engine import Engine

    return Engine.load(path, backend=backend, **kw)


def run_ids(engine, prompt_ids, max_tokens, sampling) -> list[int]:
    """The generated ids of one request, run to its end."""
    from orcd_core.generation import GenerationRequest

    prepared = engine.prepare(GenerationRequest(prompt_ids=tuple(prompt_ids), max_tokens=max_tokens, sampling=sampling))
    gen = engine.run(prepared)
    while True:
        try:
            next(gen)
        except StopIteration as done:
            return list(done.value.ids)


def upload_raw(dev, fmt, raw, N: int, K: int):
    """`raw` (N rows of K weights, encoded in `fmt`'s blocks) uploaded as a weight of the device: the
    start of a format plugin's CUDA kernel tests."""
    from orcd_core.gguf_file import TensorInfo

    t = TensorInfo("w", fmt.ggml_type, fmt.name, (K, N), 0, raw.nbytes, raw.reshape(-1))
    return dev.upload_weight("w", [t], fmt)
