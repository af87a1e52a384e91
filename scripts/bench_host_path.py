#!/usr/bin/env python3
"""The served host path per decode step, on the CPU: everything outside the device's forward.

    python3 scripts/bench_host_path.py [--streams 8] [--tokens 256] [--gpu-ms 2.2] [--mode inproc|http|both]
                                       [--rounds 3] [--stop TEXT] [--profile engine|loop|all OUT.prof]

The real Scheduler (orcd_core.scheduler, with its IncrementalDetokenizer and StopMatcher per row), the
real EngineWorker / Outbox hand-off (server/worker.py, jobs.py) and the real SSE encoding (app._events)
run with a fake device: the prefill and the first token are instant, and the batch decoder's step
(`FakeDecoder`) models a pipelined GPU (as backends/cuda/graph.py does: step k + 1 is launched before
step k's tokens are waited for) whose every step takes `--gpu-ms` (0: instant). Its tokens are a real
text's ids under the real qwen2 vocabulary (ggml-vocab-qwen2.gguf from the test-model cache,
${ORCD_CACHE_DIR:-~/.cache/orcd-worker}), a different offset per stream, English, code, CJK and emoji
(code points split across tokens), so detokenizing and stop matching do their real work.

- inproc: the engine thread (EngineWorker) and an asyncio loop in the main thread that reads every job's
  events through app._events (the bytes /execute writes), no HTTP;
- http: the worker app (create_app) in this process under uvicorn, as `orcd-worker serve` runs it
  (sys.setswitchinterval included), `--streams` client processes each reading one /execute stream.

Per decode step (an iteration of the engine thread that decoded rows), it prints
- engine thread: the wall time of Scheduler.step less the fake device's step, the time handing the
  events over (the worker's orcd_engine_events_seconds), and the thread's CPU time per step;
- event loop: the loop thread's CPU time per step (SSE encoding, and in http mode Litestar + uvicorn).
The wall figures include waiting for the GIL while the other thread holds it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from pathlib import Path

TEXT = (
    "def fibonacci(n: int) -> int:\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
    "    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "The quick brown fox jumps over the lazy dog. Continuous batching keeps the GPU busy while "
    "several clients stream their tokens; each request sees only its own text. "
    "日本語のテキストも少し混ぜます。東京は日本の首都です。 Emoji too: 🙂🚀🎉 — naïve café, "
    "Ünïcödé façade. {\"key\": [1, 2, 3], \"nested\": {\"a\": null}}\n"
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i * i); }\n"
) * 4


# -- the fake engine ---------------------------------------------------------------------------------


def qwen2_tokenizer():
    from orcd_core.gguf_file import open_gguf
    from orcd_core.testmodels import llama_cpp_models_dir
    from orcd_core.tokenizer import load_tokenizer

    return load_tokenizer(open_gguf(llama_cpp_models_dir() / "ggml-vocab-qwen2.gguf"))


class FakeDecoder:
    """A BatchDecoder whose device is a pipelined GPU taking `gpu_s` a step: step() launches the next
    step (when no row runs out of budget, as the graph decoder), then waits until the oldest issued one
    is done. Tokens: `script[(offset + step_index) % len(script)]` per row."""

    def __new__(cls, *a, **k):
        from orcd_core.device import BatchDecoder

        if cls is FakeDecoder:  # (a subclass of the real abstract class, made once)
            cls = type("FakeDecoder", (FakeDecoder, BatchDecoder), {})
        return object.__new__(cls)

    def __init__(self, device, forward, *, max_rows, script, gpu_s):
        from orcd_core.device import BatchDecoder

        BatchDecoder.__init__(self, device, forward, max_rows=max_rows)
        self.script, self.gpu_s = script, gpu_s
        self.flight: deque = deque()  # (rows, finish time) of issued steps
        self.gpu_free = 0.0
        self.device_s = 0.0  # the last step()'s whole time (the device's share of Scheduler.step)
        self.release_gil = os.environ.get("BENCH_LAUNCH_RELEASES_GIL") == "1"

    def _launch(self):
        if self.release_gil:
            time.sleep(0)  # (a GIL-releasing call, as CuPy's graph launch and its CUDA calls are)
        now = time.perf_counter()
        self.gpu_free = max(now, self.gpu_free) + self.gpu_s
        self.flight.append((list(self.rows), self.gpu_free))
        self.changed = False

    def step(self):
        t_in = time.perf_counter()
        if not self.flight:
            if not self.rows:
                return []
            self._launch()
        if not self.changed and len(self.flight) == 1 and all(r.budget is None or r.budget >= 1 for r in self.rows):
            self._launch()
        rows, done_at = self.flight.popleft()
        t0 = time.perf_counter()
        if done_at > t0:
            time.sleep(done_at - t0)  # (releases the GIL, as a CUDA event wait does)
        self.wait_s = time.perf_counter() - t0
        members = {id(r) for r in self.rows}
        out = []
        for r in rows:
            if id(r) in members:
                tok = self.script[(r.cache.offset + r.step_index) % len(self.script)]
                if r.budget is not None:
                    r.budget -= 1
                r.advance(tok)
                out.append((r, tok))
        self.device_s = time.perf_counter() - t_in
        return out

    def leave(self, row):
        from orcd_core.device import BatchDecoder

        BatchDecoder.leave(self, row)
        if not self.rows:
            self.flight.clear()


class _Cache:
    def __init__(self, n_ctx, offset):
        self.n_ctx, self.offset = n_ctx, offset


class FakeDevice:
    name = "fake"

    def __init__(self, engine):
        self.engine = engine

    def logits_last(self, logits):
        return logits

    def to_device(self, x):
        return x

    def to_host(self, x):
        import numpy as np

        return np.asarray(x)

    def sample(self, last, params, recent, step):
        return [last]  # (the prefill's "logits" are the first token)

    def free_kv_cache(self, cache):
        pass

    def batch_decoder(self, forward, *, max_rows):
        eng = self.engine
        eng.decoder = FakeDecoder(self, forward, max_rows=max_rows, script=eng.script, gpu_s=eng.gpu_s)
        return eng.decoder


class FakeModel:
    def __init__(self, engine):
        self.engine = engine
        self.n = 0

    def new_kv_cache(self, n_ctx):
        self.n += 1
        return _Cache(n_ctx, offset=self.n * 37)


class HostPathEngine:
    """orcd_core.engine.Engine's interface for the scheduler and the server, with the fake device."""

    def __init__(self, *, gpu_s: float, max_batch: int, n_ctx: int = 32768):
        from orcd_core.engine import Engine

        self.tokenizer = qwen2_tokenizer()
        ids = [i for i in self.tokenizer.encode(TEXT, add_special=False) if i not in set(self.tokenizer.eog_ids)]
        self.script = ids
        self.gpu_s, self.max_batch, self.n_ctx = gpu_s, max_batch, n_ctx
        self.device, self.model = FakeDevice(self), FakeModel(self)
        self.decoder = None
        self.model_name, self.architecture, self.backend = "fake-qwen2", "qwen2", "fake"
        self._scheduler = None
        self._prepare = Engine.prepare

    def prepare(self, request):
        return self._prepare(self, request)

    def prefill(self, ids, cache, start_pos=0):
        return self.script[cache.offset % len(self.script)]

    def decode_forward(self, step, kv):  # (never called: the fake decoder has no forward)
        raise AssertionError

    @property
    def scheduler(self):
        from orcd_core.scheduler import Scheduler

        if self._scheduler is None:
            self._scheduler = Scheduler(self, self.max_batch)
        return self._scheduler

    def info(self):
        return {"model": self.model_name, "architecture": "qwen2", "quant_kind": "F32", "tokenizer_kind": "gpt2",
                "vocab_size": self.tokenizer.vocab_size, "context_length": self.n_ctx, "vram_bytes_used": 0,
                "resident": True, "backend": "fake", "sm": None, "cuda_runtime_version": None}

    def close(self):
        if self._scheduler is not None:
            self._scheduler.close()


# -- what is measured --------------------------------------------------------------------------------


class Probe:
    """Per engine-thread iteration that decoded rows: Scheduler.step's wall time less the fake
    device's step, the worker's events hand-off time; CPU clocks of the engine and loop threads."""

    def __init__(self, engine: HostPathEngine):
        self.engine = engine
        self.host_s: list[float] = []
        self.events_s: list[float] = []
        self.rows: list[int] = []
        self.engine_tid = None
        self.profiler = None  # (cProfile.Profile, on) for the engine thread: flipped at its next step
        self._profiling = False

    def install(self, worker_cls):
        probe = self

        class ProbedWorker(worker_cls):
            def _observe_step(self, sched, step_s, events_s):
                super()._observe_step(sched, step_s, events_s)
                probe.engine_tid = threading.get_ident()
                if probe.profiler is not None and probe.profiler[1] != probe._profiling:
                    probe._profiling = probe.profiler[1]
                    probe.profiler[0].enable() if probe._profiling else probe.profiler[0].disable()
                if sched.last_rows:
                    probe.host_s.append(step_s - probe.engine.decoder.device_s)
                    probe.events_s.append(events_s)
                    probe.rows.append(sched.last_rows)

        return ProbedWorker

    def reset(self):
        self.host_s.clear()
        self.events_s.clear()
        self.rows.clear()


def cpu_clock(tid) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(tid))


def sys_time(native_id) -> float:
    """The thread's system (kernel) CPU seconds so far (/proc, clock ticks)."""
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[12]) / os.sysconf("SC_CLK_TCK")


def summary(probe: Probe, engine_cpu: float, loop_cpu: float, wall: float, loop_sys: float) -> dict:
    n = len(probe.host_s)
    return {
        "loop_sys_us_per_step": round(loop_sys / n * 1e6, 1) if n else None,
        "steps": n,
        "rows_mean": round(statistics.fmean(probe.rows), 2) if n else 0,
        "engine_sched_host_us": round(statistics.fmean(probe.host_s) * 1e6, 1) if n else None,
        "engine_sched_host_p50_us": round(statistics.median(probe.host_s) * 1e6, 1) if n else None,
        "engine_events_us": round(statistics.fmean(probe.events_s) * 1e6, 1) if n else None,
        "engine_cpu_us_per_step": round(engine_cpu / n * 1e6, 1) if n else None,
        "loop_cpu_us_per_step": round(loop_cpu / n * 1e6, 1) if n else None,
        "wall_ms_per_step": round(wall / n * 1e3, 3) if n else None,
    }


def body(i: int, tokens: int, stop: str | None) -> dict:
    b = {"job_id": f"s{i}-{uuid.uuid4().hex[:8]}", "prompt": " hello" * 16, "max_tokens": tokens,
         "temperature": 0.0, "seed": i}
    if stop:
        b["stop"] = [stop]
    return b


# -- in process --------------------------------------------------------------------------------------


def run_inproc(args, profiler=None) -> list[dict]:
    from orcd_server import app as app_mod
    from orcd_server import schemas
    from orcd_server.jobs import JobQueue
    from orcd_server.logging import get_logger
    from orcd_server.metrics import Metrics
    from orcd_server.worker import SWITCH_INTERVAL_S, EngineWorker

    engine = HostPathEngine(gpu_s=args.gpu_ms / 1e3, max_batch=args.streams)
    probe = Probe(engine)
    queue = JobQueue(64)
    metrics = Metrics(queued=lambda: 0, running=lambda: 0, vram_bytes=lambda: 0)
    log = get_logger("bench")
    worker = probe.install(EngineWorker)(loader=lambda progress: engine, queue=queue, metrics=metrics, log=log,
                                         inference_timeout_s=600, shutdown_timeout_s=5)
    settings = app_mod.ServerSettings(worker_id="bench", model_ref="fake", backend="fake")
    srv = app_mod.ServerState(settings, worker, queue, metrics, log)
    worker.start()  # (sets the switch interval, as serve does)
    assert sys.getswitchinterval() == SWITCH_INTERVAL_S
    while not worker.ready:
        time.sleep(0.01)
    results = []

    async def one_round():
        loop = asyncio.get_running_loop()
        jobs = []
        for i in range(args.streams):
            b = body(i, args.tokens, args.stop)
            req = schemas.decode(json.dumps(b).encode(), schemas.ExecuteRequest)
            prepared = engine.prepare(app_mod._generation_request(req, args.tokens, i))
            jobs.append(app_mod.Job(job_id=req.job_id, prepared=prepared, seed=i,
                                    n_prompt_tokens=len(prepared.prompt_ids), loop=loop, log=log.bind(job_id=req.job_id)))

        async def read(job):
            n = 0
            async for chunk in app_mod._events(srv, job):  # (the bytes /execute writes)
                n += len(chunk if isinstance(chunk, bytes) else chunk.encode())
            return n

        readers = [asyncio.ensure_future(read(j)) for j in jobs]
        for j in jobs:
            queue.submit(j)
        return sum(await asyncio.gather(*readers))

    for r in range(args.rounds + 1):  # (round 0: warm-up)
        probe.reset()
        main_tid = threading.get_ident()
        c_loop, s_loop = cpu_clock(main_tid), sys_time(threading.get_native_id())
        t0 = time.perf_counter()
        last = profiler is not None and r == args.rounds
        if last:
            profiler[1].enable() if profiler[0] == "loop" else setattr(probe, "profiler", (profiler[1], True))
        n_bytes = asyncio.run(one_round())
        if last:
            profiler[1].disable() if profiler[0] == "loop" else setattr(probe, "profiler", (profiler[1], False))
        wall = time.perf_counter() - t0
        loop_cpu = cpu_clock(main_tid) - c_loop
        loop_sys = sys_time(threading.get_native_id()) - s_loop
        eng_cpu = probe_engine_cpu(probe, r)
        if r:
            results.append({**summary(probe, eng_cpu, loop_cpu, wall, loop_sys), "bytes": n_bytes})
    worker.begin_shutdown("bench")
    worker.join(10)
    return results


_engine_cpu_start: dict = {}


def probe_engine_cpu(probe: Probe, r: int) -> float:
    """The engine thread's CPU time since the last call (the first call counts from its start)."""
    now = cpu_clock(probe.engine_tid)
    last = _engine_cpu_start.get(probe.engine_tid, 0.0)
    _engine_cpu_start[probe.engine_tid] = now
    return now - last


# -- over HTTP ---------------------------------------------------------------------------------------

CLIENT = r"""
import socket, sys, json, time
port, payload = int(sys.argv[1]), sys.argv[2].encode()
go = sys.stdin.readline()
s = socket.create_connection(("127.0.0.1", port))
s.sendall(b"POST /execute HTTP/1.1\r\nhost: 127.0.0.1:%d\r\ncontent-type: application/json\r\n"
          b"content-length: %d\r\n\r\n" % (port, len(payload)) + payload)
buf = bytearray()
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    buf += chunk
    if b"event: end" in buf[-4096:] or b"event: error" in buf[-4096:]:
        if buf.endswith(b"0\r\n\r\n"):
            break
if len(sys.argv) > 3:
    open(sys.argv[3], "wb").write(bytes(buf))
sys.stdout.write(str(len(buf)))
"""


def run_http(args, profiler=None) -> list[dict]:
    import uvicorn

    from orcd_server.app import ServerSettings, create_app
    from orcd_server import worker as worker_mod
    from orcd_server.commands.serve import GIL_SWITCH_INTERVAL_S

    engine = HostPathEngine(gpu_s=args.gpu_ms / 1e3, max_batch=args.streams)
    probe = Probe(engine)
    real_worker = worker_mod.EngineWorker
    from orcd_server import app as app_mod

    app_mod.EngineWorker = probe.install(real_worker)  # (the app builds its worker in its lifespan)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    settings = ServerSettings(worker_id="bench", model_ref="fake", backend="fake", queue_size=64)
    app = create_app(settings, lambda progress: engine)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on"))
    loop_tid = {}

    def serve():
        loop_tid["tid"], loop_tid["native"] = threading.get_ident(), threading.get_native_id()
        server.run(sockets=[sock])

    th = threading.Thread(target=serve, name="uvicorn", daemon=True)
    th.start()
    while not (server.started and getattr(app.state, "orcd", None) and app.state.orcd.worker.ready):
        time.sleep(0.02)
    results = []
    for r in range(args.rounds + 1):
        dump = args.dump if args.dump and r == args.rounds else None
        procs = [subprocess.Popen([sys.executable, "-c", CLIENT, str(port), json.dumps(body(i, args.tokens, args.stop)),
                                   *([f"{dump}.{i}"] if dump else [])],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                 for i in range(args.streams)]
        time.sleep(0.3)  # (the clients' interpreters start)
        probe.reset()
        c_loop, s_loop = cpu_clock(loop_tid["tid"]), sys_time(loop_tid["native"])
        if probe.engine_tid is not None:
            probe_engine_cpu(probe, r)
        t0 = time.perf_counter()
        last = profiler is not None and r == args.rounds
        if last:
            if profiler[0] == "loop":
                _profile_thread(app.state.orcd.loop, profiler[1], True)
            else:
                probe.profiler = (profiler[1], True)
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        n_bytes = sum(int(p.communicate()[0] or 0) for p in procs)
        wall = time.perf_counter() - t0
        if last:
            if profiler[0] == "loop":
                _profile_thread(app.state.orcd.loop, profiler[1], False)
            else:
                probe.profiler = (profiler[1], False)
        loop_cpu = cpu_clock(loop_tid["tid"]) - c_loop
        loop_sys = sys_time(loop_tid["native"]) - s_loop
        eng_cpu = probe_engine_cpu(probe, r)
        if r:
            results.append({**summary(probe, eng_cpu, loop_cpu, wall, loop_sys), "bytes": n_bytes})
    server.should_exit = True
    th.join(20)
    app_mod.EngineWorker = real_worker
    return results


def _profile_thread(loop, profiler, on: bool) -> None:
    """cProfile the event loop's thread (enabled from inside it)."""
    done = threading.Event()

    def flip():
        profiler.enable() if on else profiler.disable()
        done.set()

    loop.call_soon_threadsafe(flip)
    done.wait(5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--gpu-ms", type=float, default=2.2, help="the fake GPU's step (ms); 0: instant")
    ap.add_argument("--mode", choices=("inproc", "http", "both"), default="both")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stop", default=None, help="a stop sequence for every request (never matched by the text)")
    ap.add_argument("--profile", nargs=2, metavar=("WHAT", "OUT"),
                    help="cProfile the last round's WHAT thread: 'loop' (the event loop's) or 'engine'")
    ap.add_argument("--json", default=None)
    ap.add_argument("--dump", default=None, help="http: write each stream's raw response of the last round to DUMP.i")
    args = ap.parse_args()
    os.environ.setdefault("ORCD_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".models" / "cache"))
    import logging

    from orcd_server.logging import configure_logging

    configure_logging(stream=sys.stderr, level=logging.WARNING)  # (per job only; quiet here)
    prof = (args.profile[0], cProfile.Profile()) if args.profile else None
    out = {"streams": args.streams, "tokens": args.tokens, "gpu_ms": args.gpu_ms, "stop": args.stop}
    modes = ["inproc", "http"] if args.mode == "both" else [args.mode]
    for mode in modes:
        runs = (run_inproc if mode == "inproc" else run_http)(args, prof)
        out[mode] = runs
        keys = [k for k in runs[0] if k not in ("bytes",)]
        med = {k: statistics.median(r[k] for r in runs) for k in keys}
        out[mode + "_median"] = med
        print(f"{mode}: {args.streams} streams x {args.tokens} tokens, fake GPU step {args.gpu_ms} ms, "
              f"{len(runs)} rounds (median): {med['steps']} decode steps of {med['rows_mean']} rows; "
              f"bytes {runs[-1]['bytes']}")
        print(f"  engine thread: Scheduler.step host {med['engine_sched_host_us']} us "
              f"(p50 {med['engine_sched_host_p50_us']}), events hand-off {med['engine_events_us']} us, "
              f"CPU {med['engine_cpu_us_per_step']} us per step")
        print(f"  event loop:    CPU {med['loop_cpu_us_per_step']} us per step (kernel {med['loop_sys_us_per_step']});  wall {med['wall_ms_per_step']} ms per step")
    if prof is not None:
        prof[1].dump_stats(args.profile[1])
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
