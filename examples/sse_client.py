"""A minimal client of `orcd-worker serve` (documented in docs/http_api.md; server/tests imports it).

    uv run python examples/sse_client.py http://127.0.0.1:8080 "Write a haiku about GPU computing"

With `ORCD_API_KEY` set (a server started with --api-key), the key is sent as `Authorization: Bearer`.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Iterator

import httpx
import httpx_sse


def execute(base_url: str, body: dict, timeout: float = 300.0) -> Iterator[tuple[str, dict]]:
    """POST /execute and yield (event, data) until the job's terminal event (`end` or `error`).
    A refused request (400, 429, 503) raises httpx.HTTPStatusError; its JSON body says why."""
    key = os.environ.get("ORCD_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(base_url=base_url, timeout=timeout, headers=headers) as client:
        with httpx_sse.connect_sse(client, "POST", "/execute", json=body) as source:
            if source.response.status_code != 200:
                source.response.read()
                source.response.raise_for_status()
            for sse in source.iter_sse():
                if sse.event in ("started", "token", "end", "error"):
                    yield sse.event, json.loads(sse.data)


USAGE = "usage: python examples/sse_client.py BASE_URL PROMPT   (e.g. http://127.0.0.1:8080 \"Hello\")"


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] in ("-h", "--help"):
        print(USAGE, file=sys.stderr)
        return 0 if argv[1:2] in (["-h"], ["--help"]) else 2
    base_url, prompt = argv[1], argv[2]
    body = {"job_id": str(uuid.uuid4()), "prompt": prompt, "chat": True, "max_tokens": 50, "temperature": 0.7,
            "seed": 42}
    for event, data in execute(base_url, body):
        if event == "token":
            print(data["t"], end="", flush=True)
        elif event == "end":
            print(f"\n[{data['finish_reason']}, {data['tokens_out']} tokens, "
                  f"{data['timings']['predicted_per_second']:.1f} tok/s]")
        elif event == "error":
            print(f"\n[error {data['code']}: {data['message']}]", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
