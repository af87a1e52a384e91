"""Prefill chunks replayed as CUDA graphs (backends/cuda/prefill.py) against the same chunks run op by
op, on the synthetic full-width 2-layer cuts of qwen2 / phi3 (Q4_K_M) and gpt-oss (MXFP4 experts,
sliding-window rings):
- a chunk of every kind (the bucket's exact length, padded, after a prefix, one token, the decode-GEMV
  bucket) gives the op-by-op chunk's logits within REL, and so do the tokens after it (they read the
  cache the chunk wrote: the pads never show);
- the load captures every bucket of the engine's cache layout, gpt-oss's too (its grouped MoE prefill
  reads nothing back to the host);
- a bucket's first chunk (run op by op before its capture) gives bitwise the logits of its replays;
- a replayed chunk serves any sequence (another cache, another start) and its returned logits stay
  valid while the next chunk replays;
- the graphs' pool stays within the planned bytes.
"""

from __future__ import annotations

import numpy as np
import pytest

from orcd_core.backends.cuda.planner import PREFILL_BUCKETS, bucket
from orcd_core.testing.cuda import load_engine, require_cuda_gpu, synth_cut, synth_dir  # noqa: F401 (a fixture)

pytestmark = pytest.mark.gpu
cupy = require_cuda_gpu()

# Graph and op-by-op chunks run the same kernels; they differ where a padded chunk's GEMMs have more
# rows (cuBLAS may pick another algorithm: another summation order, then another fp16 rounding of the
# next activation). Relative to the largest logit, as the reference comparisons of the CUDA backend.
REL = 1e-2
CASES = [(0, 512), (0, 300), (40, 57), (0, 1), (5, 8), (3, 20), (100, 128)]


@pytest.fixture(scope="module", params=["qwen2", "phi3", "gpt-oss"])
def engine(request, synth_dir):
    eng = load_engine(synth_cut(synth_dir, request.param), "cuda", max_context=1024, max_batch=2)
    yield eng
    eng.close()


def rel_err(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def logits(engine, ids, cache, start):
    return np.asarray(engine.device.to_host(engine.prefill(ids, cache, start_pos=start)), np.float32)


def chunk_then_tokens(engine, ids, prefix, n, graphs: bool):
    """Last logits of the chunk ids[prefix:prefix+n] (after an op-by-op prefix) and of the 3 tokens
    after it (op by op), with the chunk as a graph replay (run 3 times: op by op, captured, replayed) or
    op by op."""
    pg = engine.device.prefill_graphs
    out = None
    for _ in range(3 if graphs else 1):
        cache = engine.model.new_kv_cache(engine.n_ctx)
        try:
            pg.off = True
            if prefix:
                logits(engine, ids[:prefix], cache, 0)
            pg.off = not graphs
            first = logits(engine, ids[prefix : prefix + n], cache, prefix)
            pg.off = True
            after = [logits(engine, [t], cache, prefix + n + i) for i, t in enumerate(ids[prefix + n : prefix + n + 3])]
            out = [first, *after]
        finally:
            pg.off = False
            engine.device.free_kv_cache(cache)
    return out


@pytest.mark.parametrize("prefix,n", CASES)
def test_a_replayed_chunk_gives_the_op_by_op_logits(engine, prefix, n):
    rng = np.random.default_rng(prefix + 7 * n)
    ids = rng.integers(0, int(engine.config.n_vocab), prefix + n + 3).tolist()
    pg = engine.device.prefill_graphs
    replays = pg.replays
    want = chunk_then_tokens(engine, ids, prefix, n, graphs=False)
    got = chunk_then_tokens(engine, ids, prefix, n, graphs=True)
    for i, (g, w) in enumerate(zip(got, want)):
        assert rel_err(g, w) <= REL, f"logits {i} (0: the chunk's last token) differ by {rel_err(g, w):.2e}"
    assert pg.replays >= replays + 2  # captured at the second run at the latest, replayed at the third


def test_a_graph_serves_other_sequences_and_its_logits_outlive_the_next_replay(engine):
    """Two caches, chunks of the same bucket at different starts, interleaved: each sequence's logits
    are its own op-by-op logits, and logits returned by one replay survive the next replay."""
    pg = engine.device.prefill_graphs
    rng = np.random.default_rng(11)
    V = int(engine.config.n_vocab)
    a_ids, b_ids = rng.integers(0, V, 64).tolist(), rng.integers(0, V, 64).tolist()
    n = 30

    def run(graphs):
        caches = [engine.model.new_kv_cache(engine.n_ctx) for _ in range(2)]
        try:
            pg.off = not graphs
            for _ in range(2):  # warm: op by op, then captured (graphs on)
                c = engine.model.new_kv_cache(engine.n_ctx)
                engine.prefill(a_ids[:n], c)
                engine.device.free_kv_cache(c)
            before = pg.replays
            la = engine.prefill(a_ids[:n], caches[0])
            lb = engine.prefill(b_ids[:n], caches[1])  # replays over la's graph buffer
            la2 = engine.prefill(a_ids[n : 2 * n], caches[0], start_pos=n)
            return [np.asarray(engine.device.to_host(x), np.float32) for x in (la, lb, la2)], pg.replays - before
        finally:
            pg.off = False
            for c in caches:
                engine.device.free_kv_cache(c)

    (want, n_off), (got, n_on) = run(False), run(True)
    assert (n_off, n_on) == (0, 3)
    for g, w in zip(got, want):
        assert rel_err(g, w) <= REL


def test_the_load_captured_every_bucket_of_the_engines_layout(engine):
    """`Engine.load` warms the graphs up (Device.warm_up): every bucket of the engine's cache layout is
    captured at load before the first request (gpt-oss's grouped MoE prefill too)."""
    pg = engine.device.prefill_graphs
    captured = {k[0] for k in pg.graphs if k[1] == engine.n_ctx}
    assert captured == set(PREFILL_BUCKETS) and not pg.failed, pg.failed


def test_the_first_chunk_of_a_bucket_computes_what_its_replays_compute(engine):
    """A cache layout the load did not warm (another context): its first chunk runs the graph's ops one
    by one, the second is captured, the third replays; all three give bitwise-equal logits, so a
    request's tokens never depend on whether its chunk was the first of its length."""
    pg = engine.device.prefill_graphs
    n_ctx = engine.n_ctx // 2
    ids = np.random.default_rng(3).integers(0, int(engine.config.n_vocab), 40).tolist()
    out = []
    for _ in range(3):
        cache = engine.model.new_kv_cache(n_ctx)
        try:
            out.append(logits(engine, ids, cache, 0))
        finally:
            engine.device.free_kv_cache(cache)
    assert np.array_equal(out[0], out[1]) and np.array_equal(out[1], out[2])
    assert any(k[1] == n_ctx and k[0] == bucket(40) for k in pg.graphs)


def test_the_graphs_pool_stays_within_its_plan(engine):
    pg = engine.device.prefill_graphs
    assert pg.reserve_bytes > 0
    assert 0 < pg.nbytes <= pg.reserve_bytes * 1.25, (pg.nbytes, pg.reserve_bytes)
    assert set(k[0] for k in pg.graphs) <= set(PREFILL_BUCKETS)
