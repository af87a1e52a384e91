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
        self.ttft = Histogram(
            "orcd_time_to_first_token_seconds",
            "From the start of a job to its first generated token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "orcd_inter_token_latency_seconds",
            "Between consecutive generated tokens of a job",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "orcd_request_duration_seconds",
            "From accepting a job to its terminal event (queue wait included)",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        Gauge("orcd_requests_running", "Jobs running (0 or 1)", registry=r).set_function(running)
        Gauge("orcd_requests_queued", "Jobs waiting in the queue", registry=r).set_function(queued)
        Gauge("orcd_vram_bytes_used", "Device memory in use (cached)", registry=r).set_function(vram_bytes)
        Gauge("orcd_uptime_seconds", "Seconds since the worker started", registry=r).set_function(
            lambda: time.monotonic() - t0
        )

    def outcome(self, name: str) -> None:
        self.requests.labels(name).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
