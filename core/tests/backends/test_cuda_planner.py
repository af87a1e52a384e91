"""The CUDA backend's VRAM plan (backends/cuda/planner.py), computed without a GPU: each part of a
model's load is what the device reserves for it (KV caches per sequence slot through
`orcd_core.shape.kv_bytes`, sliding windows included; every tensor aligned in the weight arena), and
the planner imports without CuPy."""

from __future__ import annotations

import subprocess
import sys

import pytest

from orcd_core import testmodels
from orcd_core.backends.cuda import planner
from orcd_core.gguf_file import check_supported, open_gguf
from orcd_core.kernels.constants import GEMV_MAX_T
from orcd_core.plugins import default_registry
from orcd_core.shape import ALLOCATION_ALIGNMENT, kv_bytes
from orcd_core.testing import synth


@pytest.fixture(scope="module", params=["qwen2", "gpt-oss"])
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / f"{request.param}.gguf"
    vocab = None if request.param != "gpt-oss" else testmodels.llama_cpp_models_dir() / "ggml-vocab-gpt-2.gguf"
    synth.synthesize(request.param, path, size="tiny", layers=2, seed=1, vocab=vocab)
    m = open_gguf(path)
    return m, check_supported(m, default_registry()).config(m).shape()


def test_the_plan_is_the_sum_of_its_aligned_parts(model):
    m, shape = model
    tensors = list(m.tensors.values())
    plan = planner.plan_load(tensors, shape, n_ctx=256, n_seq=3)
    parts = (plan.weights, plan.kv, plan.workspace, plan.prefill_pool, plan.prefill_graphs, plan.scratch)
    assert plan.total == sum(parts) and all(p > 0 for p in parts)
    assert all(p % ALLOCATION_ALIGNMENT == 0 for p in (plan.workspace, plan.prefill_pool, plan.prefill_graphs, plan.scratch))
    # the weight arena holds every tensor at an aligned offset, plus float32 copies of the 1-D ones
    assert plan.tensor_bytes == sum(t.nbytes for t in tensors)
    assert plan.weights >= sum(-(-t.nbytes // ALLOCATION_ALIGNMENT) * ALLOCATION_ALIGNMENT for t in tensors)
    assert plan.weights >= plan.tensor_bytes + sum(t.n_elements * 4 for t in tensors if len(t.shape) == 1)
    # the dequantize scratch fits the largest matrix as fp16 up to its cap; expert stacks take none (their
    # prefill GEMM decodes the weights as it reads them)
    biggest = max(t.n_elements * 2 for t in tensors if len(t.shape) == 2)
    want = min(biggest, planner.DEQUANT_SCRATCH_BYTES)
    assert want <= plan.scratch < want + ALLOCATION_ALIGNMENT
    text = plan.describe()
    assert f"KV cache {plan.kv} for 3 x 256 positions" in text and str(plan.weights) in text


def test_kv_is_per_sequence_slot_with_the_shapes_windows(model):
    _, shape = model
    one = planner.plan_load([], shape, n_ctx=512, n_seq=1)
    eight = planner.plan_load([], shape, n_ctx=512, n_seq=8)
    assert one.kv == kv_bytes(shape, 512) and eight.kv == 8 * one.kv
    assert planner.plan_load([], shape, n_ctx=512, n_seq=0).n_seq == 1  # at least one slot
    if any(shape.kv_windows):  # gpt-oss: the sliding-window layers keep a bounded ring
        assert kv_bytes(shape, 4096) < 8 * kv_bytes(shape, 512)


def test_the_decode_workspace_grows_with_the_model_not_with_the_context(model):
    _, shape = model
    a = planner.plan_load([], shape, n_ctx=64)
    b = planner.plan_load([], shape, n_ctx=4096)
    assert a.workspace == b.workspace and a.prefill_pool == b.prefill_pool
    # a captured step keeps each op's output for up to GEMV_MAX_T rows of every layer
    per_row_layer = 4 * (shape.n_embd + shape.ffn_width + shape.qkv_width)
    assert a.workspace >= GEMV_MAX_T * shape.n_layer * per_row_layer


def test_the_planner_imports_without_cupy():
    code = ("import sys; import orcd_core.backends.cuda.planner; "
            "assert 'cupy' not in sys.modules, 'the planner imported CuPy'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_decode_attention_splits_cover_every_span_under_a_bound():
    """planner.decode_splits (the split of a decode query that sees `span` keys, attention.cuh's
    ad_chunk): its splits hold the span and no empty split, the split is AD_CHUNK_MIN * 2^k up to
    AD_CHUNK, AD_SPLITS splits at most unless the split is AD_CHUNK; decode_grid_splits(bound) is the
    most splits any span <= bound takes (a launch bounded so runs every split each of its rows needs),
    for every span of the largest context; decode_span_bound is a power of two >= what is needed, or
    the context."""
    from orcd_core.backends.cuda.planner import (SPAN_MIN, decode_grid_splits, decode_span_bound,
                                                 decode_splits)
    from orcd_core.kernels.constants import AD_CHUNK, AD_CHUNK_MIN, AD_MAX_SPLITS, AD_SPLITS

    most, seen = 0, set()
    for span in range(1, AD_CHUNK * AD_MAX_SPLITS + 1):
        chunk, S = decode_splits(span)
        assert chunk * (S - 1) < span <= chunk * S, span
        assert AD_CHUNK_MIN <= chunk <= AD_CHUNK and chunk & (chunk - 1) == 0, span
        assert S <= AD_SPLITS or chunk == AD_CHUNK, span
        most = max(most, S)
        if span & (span - 1) == 0 or span % 977 == 0:
            assert decode_grid_splits(span) == most, span
        seen.add(chunk)
    assert most == AD_MAX_SPLITS and len(seen) >= 2
    assert decode_splits(8192) == (AD_CHUNK_MIN, 64) and decode_splits(8193) == (256, 33)
    for need, n_ctx in [(1, 4096), (513, 4096), (5000, 4096), (8193, 32768), (32768, 32768), (700, 600)]:
        b = decode_span_bound(need, n_ctx)
        assert b == n_ctx or (b >= need and b >= SPAN_MIN and b & (b - 1) == 0), (need, n_ctx)
        assert b <= n_ctx and (b >= need or b == n_ctx)
