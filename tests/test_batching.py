"""Continuous batching (orcd_core.scheduler) on the reference backend, with the tiny models of the five
architectures (tests/support/gguf_builder.py; gpt-oss with its sliding-window ring and its experts):
sequences decoded together, joining and leaving at different steps, give exactly the ids, text and
finish reason each gives alone; a cancelled or failed sequence leaves without disturbing the others;
a long prompt is prefilled a chunk per step while the others keep decoding; KV memory returns to zero."""

from __future__ import annotations

import pytest
from engine_runs import collect as alone
from gguf_builder import ARCHITECTURES, tiny_model

import orcd_core.engine as engine_mod
from orcd_core.engine import Engine
from orcd_core.generation import (
    Cancelled,
    CancelToken,
    GeneratedToken,
    GenerationError,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
)
from orcd_core.plugins import default_registry

PROMPTS = ["the one", "a b c d e f", "zz", "hello there, how are you", "x", "the end of the line is near"]
PARAMS = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0.8, top_k=20, seed=7),
    SamplingParams(temperature=1.0, top_p=0.9, min_p=0.05, repetition_penalty=1.3, repetition_window=8, seed=11),
    SamplingParams(temperature=0, repetition_penalty=1.5),
    SamplingParams(temperature=1.2, seed=2**63 + 5),
    SamplingParams(temperature=0.7, top_k=5, top_p=0.5, seed=3),
]


@pytest.fixture(scope="module", params=ARCHITECTURES)
def engine(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("batch") / f"{request.param}.gguf"
    path.write_bytes(tiny_model(request.param, seed=3).to_bytes())
    eng = Engine.load(path, backend="reference", registry=default_registry(), max_batch=4)
    yield eng
    eng.close()


def requests(n_ctx: int) -> list[GenerationRequest]:
    max_tokens = [12, 5, 20, 9, 1, 16]
    return [GenerationRequest(prompt=p, max_tokens=min(m, n_ctx // 2), sampling=s,
                              stop=("zz",) if i == 3 else ())
            for i, (p, s, m) in enumerate(zip(PROMPTS, PARAMS, max_tokens))]


def drive(engine, submissions, *, cancel_after=None):
    """submissions: [(step at which to submit, request, cancel token or None)]. Returns per request
    (tokens, terminal event) and the number of steps."""
    sched = engine.scheduler
    seqs, out, step = {}, {}, 0
    pending = list(enumerate(submissions))
    while pending or sched.busy:
        for i, (at, req, cancel) in list(pending):
            if at <= step:
                seqs[sched.submit(engine.prepare(req), cancel)] = i
                out[i] = ([], None)
                pending.remove((i, (at, req, cancel)))
        for seq, event in sched.step():
            i = seqs[seq]
            if isinstance(event, GeneratedToken):
                assert out[i][1] is None
                out[i][0].append(event)
                if cancel_after is not None and cancel_after[0] == i and len(out[i][0]) == cancel_after[1]:
                    submissions[i][2].cancel()
            else:
                out[i] = (out[i][0], event)
        step += 1
        assert step < 500
    return out, step


def test_batched_sequences_give_the_tokens_they_give_alone(engine):
    reqs = requests(engine.n_ctx)
    single = [alone(engine, r) for r in reqs]
    # four at once (max_batch 4: the fifth and sixth wait for a place), the last two joining later
    batched, _ = drive(engine, [(0, reqs[0], None), (0, reqs[1], None), (0, reqs[2], None), (2, reqs[3], None),
                                (3, reqs[4], None), (5, reqs[5], None)])
    for i, ((want_tokens, want), (tokens, got)) in enumerate(zip(single, [batched[j] for j in range(len(reqs))])):
        assert isinstance(got, GenerationResult), (i, got)
        assert got.ids == want.ids and got.text == want.text and got.finish_reason == want.finish_reason, i
        assert [t.id for t in tokens] == [t.id for t in want_tokens] and "".join(t.text for t in tokens) == got.text
        assert [t.index for t in tokens] == list(range(len(tokens)))
    assert any(len(r.ids) > 3 for _, r in single)  # the comparison covers real decoding
    assert engine.device.memory_report()["kv_cache"] == 0


def test_a_cancelled_sequence_leaves_and_the_others_go_on(engine):
    reqs = requests(engine.n_ctx)
    reqs[0] = GenerationRequest(prompt=PROMPTS[0], max_tokens=min(30, engine.n_ctx // 2), sampling=PARAMS[0])
    eos_free = [r for r in reqs[:3]]
    single = [alone(engine, r) for r in eos_free]
    cancel = CancelToken()
    if len(single[0][1].ids) < 4:
        pytest.skip("the tiny model ends this prompt before a cancel could land mid-decode")
    subs = [(0, eos_free[0], cancel), (0, eos_free[1], None), (1, eos_free[2], None)]
    out, _ = drive(engine, subs, cancel_after=(0, 2))
    tokens, terminal = out[0]
    assert isinstance(terminal, Cancelled) and terminal.code == "CANCELLED"
    assert 2 <= len(tokens) < len(single[0][1].ids)
    assert [t.id for t in tokens] == single[0][1].ids[: len(tokens)]
    for i in (1, 2):
        assert isinstance(out[i][1], GenerationResult) and out[i][1].ids == single[i][1].ids
    assert engine.device.memory_report()["kv_cache"] == 0


def test_a_long_prompt_is_prefilled_a_chunk_per_step_while_others_decode(engine, monkeypatch):
    monkeypatch.setattr(engine_mod, "PREFILL_CHUNK", 4)  # (the engine's and the scheduler's chunk)
    long_req = GenerationRequest(prompt="one two three four five six seven eight nine ten eleven twelve",
                                 max_tokens=3, sampling=PARAMS[0])
    short = GenerationRequest(prompt="x", max_tokens=min(40, engine.n_ctx // 2), sampling=PARAMS[1])
    want_long, want_short = alone(engine, long_req)[1], alone(engine, short)[1]
    n_prompt = len(engine.prepare(long_req).prompt_ids)
    assert n_prompt > 8
    sched = engine.scheduler
    s_short = sched.submit(engine.prepare(short))
    sched.step()  # short: prefilled, first token sampled, joined the batch
    s_long = sched.submit(engine.prepare(long_req))
    per_step = []
    got = {s_short: [], s_long: []}
    while sched.busy:
        events = sched.step()
        per_step.append((len(s_short.out_ids), s_long.state))
        for s, e in events:
            got[s].append(e)
    prefill_steps = [n for n, state in per_step if state == "prefill"]  # short's tokens after each such step
    n_chunks = -(-n_prompt // 4)
    assert len(prefill_steps) >= n_chunks - 1
    if len(want_short.ids) > n_chunks + 1:  # the short stream took a token at every step of the long prefill
        assert prefill_steps == list(range(prefill_steps[0], prefill_steps[0] + len(prefill_steps)))
    assert got[s_short][-1].ids == want_short.ids and got[s_long][-1].ids == want_long.ids


def test_a_failing_sequence_fails_alone(engine, monkeypatch):
    """A VRAM_OOM at the KV allocation of one request (the device's error) ends that request only."""
    from orcd_core.generation import VramOOM

    reqs = requests(engine.n_ctx)[:3]
    single = [alone(engine, r) for r in reqs]
    real = engine.model.new_kv_cache
    calls = {"n": 0}

    def flaky(n_ctx):
        calls["n"] += 1
        if calls["n"] == 2:
            raise VramOOM("no room for the KV cache (test)")
        return real(n_ctx)

    monkeypatch.setattr(engine.model, "new_kv_cache", flaky)
    out, _ = drive(engine, [(0, r, None) for r in reqs])
    assert isinstance(out[1][1], GenerationError) and out[1][1].code == "VRAM_OOM" and out[1][0] == []
    for i in (0, 2):
        assert out[i][1].ids == single[i][1].ids
    assert engine.device.memory_report()["kv_cache"] == 0


def test_each_step_reports_its_decode_rows(engine, monkeypatch):
    """`Scheduler.last_rows` (the server's orcd_decode_batch_rows): over a run, the decode rows add up
    to the tokens sampled in decode steps (every emitted token after a sequence's first, plus an
    end-of-generation id sampled there, which is not emitted); the reference's decoder cannot tell
    waiting from working (`last_wait_s` 0)."""
    monkeypatch.setattr(engine_mod, "PREFILL_CHUNK", 4)
    reqs = requests(engine.n_ctx)[:3]
    sched = engine.scheduler
    seqs = [sched.submit(engine.prepare(r)) for r in reqs]
    rows = steps = 0
    results = {}
    while sched.busy:
        for seq, event in sched.step():
            if isinstance(event, GenerationResult):
                results[seq] = event
        rows += sched.last_rows
        assert sched.last_wait_s == 0.0
        steps += 1
    want = sum(max(0, len(results[s].ids) - 1) + (1 if results[s].finish_reason == "stop" and results[s].ids else 0)
               for s in seqs)
    assert rows == want and rows > 0 and steps > 1


def test_short_prompts_that_arrive_together_join_in_one_step(engine, monkeypatch):
    """Each step prefills one chunk of each prefilling sequence, oldest first, while the chunks fit in
    PREFILL_CHUNK tokens together: three short prompts submitted together all decode after the first
    step, and give the tokens they give alone; a chunk that does not fit waits for the next step, and a
    later short prompt does not overtake an earlier long one."""
    monkeypatch.setattr(engine_mod, "PREFILL_CHUNK", 8)
    sched = engine.scheduler

    def req(n, seed):
        return GenerationRequest(prompt_ids=tuple((5 * i + seed) % 40 + 3 for i in range(n)), max_tokens=6,
                                 sampling=PARAMS[seed % len(PARAMS)])

    shorts = [req(2, 1), req(3, 2), req(3, 3)]  # 8 tokens together
    single = [alone(engine, r)[1] for r in shorts]
    seqs = [sched.submit(engine.prepare(r)) for r in shorts]
    done = {}

    def step():
        for s, e in sched.step():
            if not isinstance(e, GeneratedToken):
                done[s] = e

    step()
    assert [s.n_prefilled for s in seqs] == [2, 3, 3]
    assert all(s.state in ("decode", "done") for s in seqs)
    while sched.busy:
        step()
    assert [done[s].ids for s in seqs] == [w.ids for w in single]

    # a 20-token prompt, then a 3-token one: steps 1 and 2 run a chunk of the long one each (no room
    # left), step 3 its last 4 tokens and the short one's 3
    s_long, s_short = sched.submit(engine.prepare(req(20, 4))), sched.submit(engine.prepare(req(3, 5)))
    states = []
    while sched.busy:
        step()
        states.append((s_long.n_prefilled, s_short.n_prefilled))
    assert states[:3] == [(8, 0), (16, 0), (20, 3)]
    assert engine.device.memory_report()["kv_cache"] == 0
