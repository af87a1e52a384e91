"""Which decode GEMV the CUDA device launches, and with which K split (backends/cuda/planner.py: no
CuPy, so checked here, without a GPU; the kernels themselves are checked against the NumPy reference
and for batch invariance in core/tests/backends/test_cuda_ops.py, marker `gpu`)."""

from __future__ import annotations

import pytest

from orcd_core.backends.cuda.planner import (DECODE_GEMVS, decode_gemv, gemv_tc_k_split, prefill_attention_tc,
                                             prefill_attention_tc_smem)
from orcd_core.kernels.constants import GEMV_TC_WARPS


def test_every_engine_decodes_on_the_int8_kernels_alone_or_batched():
    # one kind for one row and a batch: a row's bits do not depend on the rows beside it (docs/perf-notes.md)
    assert decode_gemv(90) == "q8" and decode_gemv(80) == "q8" and decode_gemv(75) == "q8"


def test_the_override_names_a_kernel_the_gpu_has():
    assert decode_gemv(90, "ffma") == "ffma" and decode_gemv(90, "tc") == "tc"
    with pytest.raises(ValueError, match="one of tc, ffma, q8"):
        decode_gemv(90, "fast")
    with pytest.raises(ValueError, match="compute capability 8.0"):
        decode_gemv(75, "tc")
    assert decode_gemv(75, "ffma") == "ffma"
    assert set(DECODE_GEMVS) == {"tc", "ffma", "q8"}


@pytest.mark.parametrize("N, K, want", [
    (128, 896, 8), (896, 896, 8), (1152, 896, 8),  # qwen2 k/v, o, q|k|v: a slab a warp
    (896, 4864, 8),  # qwen2 down: 38 slabs over 8 warps
    (9728, 896, 2),  # qwen2 gate|up: 608 tiles, halved to at most 2,048 warps
    (151936, 896, 1),  # qwen2 output head: 9,496 tiles
    (37, 96, 1), (37, 256, 2), (37, 384, 4),  # as many warps as slabs, at most GEMV_TC_WARPS
])
def test_the_k_split(N, K, want):
    ks = gemv_tc_k_split(N, K)
    assert ks == want
    assert ks in (1, 2, 4, 8) and ks <= GEMV_TC_WARPS


def test_the_k_split_depends_on_the_weight_only():
    """A row's sums must not depend on how many rows share a launch: the split is a function of N and K
    (the launcher passes no row count), and every split divides the 8 slabs a staged chunk holds."""
    import inspect

    assert list(inspect.signature(gemv_tc_k_split).parameters) == ["N", "K"]
    for N in (1, 16, 100, 5000, 200000):
        for K in (32, 288, 896, 3072, 5152, 8192):
            assert 8 % gemv_tc_k_split(N, K) == 0


def test_prefill_attention_runs_on_the_tensor_cores_for_the_head_dims_it_has():
    assert prefill_attention_tc(90, 64) and prefill_attention_tc(80, 96) and prefill_attention_tc(90, 128)
    assert not prefill_attention_tc(75, 64)  # no fp16 mma.m16n8k16 with ldmatrix before sm_80: the FMA kernel
    assert not prefill_attention_tc(90, 80) and not prefill_attention_tc(90, 256)  # not instantiated
    # Q and two buffers of K and V, 64 rows each of hd + 8 halves; within the 227 KB an SM gives a block
    assert [prefill_attention_tc_smem(hd) for hd in (64, 96, 128)] == [46080, 66560, 87040]
