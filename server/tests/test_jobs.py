"""Jobs' events between the engine thread and the event loop (orcd_server.jobs, orcd_server.worker):
a step's events, every job's, cross in one `call_soon_threadsafe`, in order, terminal events last."""

from __future__ import annotations

import asyncio
import json
import threading
import time

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


# -- the SSE side (orcd_server.app): events queued together go out in one write, the same bytes --------


def _srv(ping_s: float = 15.0):
    from types import SimpleNamespace

    cancels = []
    worker = SimpleNamespace(cancel=lambda job_id, reason: cancels.append((job_id, reason)))
    return SimpleNamespace(settings=SimpleNamespace(ping_interval_s=ping_s), worker=worker), cancels


@pytest.mark.parametrize("data", [
    {"t": "alpha ", "i": 0, "id": 7},
    {"t": "line\nbreak\r\nand\rcr", "i": 1, "id": 8, "logprob": -0.25, "top_logprobs": [{"id": 1, "logprob": -1.5}]},
    {"t": "日本 🙂 \u2028 \x00 \"quoted\"", "i": 2, "id": 9},
    {"code": "CANCELLED", "message": "job cancelled (client)", "retriable": False},
])
def test_sse_message_is_litestars_encoding_byte_for_byte(data):
    import msgspec
    from litestar.response.sse import ServerSentEventMessage
    from orcd_server.app import sse_message

    for name in ("token", "end", "error", "started"):
        assert sse_message(name, data) == ServerSentEventMessage(event=name,
                                                                 data=msgspec.json.encode(data).decode()).encode()


def test_events_queued_together_are_one_write_and_the_terminal_event_ends_it():
    from orcd_server.app import _events, sse_message

    async def main():
        loop = asyncio.get_running_loop()
        srv, cancels = _srv()
        job = Job(job_id="j", prepared=None, seed=0, n_prompt_tokens=1, loop=loop)
        writes = []
        gen = _events(srv, job)
        job.events.put_nowait(("started", {"job_id": "j"}))
        writes.append(await anext(gen))  # one event queued: one message
        for i in range(3):
            job.events.put_nowait(("token", {"i": i}))
        writes.append(await anext(gen))  # three queued: one write of the three
        job.events.put_nowait(("token", {"i": 3}))
        job.claim_terminal()
        job.events.put_nowait(("end", {"n": 4}))
        writes.append(await anext(gen))
        with pytest.raises(StopAsyncIteration):  # nothing after the terminal event
            await anext(gen)
        return writes, cancels

    writes, cancels = asyncio.run(main())
    assert writes == [sse_message("started", {"job_id": "j"}),
                      b"".join(sse_message("token", {"i": i}) for i in range(3)),
                      sse_message("token", {"i": 3}) + sse_message("end", {"n": 4})]
    assert cancels == []  # the job ended: leaving cancels nothing


def test_job_events_still_gives_one_event_at_a_time_and_a_disconnect_cancels():
    from orcd_server.app import job_events

    async def main():
        loop = asyncio.get_running_loop()
        srv, cancels = _srv(ping_s=0.01)
        job = Job(job_id="j", prepared=None, seed=0, n_prompt_tokens=1, loop=loop)
        for i in range(3):
            job.events.put_nowait(("token", {"i": i}))
        got = []
        gen = job_events(srv, job)
        for _ in range(4):
            got.append(await anext(gen))
        await gen.aclose()  # the consumer went away before the terminal event
        return got, cancels

    got, cancels = asyncio.run(main())
    assert got == [("token", {"i": 0}), ("token", {"i": 1}), ("token", {"i": 2}), None]  # then a ping
    assert cancels == [("j", "disconnect")]


def test_a_served_stream_is_the_same_bytes_as_one_message_per_event():
    """Over HTTP (uvicorn, fake engine, 3 jobs at once): the body parses (httpx-sse) to the events,
    and is byte for byte what Litestar writes for them one message at a time."""
    import httpx
    import httpx_sse
    import msgspec
    from litestar.response.sse import ServerSentEventMessage
    from orcd_server.app import ServerSettings, create_app
    from serve_helpers import ThreadServer

    app = create_app(ServerSettings(worker_id="w", model_ref="fake", backend="reference"),
                     FakeEngine.loader(step_s=0.002, max_batch=4))
    with ThreadServer(app) as srv:
        deadline = time.monotonic() + 10
        while httpx.get(f"{srv.url}/health").status_code != 200:
            assert time.monotonic() < deadline

        def one(k, out):
            body = {"job_id": f"j{k}", "prompt": "hi", "max_tokens": 40, "seed": k}
            with httpx.Client(base_url=srv.url, timeout=30) as c, c.stream("POST", "/execute", json=body) as r:
                out[k] = r.read()

        raws: dict[int, bytes] = {}
        threads = [threading.Thread(target=one, args=(k, raws)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for raw in raws.values():
        response = httpx.Response(200, content=raw, headers={"content-type": "text/event-stream"})
        events = list(httpx_sse.EventSource(response).iter_sse())
        assert [e.event for e in events] == ["started"] + ["token"] * 40 + ["end"]
        again = b"".join(ServerSentEventMessage(event=e.event, data=msgspec.json.encode(json.loads(e.data)).decode())
                         .encode() for e in events)
        assert raw == again


def test_the_ping_timer_is_moved_by_each_wait_and_a_cancel_still_ends_the_stream():
    """job_event_batches times the ping interval with one timer that re-arms itself for the current
    wait's deadline: events closer together than the interval give no ping, silence gives one after
    the interval, and a cancel of the reading task (a client disconnect) is not taken for a ping."""
    from orcd_server.app import job_event_batches

    async def main():
        loop = asyncio.get_running_loop()
        srv, cancels = _srv(ping_s=0.05)
        job = Job(job_id="j", prepared=None, seed=0, n_prompt_tokens=1, loop=loop)
        gen = job_event_batches(srv, job)
        got = []
        for i in range(8):  # 8 events 20 ms apart: each wait shorter than the interval
            loop.call_later(0.02, job.events.put_nowait, ("token", {"i": i}))
            got.append(await anext(gen))
        t0 = loop.time()
        got.append(await anext(gen))  # silence: a ping after the interval
        waited = loop.time() - t0
        reader = asyncio.ensure_future(anext(gen))
        await asyncio.sleep(0.01)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        return got, waited, cancels

    got, waited, cancels = asyncio.run(main())
    assert got == [[("token", {"i": i})] for i in range(8)] + [None]
    assert 0.045 <= waited < 0.5
    assert cancels == [("j", "disconnect")]
