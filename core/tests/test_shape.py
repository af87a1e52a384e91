"""`orcd_core.shape`: one ModelShape per config, one KV-cache byte count for planner, inspect and serve."""

from __future__ import annotations

import pytest

from orcd_core.device import MAX_STEP_TOKENS
from orcd_core.shape import ModelShape, kv_bytes, kv_rows, max_context_for, resolve_context


def shape(**kw) -> ModelShape:
    base = dict(n_layer=2, n_embd=64, n_vocab=100, context_length=1024, n_head=4, n_head_kv=(2, 2), head_dim_k=16,
                head_dim_v=16, kv_windows=(0, 0), ffn_width=128)
    return ModelShape(**{**base, **kw})


def test_kv_bytes_counts_fp16_k_and_v_per_layer():
    assert kv_bytes(shape(), 1024) == 2 * 2 * (1024 * 2 * 16 * 2)
    # per-layer KV heads are summed, not the largest taken for every layer
    assert kv_bytes(shape(n_head_kv=(1, 4)), 1024) == (1024 * 1 * 16 * 2) * 2 + (1024 * 4 * 16 * 2) * 2
    # K and V head sizes count separately
    assert kv_bytes(shape(head_dim_v=32), 1024) == 2 * (1024 * 2 * 16 * 2 + 1024 * 2 * 32 * 2)


def test_sliding_window_layers_hold_a_ring():
    n_ctx, window = 100_000, 129  # 640 rows: buffers already aligned
    windowed = kv_bytes(shape(kv_windows=(window, 0)), n_ctx)
    full = kv_bytes(shape(), n_ctx)
    assert kv_rows(window, n_ctx) == window + MAX_STEP_TOKENS - 1
    assert windowed == full // 2 + 2 * kv_rows(window, n_ctx) * 2 * 16 * 2
    assert kv_rows(window, 10) == 10  # never more rows than the context


def test_each_buffer_is_256_byte_aligned():
    one = shape(n_layer=1, n_head_kv=(1,), kv_windows=(0,), head_dim_k=2, head_dim_v=2)
    assert kv_bytes(one, 1) == 2 * 256


def test_max_context_for_is_the_largest_fitting_context():
    s = shape()
    for budget in (1 << 16, 1 << 20, 7 << 20):
        n = max_context_for(s, budget)
        assert kv_bytes(s, n) <= budget < kv_bytes(s, n + 1)
    assert max_context_for(s, 10) == 0
    every_layer_windowed = shape(kv_windows=(8, 8))
    assert max_context_for(every_layer_windowed, 1 << 30, limit=5000) == 5000


def test_resolve_context():
    assert resolve_context(None, None) == 4096
    assert resolve_context(100, None) == 100 and resolve_context(None, 200) == 200
    assert resolve_context(300, 200) == 200


def test_shape_checks_its_per_layer_lengths():
    with pytest.raises(ValueError, match="2 layers"):
        shape(n_head_kv=(2,))
