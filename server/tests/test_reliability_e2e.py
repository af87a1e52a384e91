"""Cancel storm, faults and a short soak (issue 16), end to end: `orcd-worker serve` in a subprocess
on the reference backend with a tiny synthetic llama (serve_helpers.tiny_model: a token in 2-10 ms,
by the machine), real HTTP on loopback.

- storm: 100 concurrent streams, half cut by the client hanging up after 0.5 s, half by POST /cancel;
  every kept stream ends with exactly one terminal event, the running/queued gauges return to 0 and
  a new request completes within 5 s;
- SIGTERM mid-stream: the stream ends with `error` CANCELLED "(shutdown)", exit 0 within the drain;
- a client killed (SIGKILL) while its long prompt is in prefill: the job is cancelled, the next
  request is served.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from serve_helpers import ProcessServer, collect, metric_value, tiny_model

N_STREAMS = 100
CUT_AFTER_S = 0.5
NEXT_REQUEST_LIMIT_S = {"reference": 5.0, "cuda": 1.0}
DRAIN_S = 1.0


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("tiny"))


def cuda_model() -> Path:
    """For the storm on the GPU: a synthetic Qwen2.5-0.5B-shaped file (~700 tokens/s on an H200, so a
    1,500-token stream outlives the 0.5 s before it is cut, as on the reference backend)."""
    from orcd_core.testing import synth
    from orcd_core.testing.cuda import require_cuda_gpu

    require_cuda_gpu()
    path = Path(os.environ.get("ORCD_SYNTH_DIR", "/tmp")) / "storm-qwen2-full.gguf"
    if not path.exists():
        synth.synthesize("qwen2", path, size="full", seed=5)
    return path


def serve(model: Path, log_dir: Path, *extra: str, backend: str = "reference") -> ProcessServer:
    srv = ProcessServer(["--backend", backend, "--model", str(model), "--log-format", "json", *extra], log_dir).start()
    srv.wait_ready(120)
    return srv


def gauges(url: str) -> tuple[float, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return metric_value(text, "orcd_requests_running"), metric_value(text, "orcd_requests_queued")


async def _storm(url: str) -> dict:
    limits = httpx.Limits(max_connections=N_STREAMS + 10, max_keepalive_connections=N_STREAMS + 10)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        terminals: dict[str, list[str]] = {}
        cancel_latency: list[float] = []

        async def stream(i: int) -> None:
            job_id = f"storm-{i}"
            body = {"job_id": job_id, "prompt": f"Storm number {i}", "max_tokens": 1500, "seed": i}
            async with client.stream("POST", "/execute", json=body) as response:
                assert response.status_code == 200, await response.aread()
                if i % 2 == 0:  # hang up after 0.5 s
                    try:
                        async with asyncio.timeout(CUT_AFTER_S):
                            async for _line in response.aiter_lines():
                                pass
                    except TimeoutError:
                        return
                    raise AssertionError(f"{job_id}: the stream ended by itself before the client hung up")
                seen: list[str] = []
                terminals[job_id] = seen

                async def cancel_later() -> float:
                    await asyncio.sleep(CUT_AFTER_S)
                    t0 = time.perf_counter()
                    r = await client.post("/cancel", json={"job_id": job_id})
                    assert r.status_code == 202 and r.json()["status"] in ("removed", "cancelling"), r.text
                    return t0

                canceller = asyncio.create_task(cancel_later())
                async for line in response.aiter_lines():
                    if line.startswith("event: ") and line[7:] in ("end", "error"):
                        seen.append(line[7:])
                    elif line.startswith("data: ") and seen and len(seen) == 1 and "code" in line:
                        seen.append(json.loads(line[6:])["code"])
                t0 = await canceller
                cancel_latency.append(time.perf_counter() - t0)

        await asyncio.gather(*(stream(i) for i in range(N_STREAMS)))
        return {"terminals": terminals, "cancel_latency": sorted(cancel_latency)}


@pytest.mark.parametrize("backend", [pytest.param("reference"), pytest.param("cuda", marks=pytest.mark.gpu)])
def test_cancel_storm(model, tmp_path, backend):
    """Then a new request completes within 5 s on the reference backend, within 1 s on cuda."""
    limit_s = NEXT_REQUEST_LIMIT_S[backend]
    srv = serve(model if backend == "reference" else cuda_model(), tmp_path, "--queue-size", str(N_STREAMS + 8),
                "--max-context", "2048", "--max-tokens-out", "1500", backend=backend)
    try:
        t0 = time.perf_counter()
        result = asyncio.run(_storm(srv.url))
        storm_s = time.perf_counter() - t0
        kept = result["terminals"]
        assert len(kept) == N_STREAMS // 2
        # exactly one terminal event each: an `error` with code CANCELLED
        bad = {job: seen for job, seen in kept.items() if seen != ["error", "CANCELLED"]}
        assert not bad, bad
        t1 = time.perf_counter()
        with httpx.Client(base_url=srv.url, timeout=limit_s) as c:
            events = collect(c, {"job_id": "after-storm", "prompt": "Hello", "max_tokens": 8, "seed": 1})
        after_s = time.perf_counter() - t1
        assert events[-1][0] == "end" and after_s < limit_s, (after_s, events[-1])
        deadline = time.monotonic() + 5
        while gauges(srv.url) != (0.0, 0.0) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gauges(srv.url) == (0.0, 0.0)
        ends = [r for r in srv.logs() if r.get("event") == "execute_end"]
        assert sum(1 for r in ends if r.get("outcome") == "cancelled") == N_STREAMS
        lat = result["cancel_latency"]
        print(f"storm: {storm_s:.1f} s; next request {after_s * 1000:.0f} ms; cancel -> terminal event "
              f"p50 {lat[len(lat) // 2] * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms")
    finally:
        assert srv.stop() == 0


def test_sigterm_mid_stream_ends_the_stream_and_exits_0(model, tmp_path):
    srv = serve(model, tmp_path, "--shutdown-timeout-sec", str(DRAIN_S), "--max-context", "2048",
                "--max-tokens-out", "2000")
    events = []
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        def on_event(name, data):
            if name == "token" and data["i"] == 2:
                srv.proc.send_signal(signal.SIGTERM)
                on_event.t0 = time.perf_counter()
            return False

        # greedy: the tiny model never samples its EOS after this prompt, so the stream's 2,000 tokens
        # outlive the drain (~4 s of decoding on the 2-core CI box). Sampled (seed 2) it stopped at EOS
        # after 179 tokens, within the 1 s drain once the reference backend reached ~200 tok/s.
        events = collect(c, {"job_id": "sigterm", "prompt": "Hello", "max_tokens": 2000, "temperature": 0},
                         on_event=on_event)
    code = srv.proc.wait(DRAIN_S + 10)
    exit_s = time.perf_counter() - on_event.t0
    name, data = events[-1]
    assert name != "end", f"the stream finished within the {DRAIN_S:g} s drain, so nothing was cut: {data}"
    assert name == "error" and data["code"] == "CANCELLED" and "shutdown" in data["message"] and data["retriable"]
    assert sum(1 for n, _ in events if n in ("end", "error")) == 1
    assert code == 0
    assert exit_s < DRAIN_S + 5.0, exit_s
    print(f"SIGTERM -> exit 0 in {exit_s:.2f} s with a {DRAIN_S:g} s drain")


CLIENT = """
import sys, httpx
body = {"job_id": "prefill", "prompt": sys.argv[2], "max_tokens": 50, "seed": 4}
with httpx.Client(base_url=sys.argv[1], timeout=120) as c:
    with c.stream("POST", "/execute", json=body) as r:
        for line in r.iter_lines():
            print(line, flush=True)
"""


def test_client_killed_during_prefill(model, tmp_path):
    srv = serve(model, tmp_path, "--max-context", "2048", "--max-tokens-out", "64")
    try:
        prompt = " ".join(f"word{i}" for i in range(400))  # ~1,500 tokens: prefill takes seconds here
        client = subprocess.Popen([sys.executable, "-c", CLIENT, srv.url, prompt], stdout=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while not any(r.get("event") == "execute_start" for r in srv.logs()):
            assert time.monotonic() < deadline and client.poll() is None
            time.sleep(0.01)
        client.send_signal(signal.SIGKILL)  # the job is in prefill: its `started` is sent, no token yet
        t_kill = time.perf_counter()
        client.wait()
        deadline = time.monotonic() + 60
        while gauges(srv.url) != (0.0, 0.0):
            assert time.monotonic() < deadline, "the killed client's job never ended"
            time.sleep(0.05)
        ends = [r for r in srv.logs() if r.get("event") == "execute_end" and r.get("job_id") == "prefill"]
        assert len(ends) == 1 and ends[0]["outcome"] == "cancelled" and "disconnect" in ends[0]["message"], ends
        start = next(r for r in srv.logs() if r.get("event") == "execute_start" and r.get("job_id") == "prefill")
        print(f"killed in prefill of {start['n_prompt_tokens']} tokens: job ended {time.perf_counter() - t_kill:.2f} s "
              "after the kill")
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            assert collect(c, {"job_id": "next", "prompt": "Hello", "max_tokens": 4, "seed": 1})[-1][0] == "end"
    finally:
        assert srv.stop() == 0
