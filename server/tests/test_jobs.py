"""Jobs' events between the engine thread and the event loop (orcd_server.jobs, orcd_server.worker):
a step's events, every job's, cross in one `call_soon_threadsafe`, in order, terminal events last."""

from __future__ import annotations

import asyncio
import threading

import pytest
from fake_engine import FakeEngine
from orcd_server import jobs as jobs_module
from orcd_server.jobs import Job, JobQueue, Outbox
from orcd_server.logging import get_logger
from orcd_server.metrics import Metrics
from orcd_server.worker import EngineWorker


def _count_handoffs(loop: asyncio.AbstractEventLoop) -> list[int]:
    """The loop's `call_soon_threadsafe` calls that carry jobs' events, each as how many events (the
    others, such as asyncio.to_thread's, are not counted)."""
    calls: list[int] = []
    real = loop.call_soon_threadsafe

    def counting(callback, *args, **kw):
        if callback is jobs_module._deliver_all:
            calls.append(len(args[0]))
        elif getattr(callback, "__func__", None) is Job._deliver:
            calls.append(1)
        return real(callback, *args, **kw)

    loop.call_soon_threadsafe = counting
    return calls


def _drain(job: Job) -> list[tuple[str, dict]]:
    out = []
    while not job.events.empty():
        out.append(job.events.get_nowait())
    return out


def test_an_outbox_hands_several_jobs_events_over_in_one_call_in_order():
    async def main():
        loop = asyncio.get_running_loop()
        calls = _count_handoffs(loop)
        terminals = []
        jobs = [Job(job_id=f"j{k}", prepared=None, seed=0, n_prompt_tokens=1, loop=loop,
                    on_terminal=lambda job, name, data: terminals.append((job.job_id, name))) for k in range(3)]
        outbox = Outbox()

        def engine_step(i: int, last: bool):
            before = len(calls)
            for job in jobs:
                assert job.emit("token", {"i": i}, outbox)
                if last and job.claim_terminal():
                    assert job.emit("end", {"n": i + 1}, outbox)
                    assert not job.emit("token", {"i": i + 1}, outbox)  # nothing after the terminal event
            assert len(calls) == before  # nothing crossed before the flush
            outbox.flush()

        for i in range(4):
            await asyncio.to_thread(engine_step, i, i == 3)
        outbox.flush()  # an empty outbox hands nothing over
        await asyncio.sleep(0)
        assert calls == [3, 3, 3, 6]
        for job in jobs:
            assert _drain(job) == [("token", {"i": 0}), ("token", {"i": 1}), ("token", {"i": 2}),
                                   ("token", {"i": 3}), ("end", {"n": 4})]
        assert terminals == [("j0", "end"), ("j1", "end"), ("j2", "end")]

    asyncio.run(main())


def test_a_failing_delivery_does_not_stop_the_others():
    async def main():
        loop = asyncio.get_running_loop()
        errors = []
        loop.set_exception_handler(lambda _loop, context: errors.append(context["exception"]))

        def boom(job, name, data):
            raise RuntimeError("callback failed")

        bad = Job(job_id="bad", prepared=None, seed=0, n_prompt_tokens=1, loop=loop, on_terminal=boom)
        good = Job(job_id="good", prepared=None, seed=0, n_prompt_tokens=1, loop=loop)
        outbox = Outbox()
        for job in (bad, good):
            job.claim_terminal()
            job.emit("error", {"code": "X"}, outbox)
        outbox.flush()
        await asyncio.sleep(0.01)
        assert _drain(good) == [("error", {"code": "X"})] and _drain(bad) == [("error", {"code": "X"})]
        assert [str(e) for e in errors] == ["callback failed"]

    asyncio.run(main())


@pytest.mark.parametrize("n_jobs", [1, 3])
def test_the_engine_thread_hands_a_steps_events_over_once(n_jobs):
    """`started` crosses at once (a prefill may follow), then one hand-off per step carries every
    running job's token (and, at the last step, its `end`): 1 + n_tokens calls per job before."""
    n_tokens = 5

    async def main():
        loop = asyncio.get_running_loop()
        calls = _count_handoffs(loop)
        queue = JobQueue(8)
        loader = FakeEngine.loader(step_s=0.001, max_batch=4)
        log = get_logger("orcd.test")
        worker = EngineWorker(loader=loader, queue=queue, log=log, inference_timeout_s=30, shutdown_timeout_s=5,
                              metrics=Metrics(queued=lambda: queue.n_waiting, running=lambda: queue.n_running,
                                              vram_bytes=lambda: 0))
        jobs = []
        for k in range(n_jobs):  # queued before the engine starts: they start in the same step
            prepared = FakeEngine().prepare(_request(n_tokens, seed=k))
            jobs.append(Job(job_id=f"j{k}", prepared=prepared, seed=k, n_prompt_tokens=len(prepared.prompt_ids),
                            loop=loop, log=log))
            queue.submit(jobs[-1])
        worker.start()
        events = {job.job_id: [] for job in jobs}
        for job in jobs:
            while not events[job.job_id] or events[job.job_id][-1][0] not in ("end", "error"):
                events[job.job_id].append(await asyncio.wait_for(job.events.get(), 10))
        worker.begin_shutdown("test")
        await asyncio.to_thread(worker.join, 10)
        return calls, events

    calls, events = asyncio.run(main())
    for evs in events.values():
        assert [name for name, _ in evs] == ["started"] + ["token"] * n_tokens + ["end"]
        assert [data["i"] for name, data in evs if name == "token"] == list(range(n_tokens))
    assert calls == [1] * n_jobs + [n_jobs] * (n_tokens - 1) + [2 * n_jobs]


def _request(max_tokens: int, seed: int):
    from orcd_core.generation import GenerationRequest, SamplingParams

    return GenerationRequest(prompt="hello", max_tokens=max_tokens, sampling=SamplingParams(seed=seed))


def test_job_emit_without_an_outbox_still_crosses_at_once():
    """Other threads (a cancel of a queued job, shutdown) send their one terminal event directly."""
    async def main():
        loop = asyncio.get_running_loop()
        calls = _count_handoffs(loop)
        job = Job(job_id="j", prepared=None, seed=0, n_prompt_tokens=1, loop=loop)
        job.claim_terminal()
        threading.Thread(target=job.emit, args=("error", {"code": "CANCELLED"})).start()
        assert await asyncio.wait_for(job.events.get(), 5) == ("error", {"code": "CANCELLED"})
        assert calls == [1]

    asyncio.run(main())
