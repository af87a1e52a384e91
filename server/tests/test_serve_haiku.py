"""The specification's haiku test: the real Qwen2.5 test model behind `orcd-worker serve`,
"Write a haiku about GPU computing" as a chat prompt, max_tokens 50, temperature 0.7, seed 42, sent
twice: both streams are `started`, tokens, `end`, and their tokens are identical; then sent by 8
clients at once (decoded together, continuous batching): each of the 8 gets the same tokens again."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from orcd_server.commands.serve import gpu_count
from serve_helpers import ProcessServer, collect, tokens

BACKENDS = [pytest.param("reference", id="reference"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
HAIKU = {"prompt": "Write a haiku about GPU computing", "chat": True, "max_tokens": 50, "temperature": 0.7, "seed": 42}


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_haiku_twice_gives_identical_streams(backend, tmp_path):
    if backend == "cuda" and gpu_count() == 0:
        pytest.skip("no CUDA GPU")
    from orcd_core.testmodels import DownloadError, fetch_model

    try:
        model = fetch_model("qwen")
    except DownloadError as exc:  # e.g. the GPU machine, which has no network and cannot carry 491 MB
        pytest.skip(f"the real Qwen2.5 test model is not cached and cannot be downloaded: {exc}")
    srv = ProcessServer(["--backend", backend, "--model", str(model), "--max-context", "256"],
                        tmp_path).start()
    try:
        health = srv.wait_ready(900)
        assert health["quant_kind"] == "Q4_K_M" and health["tokenizer_kind"]
        client = httpx.Client(base_url=srv.url, timeout=900)
        streams = [collect(client, {"job_id": f"haiku-{k}", **HAIKU}) for k in range(2)]
        for events in streams:
            names = [n for n, _ in events]
            assert names[0] == "started" and names[-1] == "end" and set(names[1:-1]) == {"token"}, names
            assert events[0][1]["seed"] == 42 and events[0][1]["n_prompt_tokens"] > 10  # the chat template
            assert events[-1][1]["finish_reason"] in ("stop", "length")
            assert 1 <= len(tokens(events)) <= 50
        assert tokens(streams[0]) == tokens(streams[1])
        text = "".join(t for t, _, _ in tokens(streams[0]))
        end = streams[0][-1][1]
        print(f"[{backend}] haiku ({end['tokens_out']} tokens, {end['timings']['predicted_per_second']:.1f} tok/s): {text!r}")
        assert text.strip()
        # 8 at once: one batched decode step for all of them (--max-batch 8, the default)
        together: dict = {}

        def one(k):
            with httpx.Client(base_url=srv.url, timeout=900) as c:
                together[k] = collect(c, {"job_id": f"haiku-batch-{k}", **HAIKU})

        running = []
        threads = [threading.Thread(target=one, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            running.append(client.get("/health").json()["jobs_running"])
            time.sleep(0.2)
        for t in threads:
            t.join(900)
        assert sorted(together) == list(range(8))
        assert max(running) > 1, running  # they did run together
        for k, events in together.items():
            assert events[-1][0] == "end", (k, events[-1])
            assert tokens(events) == tokens(streams[0]), f"client {k} of 8 differs from the lone stream"
    finally:
        srv.stop()
