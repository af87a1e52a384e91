#!/usr/bin/env python3
"""Soak `orcd-worker serve`: N requests, M of them cancelled (half by POST /cancel, half by the
client hanging up), on the reference backend with a tiny synthetic model; then compare the server
process's RssAnon, thread count and open file descriptors (from /proc/PID) with their values after
a warm-up. Exit 1 when RssAnon grew by 50 MiB or more, or threads or descriptors grew at all.

    uv run --no-sync python scripts/soak.py --requests 10000 --cancels 1000      # on demand
    uv run --no-sync python scripts/soak.py --requests 60 --cancels 10 --warmup 20   # what CI runs

`--model PATH` soaks another GGUF; `--json` prints the figures as one JSON object. Traffic goes to
127.0.0.1 only; the run is bounded by `--max-seconds` (then it stops and says so, exit 1).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

MAX_RSS_GROWTH_MIB = 50.0
MAX_VRAM_DRIFT_BYTES = 1 << 20  # VRAM back to its baseline within 1 MiB (our counters and the driver's view)
WARMUP_REQUESTS = 50


def tiny_model(directory: Path) -> Path:
    from orcd_core import testmodels
    from orcd_core.testing import synth

    path = directory / "soak-llama-tiny.gguf"
    if not path.exists():
        vocab = testmodels.llama_cpp_models_dir() / "ggml-vocab-llama-spm.gguf"
        synth.synthesize("llama", path, size="tiny", layers=1, seed=16, vocab=vocab)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_stats(pid: int) -> dict[str, float]:
    """RssAnon (MiB), threads and open descriptors of `pid`, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    names = []
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            names.append(Path(f"/proc/{pid}/task/{t}/comm").read_text().strip())
        except FileNotFoundError:  # the thread exited between the listing and the read
            pass
    names.sort()
    return {
        "rss_anon_mib": int(fields["RssAnon"].split()[0]) / 1024,
        "threads": int(fields["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "thread_names": names,
    }


IDLE_S = 10.5  # anyio retires a worker thread idle for 10 s, at its next to_thread call
SAMPLE_S = 2.0


def settled_stats(pid: int, url: str) -> dict[str, float]:
    """The counts once the server is idle: wait past anyio's idle limit, make one request (its
    to_thread call retires the idle worker threads: the pool's size is then the same whatever the
    concurrency before), then take the lowest thread and descriptor counts over a few samples (a
    closing connection is not growth) and the last RssAnon."""
    time.sleep(IDLE_S)
    with httpx.Client(base_url=url, timeout=60) as client:
        with client.stream("POST", "/execute", json={"job_id": f"settle-{time.monotonic_ns()}", "prompt": "x",
                                                      "max_tokens": 1}) as response:
            response.read()
    samples = []
    end = time.monotonic() + SAMPLE_S
    while time.monotonic() < end:
        samples.append(proc_stats(pid))
        time.sleep(0.25)
    return {
        "rss_anon_mib": samples[-1]["rss_anon_mib"],
        "threads": min(s["threads"] for s in samples),
        "fds": min(s["fds"] for s in samples),
        "thread_names": min((s["thread_names"] for s in samples), key=len),
    }


class Soak:
    def __init__(self, url: str, max_tokens: int, seed: int) -> None:
        self.url = url
        self.max_tokens = max_tokens
        self.rng = random.Random(seed)
        self.counts = {"completed": 0, "cancelled": 0, "disconnected": 0, "other": 0}
        self.cancel_latency_s: list[float] = []
        self.n = 0

    def one(self, client: httpx.Client, kind: str) -> None:
        """kind: "complete", "cancel" (POST /cancel after the first token) or "disconnect"."""
        self.n += 1
        job_id = f"soak-{self.n}"
        body = {"job_id": job_id, "prompt": "The soak test says", "max_tokens": self.max_tokens,
                "seed": self.rng.randrange(2**32), "temperature": 0.8}
        if kind != "complete":
            body["max_tokens"] = max(self.max_tokens, 64)
        terminal = None
        t_cancel = None
        with client.stream("POST", "/execute", json=body) as response:
            if response.status_code != 200:
                self.counts["other"] += 1
                return
            event = None
            for line in response.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                    if event == "token" and kind == "disconnect":
                        break  # leaving the `with` closes the connection
                    if event == "token" and kind == "cancel" and t_cancel is None:
                        t_cancel = time.perf_counter()
                        client.post("/cancel", json={"job_id": job_id})
                    if event in ("end", "error"):
                        terminal = event
        if kind == "disconnect":
            self.counts["disconnected"] += 1
        elif terminal == "end" and kind == "complete":
            self.counts["completed"] += 1
        elif terminal == "error" and kind == "cancel":
            self.counts["cancelled"] += 1
            self.cancel_latency_s.append(time.perf_counter() - t_cancel)
        else:
            self.counts["other"] += 1


def run(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="orcd-soak-"))
    model = Path(args.model) if args.model else tiny_model(work)
    port = free_port()
    log = open(work / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "orcd_server.cli", "serve", "--backend", args.backend, "--model", str(model),
         "--port", str(port), "--log-format", "json", "--queue-size", "64", "--max-context", "512"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    result: dict = {"requests": args.requests, "cancels": args.cancels, "model": str(model), "log": str(work / "serve.log")}
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"soak: the server did not become ready (see {work / 'serve.log'})")
            time.sleep(0.1)
        soak = Soak(url, args.max_tokens, args.seed)
        kinds = ["complete"] * (args.requests - args.cancels) + ["cancel", "disconnect"] * (args.cancels // 2)
        kinds += ["cancel"] * (args.cancels % 2)
        random.Random(args.seed).shuffle(kinds)
        stop_at = time.monotonic() + args.max_seconds
        stopping = threading.Event()

        def drive(batch: list[str]) -> None:
            with httpx.Client(base_url=url, timeout=120) as client:
                for kind in batch:
                    if time.monotonic() > stop_at or stopping.is_set():
                        return
                    try:
                        soak.one(client, kind)
                    except httpx.HTTPError:
                        soak.counts["other"] += 1

        def phase(batch: list[str]) -> None:
            threads = [threading.Thread(target=drive, args=(batch[i :: args.clients],)) for i in range(args.clients)]
            for t in threads:
                t.start()
            try:
                for t in threads:
                    t.join()
            except BaseException:  # Ctrl-C: the clients stop after their current request
                stopping.set()
                raise

        n_cut = max(1, args.warmup // 10)
        phase(["complete"] * (args.warmup - 2 * n_cut) + ["cancel", "disconnect"] * n_cut)  # warm-up: pools, caches
        before = settled_stats(proc.pid, url)
        vram_before = gpu_memory(proc.pid, url)
        soak.counts = dict.fromkeys(soak.counts, 0)
        soak.cancel_latency_s.clear()
        t0 = time.perf_counter()
        phase(kinds)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        result["timed_out"] = time.monotonic() > stop_at
        health = httpx.get(url + "/health", timeout=5).json()
        after = settled_stats(proc.pid, url)
        vram_after = gpu_memory(proc.pid, url)
        result["vram_bytes_used"] = [vram_before["vram_bytes_used"], vram_after["vram_bytes_used"]]
        result["driver_used_mib"] = [vram_before["driver_used_mib"], vram_after["driver_used_mib"]]
        result["vram_growth_bytes"] = vram_after["vram_bytes_used"] - vram_before["vram_bytes_used"]
        if vram_before["driver_used_mib"] is not None and vram_after["driver_used_mib"] is not None:
            result["driver_growth_mib"] = vram_after["driver_used_mib"] - vram_before["driver_used_mib"]
        lat = sorted(soak.cancel_latency_s)
        result.update(
            before=before, after=after, counts=soak.counts,
            rss_anon_growth_mib=round(after["rss_anon_mib"] - before["rss_anon_mib"], 2),
            thread_growth=after["threads"] - before["threads"], fd_growth=after["fds"] - before["fds"],
            cancel_latency_ms_p50=round(lat[len(lat) // 2] * 1000, 1) if lat else None,
            cancel_latency_ms_max=round(lat[-1] * 1000, 1) if lat else None,
            jobs_running=health["jobs_running"], jobs_queued=health["jobs_queued"],
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            result["exit_code"] = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            result["exit_code"] = proc.wait()
    return result


def gpu_memory(pid: int, url: str) -> dict:
    """The worker's VRAM: its own byte counters (/health vram_bytes_used, 0 on the reference backend)
    and what the driver says the process holds (nvidia-smi, MiB; None without a GPU)."""
    used = int(httpx.get(url + "/health", timeout=5).json().get("vram_bytes_used") or 0)
    driver = None
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            p, mib = [x.strip() for x in line.split(",")[:2]]
            if int(p) == pid:
                driver = int(mib)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        pass
    return {"vram_bytes_used": used, "driver_used_mib": driver}


def problems(result: dict, requests: int, cancels: int) -> list[str]:
    out = []
    if abs(result.get("vram_growth_bytes", 0)) > MAX_VRAM_DRIFT_BYTES:
        out.append(f"VRAM in use moved by {result['vram_growth_bytes']} bytes (limit {MAX_VRAM_DRIFT_BYTES})")
    if abs(result.get("driver_growth_mib") or 0) > MAX_VRAM_DRIFT_BYTES >> 20:
        out.append(f"the driver's view of the process moved by {result['driver_growth_mib']} MiB")
    if result.get("timed_out"):
        out.append("the run passed --max-seconds")
    if result["rss_anon_growth_mib"] >= MAX_RSS_GROWTH_MIB:
        out.append(f"RssAnon grew {result['rss_anon_growth_mib']} MiB (limit {MAX_RSS_GROWTH_MIB})")
    if result["thread_growth"] > 0:
        out.append(f"threads grew by {result['thread_growth']}")
    if result["fd_growth"] > 0:
        out.append(f"open descriptors grew by {result['fd_growth']}")
    c = result["counts"]
    if c["other"] or c["completed"] != requests - cancels or c["cancelled"] + c["disconnected"] != cancels:
        out.append(f"unexpected outcomes {c}")
    if result["jobs_running"] or result["jobs_queued"]:
        out.append("jobs left running or queued")
    if result["exit_code"] != 0:
        out.append(f"the server exited {result['exit_code']}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--cancels", type=int, default=1_000, help="of the requests, how many are cut short")
    p.add_argument("--clients", type=int, default=4, help="concurrent client connections")
    p.add_argument("--max-tokens", type=int, default=4, help="tokens per completed request")
    p.add_argument("--warmup", type=int, default=WARMUP_REQUESTS, help="requests before the first measurement")
    p.add_argument("--model", help="GGUF to serve (default: a tiny synthetic llama)")
    p.add_argument("--seed", type=int, default=16)
    p.add_argument("--backend", default="reference", choices=("reference", "cuda"))
    p.add_argument("--max-seconds", type=float, default=4 * 3600)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not 0 <= args.cancels <= args.requests:
        p.error("--cancels must be between 0 and --requests")
    result = run(args)
    found = problems(result, args.requests, args.cancels)
    result["ok"] = not found
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    for line in found:
        print(f"soak: FAIL: {line}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
