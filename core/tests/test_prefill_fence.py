"""A long prompt's served prefill keeps the host at most one chunk ahead of the device (Scheduler,
Device.fence), so a cancel checked between chunks stops it within about two chunks: without the wait,
a GPU backend's host queued every chunk at once and a cancel took effect only after the whole prompt
(bench_serve measured a cancel ~= the whole prefill: 161 ms on phi3, 174 on gpt-oss). Checked on the
reference backend (its fences are done at once) by logging the order of chunks, fences and waits."""

from __future__ import annotations

import pytest

from orcd_core import engine as engine_mod
from orcd_core.device import Fence
from orcd_core.engine import Engine
from orcd_core.generation import CancelToken, Cancelled, GenerationRequest, PreparedRequest, SamplingParams
from orcd_core.plugins import default_registry
from orcd_core.testing import synth

CHUNK = 8


@pytest.fixture(scope="module")
def eng(tmp_path_factory):
    path = tmp_path_factory.mktemp("fence") / "qwen2-tiny.gguf"
    synth.synthesize("qwen2", path, size="tiny", seed=3)
    e = Engine.load(path, backend="reference", registry=default_registry())
    yield e
    e.close()


def logged(eng, monkeypatch, log, on_chunk=None):
    monkeypatch.setattr(engine_mod, "PREFILL_CHUNK", CHUNK)
    real = eng.device.prefill_chunk
    n = [0]

    class Logged(Fence):
        def __init__(self, k):
            self.k = k

        def wait(self):
            log.append(("wait", self.k))

    def chunk(*a, **kw):
        n[0] += 1
        log.append(("chunk", n[0]))
        if on_chunk is not None:
            on_chunk(n[0])
        return real(*a, **kw)

    def fence():
        log.append(("fence", n[0]))
        return Logged(n[0])

    monkeypatch.setattr(eng.device, "prefill_chunk", chunk)
    monkeypatch.setattr(eng.device, "fence", fence)


def request(n_prompt, max_tokens=2):
    req = GenerationRequest(max_tokens=max_tokens, sampling=SamplingParams(temperature=0.0, seed=1))
    return PreparedRequest(request=req, prompt_ids=[(7 * i) % 50 + 3 for i in range(n_prompt)], n_ctx=256)


def test_each_chunk_waits_for_the_one_before_it(eng, monkeypatch):
    log = []
    logged(eng, monkeypatch, log)
    out = list(eng.run(request(4 * CHUNK + 3)))
    assert len(out) == 2
    prefill = [e for e in log if e[0] != "chunk" or e[1] <= 5]
    # chunks 1..4 are followed by a fence; from chunk 2 on, the previous chunk's fence is waited for;
    # the last chunk (5) samples the first token (that reads its logits: no fence needed)
    assert prefill == [("chunk", 1), ("fence", 1), ("chunk", 2), ("fence", 2), ("wait", 1), ("chunk", 3),
                       ("fence", 3), ("wait", 2), ("chunk", 4), ("fence", 4), ("wait", 3), ("chunk", 5)]


def test_a_cancel_during_prefill_stops_before_the_next_chunk(eng, monkeypatch):
    log, token = [], CancelToken()
    logged(eng, monkeypatch, log, on_chunk=lambda k: token.cancel() if k == 2 else None)
    with pytest.raises(Cancelled):
        list(eng.run(request(6 * CHUNK), token))
    assert max(k for what, k in log if what == "chunk") == 2
