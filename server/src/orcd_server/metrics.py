"""Prometheus metrics of one worker (GET /metrics). Each app has its own CollectorRegistry, so
several apps in one process (tests) do not share counters. Gauges that mirror state (queued,
running, VRAM, uptime) read it when scraped; nothing here touches the GPU."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Outcomes of POST /execute, one label value each.
OUTCOMES = (
    "completed",  # ended with an `end` event
    "cancelled",  # POST /cancel, a client disconnect, or shutdown
    "timeout",  # --inference-timeout-sec
    "error",  # any other `error` event
    "invalid",  # 400 before any work
    "overloaded",  # 429
    "unavailable",  # 503 (loading, shutting down)
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# the engine thread's iterations: a decode step of a small model is a millisecond or two
_STEP_BUCKETS = (0.0002, 0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.006, 0.008, 0.012, 0.016, 0.025, 0.05, 0.1,
                 0.25, 1.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(
        self,
        *,
        queued: Callable[[], int],
        running: Callable[[], int],
        vram_bytes: Callable[[], int],
        started_monotonic: float | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        t0 = time.monotonic() if started_monotonic is None else started_monotonic
        self.requests = Counter("orcd_requests", "POST /execute requests by outcome", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)  # every series exists from the start, at 0
        self.prompt_tokens = Counter("orcd_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("orcd_generation_tokens", "Tokens generated", registry=r)

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, buckets=buckets, registry=r)

        self.ttft = histogram("orcd_time_to_first_token_seconds", "From the start of a job to its first generated token",
                              _LATENCY_BUCKETS)
        self.itl = histogram("orcd_inter_token_latency_seconds", "Between consecutive generated tokens of a job",
                             _LATENCY_BUCKETS)
        self.duration = histogram("orcd_request_duration_seconds",
                                  "From accepting a job to its terminal event (queue wait included)", _DURATION_BUCKETS)
        # The engine thread, one scheduler iteration at a time (a prefill chunk and/or one batched decode
        # step): where a served token's time goes. A step's wall time minus its GPU wait is host work; with
        # the decode pipelined (backends/cuda/graph.py) the GPU wait is what the host work did not cover.
        self.engine_step = histogram("orcd_engine_step_seconds",
                                     "One iteration of the engine's scheduler (a prefill chunk and/or a batched "
                                     "decode step)", _STEP_BUCKETS)
        self.engine_gpu_wait = histogram("orcd_engine_gpu_wait_seconds",
                                         "Of each iteration with a decode step, the time the engine thread waited "
                                         "for the device", _STEP_BUCKETS)
        self.engine_gpu_step = histogram("orcd_engine_gpu_step_seconds",
                                         "Of each iteration with a decode step, the device's time for the step "
                                         "(0 where the decoder cannot time it)", _STEP_BUCKETS)
        self.engine_events = histogram("orcd_engine_events_seconds",
                                       "Of each iteration, handling its events (metrics, logs, the hand-off to the "
                                       "streams)", _STEP_BUCKETS)
        self.decode_rows = histogram("orcd_decode_batch_rows", "Sequences in each batched decode step",
                                     (1, 2, 3, 4, 6, 8, 12, 16, 24, 32))
        Gauge("orcd_requests_running", "Jobs running (decoding together, up to --max-batch)",
              registry=r).set_function(running)
        Gauge("orcd_requests_queued", "Jobs waiting in the queue", registry=r).set_function(queued)
        Gauge("orcd_vram_bytes_used", "Device memory in use (cached)", registry=r).set_function(vram_bytes)
        Gauge("orcd_uptime_seconds", "Seconds since the worker started", registry=r).set_function(
            lambda: time.monotonic() - t0
        )

    def outcome(self, name: str) -> None:
        self.requests.labels(name).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
