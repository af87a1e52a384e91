"""scripts/bench_serve.py end to end on the reference backend (CI has no GPU): it starts the worker,
and every figure it reports is measured, with the count of requests behind it. The CUDA figures come
from the same script on the GPU machine (docs/perf-notes.md)."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from orcd_core import testmodels
from orcd_core.testing import synth

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_serve.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_bench_serve_reports_every_figure_on_the_reference_backend(tmp_path):
    model = tmp_path / "llama-tiny.gguf"
    synth.synthesize("llama", model, size="tiny", layers=1, seed=3,
                     vocab=testmodels.llama_cpp_models_dir() / "ggml-vocab-llama-spm.gguf")
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(SCRIPT), str(model), "--backend", "reference",
                        "--port", str(_free_port()), "--tokens", "24", "--reps", "3", "--prompts", "8,32",
                        "--cancel-prompt", "64", "--concurrency", "1,3", "--max-batch", "2", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())

    assert set(res["ttft"]) == {"8", "32"}
    for t in res["ttft"].values():
        assert t["n"] == 3 and t["n_prompt_tokens"] > 0 and 0 < t["p50_ms"] <= t["p99_ms"]
        # the split of TTFT: `started` comes first, the engine's prefill is inside the whole
        assert 0 < t["started_p50_ms"] < t["p50_ms"] and 0 < t["engine_prompt_p50_ms"] < t["p50_ms"]
    s = res["stream"]
    assert s["tokens"] >= 2 and s["sse_tok_s"] > 0 and s["engine_reported_tok_s"] > 0
    # probes count only while a stream decodes: the background client streams until enough are taken
    for path in ("health", "metrics"):
        side = res["side"][path]
        assert side["n"] > 0 and math.isfinite(side["p50_ms"]) and side["p50_ms"] <= side["p99_ms"], side
    agg = {a["streams"]: a for a in res["aggregate"]}
    assert set(agg) == {1, 3} and all(a["tokens"] > 0 and a["tok_s"] > 0 for a in agg.values())
    # each stream read by a process of its own; beside the client's figure, the engine's own rates
    for n, a in agg.items():
        assert a["clients"] == "processes" and 0 < a["tokens"] <= n * 24 and a["engine_reported_streams"] == n
        assert a["engine_tok_s_sum"] > 0 and a["stream_sse_tok_s_mean"] > 0
        # the engine thread over the run (the worker's orcd_engine_* metrics): iterations that decoded
        # up to --max-batch rows; the reference's decoder reports no device wait
        e = a["engine"]
        assert e["iterations"] > 0 and 0 < e["step_ms"] and 0 <= e["events_ms"] and e["gpu_wait_ms"] == 0
        assert 1 <= e["rows"] <= min(n, 2)
    cancel = res["cancel_in_prefill"]
    assert len(cancel["runs"]) == 5 and all(run["terminal"] in ("end", "error") for run in cancel["runs"])
    assert res["bench_tg"] > 0
    assert "concurrent streams" in r.stdout and "during a stream" in r.stdout and "engine thread" in r.stdout


def _bench_serve_module():
    from repo_scripts import load_script

    return load_script("bench_serve")


def test_llama_server_streams_are_read_and_counted_as_it_sends_them():
    """bench_serve's llama-server client (`--llama-server`) against a stand-in that answers /completion
    as llama-server does when streaming (tools/server: one `data: {json}` message per piece of text,
    `stop: true` with `timings` on the last): the messages are read in order, and the tokens counted
    from the last message's timings.predicted_n (a message may carry several tokens: a character split
    over two tokens is sent once whole), not from the number of messages."""
    import http.server
    import threading

    bodies = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            pieces = ["a", "b", "\u00e9", "c"]  # 5 tokens: the accented letter took two
            for p in pieces:
                self.wfile.write(b"data: " + json.dumps({"content": p, "stop": False}).encode() + b"\n\n")
                self.wfile.flush()
            last = {"content": "", "stop": True, "timings": {"predicted_n": 5, "predicted_per_second": 123.0}}
            self.wfile.write(b"data: " + json.dumps(last).encode() + b"\n\n")

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        bs = _bench_serve_module()
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        body = {"prompt": "x", "n_predict": 5, "stream": True, "ignore_eos": True}
        events = bs.llama_stream(url, body)
        assert [e[0] for e in events] == ["sent", "token", "token", "token", "token", "end"]
        assert "".join(e[1]["content"] for e in events if e[0] == "token") == "ab\u00e9c"
        assert [e[2] for e in events] == sorted(e[2] for e in events)
        assert bs.stream_tokens(events) == 5 and bodies == [body]
        # the worker's own events: one per token (its end's predicted_n says the same)
        ours = [("sent", None, 0.0)] + [("token", {"id": i}, 0.1 * i) for i in range(3)] + \
            [("end", {"timings": {"predicted_n": 3}}, 1.0)]
        assert bs.stream_tokens(ours) == 3 and bs.stream_tokens(ours[:-1]) == 3
    finally:
        srv.shutdown()
