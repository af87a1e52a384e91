#!/usr/bin/env python3
"""What a client of `orcd-worker serve` gets, measured over HTTP on this machine (127.0.0.1 only).

    python3 scripts/bench_serve.py MODEL.gguf [--backend cuda] [--port 8181] [--json OUT.json]
    python3 scripts/bench_serve.py --url http://127.0.0.1:8080 [...]     (a worker already running)

Figures (each a bounded number of requests):
- ttft p50/p99 (ms): request sent -> first `token` event, `max_tokens` 1, prompts of ~32, ~512 and
  ~2048 tokens (the `started` event's n_prompt_tokens is reported);
- stream tok/s: one stream of `--tokens` (256) greedy tokens, tokens after the first over the time
  after the first; beside it `orcd-worker bench` tg of the same file in the same run (in-process);
- health/metrics p50/p99 (ms) while a stream runs;
- aggregate tok/s with 1, 4, 8, 16 concurrent streams (up to --max-batch decode together, continuous
  batching; the worker queues the rest), and each against one stream; each stream is read by a
  process of its own, and beside it the sum of the streams' own decode rates as the engine reports
  them (a gap between the two is lost on the served path, not in the engine);
- cancel latency (ms): POST /cancel during the prefill of a ~2048-token prompt -> the terminal event.

With `--llama-server EXE` (built from the vendored llama.cpp: `scripts/bench_vs_llama.py` builds it
beside llama-bench), the same aggregate runs against llama-server on the same file afterwards, alone
on the GPU (`-ngl 99 -fa on --parallel <--max-batch>`, each slot the worker's context; its streaming
/completion with `ignore_eos`, so every stream generates --tokens), and the table gives the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import uuid

import httpx

# the worker's CLI under this interpreter (the environment the script runs in, as `orcd-worker` is)
WORKER = [sys.executable, "-c", "import sys; from orcd_server.cli import main; sys.exit(main())"]
WORD = " hello"  # ~1 token per repetition in BPE vocabularies


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


_local = threading.local()


def client() -> httpx.Client:
    """This thread's HTTP client, kept open (keep-alive) as a streaming client keeps its connection:
    making an httpx.Client builds an SSL context (20-50 ms of CPU), which a TTFT figure must not count."""
    c = getattr(_local, "client", None)
    if c is None:
        c = _local.client = httpx.Client(timeout=300.0)
    return c


def stream(url, body, on_event=None):
    """POST /execute and read its SSE: returns [(event, data, t_received)] with the send time first."""
    body = {"job_id": str(uuid.uuid4()), **body}  # (a job_id in `body` wins)
    c = client()
    events = [("sent", body["job_id"], time.perf_counter())]
    with c.stream("POST", f"{url}/execute", json=body) as r:
        if r.status_code != 200:
            r.read()
            return events + [("http", {"status": r.status_code, "body": r.text[:200]}, time.perf_counter())]
        name = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:") and name:
                ev = (name, json.loads(line[5:]), time.perf_counter())
                events.append(ev)
                if on_event:
                    on_event(ev)
                if name in ("end", "error"):
                    break
    return events


def llama_stream(url, body, on_event=None):
    """POST llama-server's /completion (streamed) and read its SSE: [(kind, data, t_received)] with the
    send time first; each message before the last is a "token" (it may carry several tokens: the
    last message's timings.predicted_n counts them), the last (stop: true) the "end"."""
    c = client()
    events = [("sent", None, time.perf_counter())]
    with c.stream("POST", f"{url}/completion", json=body) as r:
        if r.status_code != 200:
            r.read()
            return events + [("http", {"status": r.status_code, "body": r.text[:200]}, time.perf_counter())]
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            data = json.loads(line[5:])
            ev = ("end" if data.get("stop") else "token", data, time.perf_counter())
            events.append(ev)
            if on_event:
                on_event(ev)
            if ev[0] == "end":
                break
    return events


def stream_tokens(events) -> int:
    """Tokens a stream of either server delivered: the worker sends an event per token; llama-server's
    last message counts them (timings.predicted_n)."""
    n = next((e[1].get("timings", {}).get("predicted_n") for e in events if e[0] == "end"), None)
    return int(n) if n is not None else sum(1 for e in events if e[0] == "token")


def ttft(url, n_words, reps):
    out, started_ms, prompt_ms, n_tok = [], [], [], None
    for _ in range(reps):
        ev = stream(url, {"prompt": WORD * n_words, "max_tokens": 1, "temperature": 0.0})
        t0 = ev[0][2]
        toks = [e for e in ev if e[0] == "token"]
        started = [e for e in ev if e[0] == "started"]
        ends = [e for e in ev if e[0] == "end"]
        if toks:
            out.append((toks[0][2] - t0) * 1e3)
        if started:
            n_tok = started[0][1]["n_prompt_tokens"]
            started_ms.append((started[0][2] - t0) * 1e3)
        if ends:
            prompt_ms.append(float(ends[0][1]["timings"]["prompt_ms"]))
    # where the time goes: sent -> `started` (HTTP, tokenizing, the queue), then the engine's own
    # prefill + first sample (the end event's prompt_ms), the rest is the hand-off back to the client
    return {"n_prompt_tokens": n_tok, "p50_ms": pct(out, 50), "p99_ms": pct(out, 99), "n": len(out),
            "started_p50_ms": pct(started_ms, 50), "engine_prompt_p50_ms": pct(prompt_ms, 50)}


def one_stream_rate(url, n_tokens):
    ev = stream(url, {"prompt": WORD * 16, "max_tokens": n_tokens, "temperature": 0.0})
    toks = [e for e in ev if e[0] == "token"]
    end = [e for e in ev if e[0] == "end"]
    rate = (len(toks) - 1) / (toks[-1][2] - toks[0][2]) if len(toks) > 2 else float("nan")
    engine = end[0][1]["timings"]["predicted_per_second"] if end else None
    return {"tokens": len(toks), "sse_tok_s": rate, "engine_reported_tok_s": engine}


def side_latency(url, n_tokens, n_probes=200, max_s=60.0):
    """/health and /metrics latency while a stream is decoding: a background client streams
    back-to-back, and a probe counts only if it was sent between a stream's first token and its end
    (a short stream at engine speed ends within a fraction of a second, before any fixed delay)."""
    streaming, stop = threading.Event(), threading.Event()

    def on_event(ev):
        if ev[0] == "token":
            streaming.set()
        elif ev[0] in ("end", "error", "http"):
            streaming.clear()

    def load():
        while not stop.is_set():
            stream(url, {"prompt": WORD * 16, "max_tokens": n_tokens, "temperature": 0.0}, on_event)
            streaming.clear()

    th = threading.Thread(target=load, daemon=True)
    th.start()
    lat = {"health": [], "metrics": []}
    deadline = time.perf_counter() + max_s
    with httpx.Client(timeout=10) as c:
        while len(lat["health"]) < n_probes and time.perf_counter() < deadline:
            if not streaming.wait(timeout=1.0):
                continue
            for path in ("health", "metrics"):
                t = time.perf_counter()
                c.get(f"{url}/{path}")
                dt = (time.perf_counter() - t) * 1e3
                if streaming.is_set():  # still decoding when the answer came: a probe under load
                    lat[path].append(dt)
            time.sleep(0.002)
    stop.set()
    th.join()
    return {k: {"p50_ms": pct(v, 50), "p99_ms": pct(v, 99), "n": len(v)} for k, v in lat.items()}


def _aggregate_client(url, body, ready, out, llama=False):
    """One stream of `aggregate`, in a process of its own: its client is made before the barrier."""
    try:
        client().get(f"{url}/health")
        ready.wait()
        events = (llama_stream if llama else stream)(url, body)
    except Exception as exc:  # reported in the figures (no tokens), never a parent left waiting
        ready.abort()
        events = [("sent", None, time.perf_counter()), ("client_error", repr(exc), time.perf_counter())]
    out.put((body["seed"], events))


ENGINE_METRICS = ("orcd_engine_step_seconds", "orcd_engine_gpu_wait_seconds", "orcd_engine_gpu_step_seconds",
                  "orcd_engine_events_seconds", "orcd_decode_batch_rows")


def engine_totals(url) -> dict[str, tuple[float, float]]:
    """{histogram: (sum, count)} of the worker's engine-thread metrics (GET /metrics); {} when it has none."""
    try:
        text = client().get(f"{url}/metrics").text
    except httpx.HTTPError:
        return {}
    out = {}
    for line in text.splitlines():
        for name in ENGINE_METRICS:
            for suffix, i in (("_sum ", 0), ("_count ", 1)):
                if line.startswith(name + suffix):
                    out.setdefault(name, [0.0, 0.0])[i] = float(line.split()[-1])
    return {k: tuple(v) for k, v in out.items()}


def engine_breakdown(before, after) -> dict[str, float]:
    """The engine thread's means over a run, from two engine_totals: a scheduler iteration's wall time,
    its wait for the GPU and the GPU's time for its decode step (decode iterations), the hand-off of its
    events (ms), and rows per decode step. An iteration's time minus its GPU wait is host work: when the
    wait is near zero, the host bounds it; an iteration longer than its GPU step leaves the GPU idle."""
    def mean(name, scale=1.0):
        if name not in before or name not in after:
            return float("nan")
        (s0, n0), (s1, n1) = before[name], after[name]
        return (s1 - s0) / (n1 - n0) * scale if n1 > n0 else float("nan")
    n_steps = after.get("orcd_engine_step_seconds", (0, 0))[1] - before.get("orcd_engine_step_seconds", (0, 0))[1]
    return {"iterations": n_steps, "step_ms": mean("orcd_engine_step_seconds", 1e3),
            "gpu_wait_ms": mean("orcd_engine_gpu_wait_seconds", 1e3),
            "gpu_step_ms": mean("orcd_engine_gpu_step_seconds", 1e3),
            "events_ms": mean("orcd_engine_events_seconds", 1e3), "rows": mean("orcd_decode_batch_rows")}


def aggregate(url, n_streams, n_tokens, llama=False):
    """n_streams concurrent streams, each read by a process of its own (a client that parses ~4,000
    events a second in threads of one process measures its own GIL). `tok_s`: all tokens over the
    time from the start to the last terminal event; `engine_tok_s_sum`: the sum of the streams'
    `end` timings.predicted_per_second (the engine's own decode rates), so a loss between the two
    shows on the served path, not in the engine (up to the worker's --max-batch streams; beyond it
    streams queue and their rates do not add). `llama`: the same against llama-server (its /completion,
    every stream --tokens long: ignore_eos; its end message's timings give the engine's rates)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Barrier(n_streams + 1)  # every client made before the clock starts
    out = ctx.Queue()
    def body(i):
        if llama:
            return {"prompt": WORD * 16, "n_predict": n_tokens, "temperature": 0.0, "seed": i, "stream": True,
                    "ignore_eos": True, "cache_prompt": False}
        return {"prompt": WORD * 16, "max_tokens": n_tokens, "temperature": 0.0, "seed": i}

    procs = [ctx.Process(target=_aggregate_client, daemon=True, args=(url, body(i), ready, out, llama))
             for i in range(n_streams)]
    for p in procs:
        p.start()
    before = {} if llama else engine_totals(url)
    ready.wait(timeout=120)
    t0 = time.perf_counter()
    results = [out.get(timeout=600)[1] for _ in procs]
    for p in procs:
        p.join(30)
    engine = {} if llama else engine_breakdown(before, engine_totals(url))
    t_end = max(ev[-1][2] for ev in results)  # perf_counter is the system's monotonic clock: one for all
    dt = t_end - t0
    n = sum(stream_tokens(ev) for ev in results)
    ends = [e[1] for ev in results for e in ev if e[0] == "end"]
    rates = []
    for ev in results:
        toks = [e[2] for e in ev if e[0] == "token"]
        if len(toks) > 2:
            rates.append((stream_tokens(ev) - 1) / (toks[-1] - toks[0]))
    return {"streams": n_streams, "tokens": n, "seconds": dt, "tok_s": n / dt, "clients": "processes",
            "engine_tok_s_sum": sum(float(e["timings"]["predicted_per_second"]) for e in ends),
            "engine_reported_streams": len(ends),
            "stream_sse_tok_s_mean": sum(rates) / len(rates) if rates else float("nan"), "engine": engine}


def cancel_latency(url, n_words, reps=5):
    """POST /cancel 2 ms after `started` (inside the prefill of a long prompt) -> the terminal event."""
    out = []
    for _ in range(reps):
        jid, started, job = str(uuid.uuid4()), threading.Event(), {}
        th = threading.Thread(target=lambda: job.update(events=stream(
            url, {"job_id": jid, "prompt": WORD * n_words, "max_tokens": 64, "temperature": 0.0},
            lambda ev: started.set() if ev[0] == "started" else None)))
        th.start()
        started.wait(60)
        time.sleep(0.002)
        c = client()
        t = time.perf_counter()
        c.post(f"{url}/cancel", json={"job_id": jid})
        th.join()
        ev = job.get("events", [])
        term = [e for e in ev if e[0] in ("end", "error")]
        if term:
            out.append({"ms": (term[0][2] - t) * 1e3, "terminal": term[0][0], "code": term[0][1].get("code"),
                        "tokens_before": sum(1 for e in ev if e[0] == "token")})
    ms = [o["ms"] for o in out]
    return {"p50_ms": pct(ms, 50), "max_ms": max(ms) if ms else float("nan"), "runs": out}


def in_process_tg(model, backend, n, max_batch):
    """`orcd-worker bench` tg of one sequence in an engine of the served worker's --max-batch (its
    graphs and caches sized as the worker's, so the two figures run the same step)."""
    try:
        r = subprocess.run([*WORKER, "bench", model, "--backend", backend, "-p", "0", "-n", str(n), "-r", "3",
                            "--max-batch", str(max_batch), "--json"], capture_output=True, text=True, check=True)
        return json.loads(r.stdout.strip().splitlines()[-1])[f"tg{n}"]["tok_s"]
    except Exception as exc:  # reported, not fatal: the HTTP figures stand on their own
        print(f"in-process bench failed: {exc}", file=sys.stderr)
        return None


def start_server(cmd, url, what) -> subprocess.Popen | None:
    """Start a server (its output dropped) and wait for its /health (up to 300 s: a load); None, with the
    server stopped, when it did not get ready."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(os.devnull, "w"))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    print(f"{what} did not become ready", file=sys.stderr)
    return None


CONTEXT = 4096  # each sequence's context in both servers (the worker's --max-context, a llama-server slot's)


def llama_server_runs(exe, model, port, parallel, concurrency, n_tokens) -> list[dict] | None:
    """The aggregate runs against llama-server on `model` (alone on the GPU: started after the worker
    stopped): `parallel` slots of CONTEXT positions each, flash attention, every layer on the GPU."""
    url = f"http://127.0.0.1:{port}"
    proc = start_server([exe, "-m", model, "-ngl", "99", "-fa", "on", "--parallel", str(parallel),
                         "-c", str(CONTEXT * parallel), "--host", "127.0.0.1", "--port", str(port)], url, "llama-server")
    if proc is None:
        return None
    try:
        llama_stream(url, {"prompt": WORD * 16, "n_predict": 8, "temperature": 0.0, "stream": True})  # warm-up
        return [aggregate(url, n, n_tokens, llama=True) for n in concurrency]
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="GGUF file to serve (omit with --url)")
    ap.add_argument("--url", help="a running worker instead of starting one")
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--port", type=int, default=8181)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=20, help="requests per TTFT figure")
    ap.add_argument("--concurrency", default="1,4,8,16")
    ap.add_argument("--prompts", default="32,512,2040", help="prompt lengths (words) of the TTFT figures")
    ap.add_argument("--cancel-prompt", type=int, default=2040, help="prompt length (words) of the cancel figure")
    ap.add_argument("--max-batch", type=int, default=8, help="the worker's --max-batch (8)")
    ap.add_argument("--llama-server", default=None, metavar="EXE",
                    help="also run the aggregate against this llama-server on MODEL (--parallel = --max-batch)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    proc = None
    url = args.url
    if url is None:
        if not args.model:
            ap.error("give MODEL or --url")
        url = f"http://127.0.0.1:{args.port}"
        proc = start_server([*WORKER, "serve", "--model", args.model, "--backend", args.backend,
                             "--port", str(args.port), "--queue-size", "64", "--max-context", str(CONTEXT),
                             "--max-batch", str(args.max_batch), "--log-format", "json"], url, "the worker")
        if proc is None:
            return 1
    try:
        stream(url, {"prompt": WORD * 16, "max_tokens": 8, "temperature": 0.0})  # warm-up (graphs, kernels)
        res = {"ttft": {int(w): ttft(url, int(w), args.reps) for w in args.prompts.split(",")}}
        res["stream"] = one_stream_rate(url, args.tokens)
        res["side"] = side_latency(url, args.tokens)
        res["aggregate"] = [aggregate(url, int(n), args.tokens) for n in args.concurrency.split(",")]
        res["cancel_in_prefill"] = cancel_latency(url, args.cancel_prompt)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    if args.model:
        res["bench_tg"] = in_process_tg(args.model, args.backend, args.tokens, args.max_batch)
    if args.llama_server and args.model and proc is not None:
        res["llama_server"] = llama_server_runs(args.llama_server, args.model, args.port + 1, args.max_batch,
                                                [int(n) for n in args.concurrency.split(",")], args.tokens)
    print(f"\n{'figure':<34}{'value':>40}")
    for w, t in res["ttft"].items():
        print(f"{'ttft, ' + str(t['n_prompt_tokens']) + '-token prompt':<34}{t['p50_ms']:>20.1f} ms p50 {t['p99_ms']:>8.1f} p99"
              f" (started at {t['started_p50_ms']:.1f}, engine prefill+sample {t['engine_prompt_p50_ms']:.1f})")
    s = res["stream"]
    print(f"{'one stream':<34}{s['sse_tok_s']:>20.1f} tok/s over SSE ({s['tokens']} tokens; engine says "
          f"{s['engine_reported_tok_s']})")
    if res.get("bench_tg"):
        print(f"{'in-process bench tg' + str(args.tokens):<34}{res['bench_tg']:>20.1f} tok/s "
              f"(SSE = {s['sse_tok_s'] / res['bench_tg']:.0%} of it)")
    for k, v in res["side"].items():
        print(f"{k + ' during a stream':<34}{v['p50_ms']:>20.2f} ms p50 {v['p99_ms']:>8.2f} p99 (n={v['n']})")
    one = next((a["tok_s"] for a in res["aggregate"] if a["streams"] == 1), None)
    for a in res["aggregate"]:
        ratio = f" ({a['tok_s'] / one:.2f}x one stream)" if one else ""
        engine = (f"; engine says {a['engine_tok_s_sum']:.1f} (the streams' own rates summed)"
                  if a["streams"] <= args.max_batch else "")  # (beyond the batch, streams queue: rates don't add)
        print(f"{str(a['streams']) + ' concurrent streams':<34}{a['tok_s']:>20.1f} tok/s aggregate{ratio}{engine}")
        e = a.get("engine") or {}
        if e.get("iterations"):  # the worker's engine-thread metrics over the run (engine_breakdown)
            print(f"{'  engine thread':<34}{e['step_ms']:>20.2f} ms an iteration: GPU step {e['gpu_step_ms']:.2f}, wait {e['gpu_wait_ms']:.2f}, "
                  f"events {e['events_ms']:.2f}; {e['rows']:.1f} rows a decode step ({e['iterations']:.0f} iterations)")
    for a in res.get("llama_server") or []:
        ours = next((o["tok_s"] for o in res["aggregate"] if o["streams"] == a["streams"]), None)
        ratio = f" (worker / llama-server {ours / a['tok_s']:.2f}x)" if ours else ""
        print(f"{'llama-server, ' + str(a['streams']) + ' streams':<34}{a['tok_s']:>20.1f} tok/s aggregate{ratio}; "
              f"its streams' own rates summed {a['engine_tok_s_sum']:.1f}")
    c = res["cancel_in_prefill"]
    print(f"{'cancel during a ' + str(args.cancel_prompt) + '-word prefill':<34}{c['p50_ms']:>20.1f} ms p50 {c['max_ms']:>8.1f} max")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
