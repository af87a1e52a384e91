"""The CUDA backend's error paths: a KV cache that cannot be allocated is VramOOM and leaves VRAM and
health as they were; a model that does not fit fails before allocating, naming required and available
bytes, the device id and the model path; --gpu-device is validated against the device count."""

from __future__ import annotations

import pytest

from orcd_core.errors import InsufficientVram, OrcdError
from orcd_core.generation import VramOOM
from orcd_core.testing.cuda import cuda_dev, require_cuda_gpu  # noqa: F401 (the `dev` fixture)

pytestmark = pytest.mark.gpu

cupy = require_cuda_gpu()


def test_kv_cache_that_does_not_fit_is_vram_oom_and_frees_everything(dev):
    cupy.cuda.Device().synchronize()
    free0, total = cupy.cuda.runtime.memGetInfo()
    n_ctx = total // (2 * 8 * 128 * 2) + 1024  # one layer of 8 KV heads x 128 dims: more than the card
    with pytest.raises(VramOOM) as exc:
        dev.new_kv_cache(1, n_ctx, 8, 128)
    assert exc.value.code == "VRAM_OOM" and exc.value.details["required"] > total
    free1, _ = cupy.cuda.runtime.memGetInfo()
    # nothing of the failed cache stays allocated (free memory may rise: on an out-of-memory error CuPy's
    # pools give their cached blocks back before retrying; measured +2 MiB on an H100)
    assert free1 >= free0 - (1 << 20)
    assert dev.memory_report()["kv_cache"] == 0 and dev.healthy
    cache = dev.new_kv_cache(2, 64, 2, 64)  # and the device still allocates normally
    dev.free_kv_cache(cache)


def test_model_that_does_not_fit_fails_before_allocating(dev, tmp_path):
    from orcd_core import testmodels
    from orcd_core.testing import synth
    from orcd_core.gguf_file import open_gguf
    from orcd_core.plugins import default_registry

    path = tmp_path / "qwen2-tiny.gguf"
    synth.synthesize("qwen2", path, size="tiny", layers=1, seed=1,
                     vocab=testmodels.llama_cpp_models_dir() / "ggml-vocab-qwen2.gguf")
    model = open_gguf(path)
    free0, _ = cupy.cuda.runtime.memGetInfo()
    with pytest.raises(InsufficientVram) as exc:
        dev.prepare_load(model, n_ctx=10**10, shape=default_registry().architecture("qwen2").config(model).shape())
    msg = str(exc.value)
    assert "required" in msg and "available" in msg and "GPU 0" in msg and str(path) in msg
    assert len(msg.splitlines()) == 1
    free1, _ = cupy.cuda.runtime.memGetInfo()
    assert free1 >= free0 - (1 << 20)  # nothing of the refused model stays allocated (as above)


def test_gpu_device_is_validated():
    from orcd_core.backends.cuda import CudaDevice

    with pytest.raises(OrcdError, match=r"--gpu-device 99: this machine has \d+ CUDA device"):
        CudaDevice(99)
