"""The two real test models (DESIGN.md): every tensor dequantizes with our registered QuantFormat exactly
as gguf-py's `gguf.quants.dequantize` does (bit-exact fp32), and the synthetic generator's full-size plans
reproduce their tensor tables. Skipped, with the reason, only if the registry download fails."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from orcd_core import testmodels
from orcd_core.testing import synth
from orcd_core.gguf_file import open_gguf
from orcd_core.plugins import default_registry

pytestmark = pytest.mark.slow

ROWS_ELEMENTS = 1 << 22  # dequantize in slices of about this many elements (bounded memory)


@pytest.fixture(scope="module", params=["qwen", "smollm2"])
def real_model(request):
    try:
        path = testmodels.fetch_model(request.param)
    except testmodels.DownloadError as exc:
        pytest.skip(f"cannot download test model {request.param!r}: {exc}")
    return request.param, open_gguf(path)


def test_every_tensor_dequantizes_like_gguf_py(real_model):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    name, model = real_model
    registry = default_registry()
    checked: dict[str, int] = {}
    for t in model.tensors.values():
        fmt = registry.quant_format(t.ggml_type)
        assert fmt is not None, f"{t.name}: no plugin for {t.type_name}"
        rows = t.n_elements // t.shape[0]
        raw = np.asarray(t.data).reshape(rows, -1)
        step = max(1, ROWS_ELEMENTS // t.shape[0])
        for r0 in range(0, rows, step):
            chunk = raw[r0 : r0 + step]
            ours = fmt.dequantize(chunk, (chunk.shape[0], t.shape[0]))
            ref = dequantize(chunk, GGMLQuantizationType(t.ggml_type)).astype(np.float32, copy=False)
            assert ours.dtype == np.float32 and ours.shape == ref.shape, t.name
            if not np.array_equal(ours.view(np.uint32), ref.view(np.uint32)):
                bad = np.flatnonzero(ours.view(np.uint32) != ref.view(np.uint32))
                i = np.unravel_index(bad[0], ours.shape)
                pytest.fail(
                    f"{name} {t.name} ({t.type_name}) rows {r0}..: {bad.size} elements differ, first at "
                    f"{tuple(int(k) for k in i)}: ours {ours[i]!r}, gguf-py {ref[i]!r}"
                )
        checked[t.type_name] = checked.get(t.type_name, 0) + 1
    expected = {"qwen": {"Q4_K", "Q5_0", "Q6_K", "Q8_0", "F32"}, "smollm2": {"Q4_1", "Q8_0", "F32"}}[name]
    assert set(checked) == expected
    assert sum(checked.values()) == len(model.tensors)


def test_synthetic_plan_reproduces_the_real_tensor_table(real_model):
    """qwen2 (untied, like the Coder file) with recipe Q4_K_M and llama with recipe Q4_1 give exactly the
    real files' tensor names, shapes, types and order: the recipe logic matches llama-quantize's."""
    name, model = real_model
    if name == "qwen":
        vocab = testmodels.llama_cpp_models_dir() / "ggml-vocab-qwen2.gguf"
        plan = synth.build_plan("qwen2", "full", tied=False, vocab=vocab)
    else:
        plan = synth.build_plan("llama", "full", vocab=model.path)
    real = [(t.name, t.shape, t.type_name) for t in model.tensors.values()]
    ours = [(t.name, t.shape, t.type_name) for t in plan.tensors]
    assert ours == real
    arch = model.architecture
    encoded = dict(plan.metadata)  # key -> GGUF type id (u32) + value bytes
    for key in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
                "attention.head_count_kv", "rope.freq_base", "attention.layer_norm_rms_epsilon"):  # fmt: skip
        _kind, value = struct.unpack("<I" + {4: "I", 6: "f"}[encoded[f"{arch}.{key}"][0]], encoded[f"{arch}.{key}"])
        assert value == pytest.approx(model.metadata[f"{arch}.{key}"], rel=1e-6), key
