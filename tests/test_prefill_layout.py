"""The layout of a captured prefill chunk (orcd_core.backends.cuda.planner: padded to its bucket, the
last real token moved to the final index, the pads at the positions after it) computes what the plain
chunk computes. Checked here on the reference backend (the NumPy oracle; its attention, like the CUDA
kernels, is causal by position, not by index), with the tiny models of the five architectures (gpt-oss
with its sliding-window ring): the last token's logits of a padded chunk equal the plain chunk's, and
the tokens after it see the same cache (the pads' keys are overwritten before anything reads them).
The CUDA graphs themselves are checked against op-by-op prefill in core/tests/backends/test_cuda_prefill.py.
Also: when a chunk can be padded into a cache (`graph_key`), and `Engine.load`'s warm-up (`Device.warm_up`,
where the CUDA backend captures the graphs) with a scratch cache, which running out of VRAM never fails."""

from __future__ import annotations

import numpy as np
import pytest
from gguf_builder import ARCHITECTURES, tiny_model

from orcd_core.backends.cuda.planner import PREFILL_BUCKETS, bucket, graph_key, layout
from orcd_core.device import MAX_STEP_TOKENS, Step
from orcd_core.engine import Engine
from orcd_core.plugins import default_registry
from orcd_core.shape import kv_rows


def test_every_chunk_length_has_a_bucket_that_pads_it_little():
    assert PREFILL_BUCKETS[-1] == MAX_STEP_TOKENS
    for n in range(1, MAX_STEP_TOKENS + 1):
        b = bucket(n)
        assert n <= b and b in PREFILL_BUCKETS
        assert b == PREFILL_BUCKETS[0] or b < 2 * n  # never more than twice the tokens
        if n > 64:
            assert b <= 1.5 * n
    for b in PREFILL_BUCKETS:
        assert bucket(b) == b
    with pytest.raises(ValueError):
        bucket(MAX_STEP_TOKENS + 1)


def test_the_layout_puts_the_last_token_last_and_the_pads_after_it():
    tok, pos = layout([11, 12, 13, 14, 15], 100, 8)
    assert tok.tolist() == [11, 12, 13, 14, 15, 15, 15, 15]
    assert pos.tolist() == [100, 101, 102, 103, 105, 106, 107, 104]
    tok, pos = layout([7, 8], 0, 2)  # exact: nothing padded
    assert tok.tolist() == [7, 8] and pos.tolist() == [0, 1]
    tok, pos = layout([9], 3, 16)
    assert tok.tolist() == [9] * 16 and pos[-1] == 3 and sorted(pos.tolist()) == list(range(3, 19))
    with pytest.raises(ValueError):
        layout([1, 2, 3], 0, 2)


def test_a_chunk_is_captured_only_where_its_pads_fit_the_cache():
    full = kv_rows(0, 1024)
    ring = kv_rows(128, 1024)  # the window plus MAX_STEP_TOKENS - 1: room for any step's pads
    key = graph_key(64, 0, 1024, [full, ring], [0, 128])
    assert key == (64, 1024, 2, (full, ring), (0, 128))
    assert graph_key(64, 960, 1024, [full, ring], [0, 128]) is not None  # ends at the context's last row
    assert graph_key(64, 961, 1024, [full, ring], [0, 128]) is None  # a pad would wrap past the context
    assert graph_key(64, 0, 1024, [full, 128], [0, 128]) is None  # a ring of the window alone
    assert graph_key(64, 0, 1024, [full, 64 + 128 - 1], [0, 128]) is not None
    assert graph_key(64, 0, 100, [100, 100], [0, 128]) is not None  # a window past the context: no ring


@pytest.fixture(scope="module", params=ARCHITECTURES)
def engine(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("layout") / f"{request.param}.gguf"
    path.write_bytes(tiny_model(request.param, seed=4).to_bytes())
    eng = Engine.load(path, backend="reference", registry=default_registry())
    yield eng
    eng.close()


# Logits of a padded chunk differ from the plain chunk's by rounding only: the GEMM path rounds
# activations to fp16, where a last-bit difference of a float32 sum (NumPy's blocking depends on the row
# count) moves a value by an fp16 step. Measured: ~3e-5 of the largest logit. A pad that a real token
# could see moves them by far more (the control below: > 10x the threshold).
REL = 1e-3


def rel_err(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def new_cache(engine):
    """A cache of the CUDA backend's layout: a sliding-window layer keeps a ring of the window plus
    MAX_STEP_TOKENS - 1 rows (`orcd_core.shape.kv_rows`), which the padded layout relies on (the pads
    overwrite ring rows no later query reads only when the ring holds the window and the whole step;
    the reference backend's own ring holds the window alone, its in-step keys are read from the step)."""
    c = engine.model.new_kv_cache(engine.n_ctx)
    rows = [kv_rows(w, c.n_ctx) for w in c.window]
    c.k = [np.zeros((r, c.n_kv_heads, c.head_dim), np.float16) for r in rows]
    c.v = [np.zeros((r, c.n_kv_heads, c.head_dim), np.float16) for r in rows]
    return c


def padded_chunk(engine, ids, start, cache, *, wrong=False):
    dev = engine.device
    Tb = bucket(len(ids))
    tok, pos = layout(ids, start, Tb)
    if wrong:  # the control: pads after the last real token in index order, at positions before its
        tok = np.concatenate([np.asarray(ids[:-1], np.int32), np.full(Tb - len(ids) + 1, ids[-1], np.int32)])
        pos = np.arange(start, start + Tb, dtype=np.int32)
    step = Step(Tb, dev.to_device(tok), dev.to_device(pos), dev.to_device([start]))
    dev.begin_step(prefill=True)
    return np.asarray(dev.to_host(engine.model.forward(step, cache, all_logits=False)), np.float32)


@pytest.mark.parametrize("prefix,n", [(0, 5), (0, 17), (9, 13), (0, 1), (3, 16)])
def test_a_padded_chunk_computes_the_plain_chunk(engine, prefix, n):
    rng = np.random.default_rng(prefix * 100 + n)
    vocab = int(engine.config.n_vocab)
    ids = rng.integers(0, vocab, prefix + n + 4).tolist()
    head, chunk, tail = ids[:prefix], ids[prefix : prefix + n], ids[prefix + n :]
    plain, padded = new_cache(engine), new_cache(engine)
    try:
        if head:
            engine.prefill(head, plain)
            engine.prefill(head, padded)
        want = np.asarray(engine.device.to_host(engine.prefill(chunk, plain, start_pos=prefix)), np.float32)
        got = padded_chunk(engine, chunk, prefix, padded)
        assert rel_err(got, want) <= REL
        # the next tokens, one by one, read the caches the two chunks left
        for i, t in enumerate(tail):
            at = prefix + n + i
            a = np.asarray(engine.device.to_host(engine.prefill([t], plain, start_pos=at)), np.float32)
            b = np.asarray(engine.device.to_host(engine.prefill([t], padded, start_pos=at)), np.float32)
            assert rel_err(b, a) <= REL
    finally:
        engine.device.free_kv_cache(plain)
        engine.device.free_kv_cache(padded)


def test_the_threshold_tells_a_wrong_layout(engine):
    """The control: pads at the last real token's position and before (the plain index order padded at
    the end) leak into its logits far beyond REL, so the test above can fail."""
    rng = np.random.default_rng(5)
    chunk = rng.integers(0, int(engine.config.n_vocab), 13).tolist()
    plain, wrong = new_cache(engine), new_cache(engine)
    try:
        want = np.asarray(engine.device.to_host(engine.prefill(chunk, plain)), np.float32)
        got = padded_chunk(engine, chunk, 0, wrong, wrong=True)
        assert rel_err(got, want) > 10 * REL
    finally:
        engine.device.free_kv_cache(plain)
        engine.device.free_kv_cache(wrong)


def test_the_load_warms_the_device_up_with_a_cache_of_the_engines_layout(tmp_path, monkeypatch):
    """`Engine.load` hands `Device.warm_up` the model's forward and a scratch cache of the engine's
    context, frees the cache after, and goes on loading when the warm-up runs out of VRAM (the backend
    then prepares itself at the first requests)."""
    from orcd_core.backends.reference import ReferenceDevice
    from orcd_core.generation import VramOOM

    path = tmp_path / "qwen2.gguf"
    path.write_bytes(tiny_model("qwen2", seed=4).to_bytes())
    seen = []

    def warm_up(self, forward, cache):
        seen.append((cache.n_ctx, self.memory_report()["kv_cache"] > 0))
        logits = forward(Step(1, self.to_device([1]), self.to_device([0]), self.to_device([0])), cache)
        assert np.asarray(logits).shape[-1] > 0
        raise VramOOM("the warm-up's pool does not fit", required=1, available=0)

    monkeypatch.setattr(ReferenceDevice, "warm_up", warm_up)
    eng = Engine.load(path, backend="reference", registry=default_registry(), max_context=64)
    try:
        assert seen == [(64, True)]
        assert eng.device.memory_report()["kv_cache"] == 0  # the scratch cache is freed
        assert eng.n_ctx == 64
    finally:
        eng.close()
