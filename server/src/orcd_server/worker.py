"""The engine thread: the one thread that loads the model, runs the jobs (up to the engine's batch
size at once, through its continuous-batching scheduler), and frees the device at the end. Everything that touches the GPU happens here (CuPy's current device is per
thread), so the event loop only ever reads cached state and answers /health and /metrics at once.

Life: loading (progress 0..100) -> ready (jobs from the queue, FIFO, up to `max_batch` decoding
together) -> draining (after SIGTERM or POST /shutdown: no new work, waiting jobs end with CANCELLED,
the running ones may finish until the deadline, then are cancelled) -> engine.close() -> `on_exit(code)`.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from orcd_core.errors import ModelLoadError, OrcdError
from orcd_core.generation import Cancelled, GeneratedToken, GenerationError, GenerationResult

from .jobs import Job, JobQueue, Outbox
from .logging import text_fields
from .metrics import Metrics

PROGRESS_STEPS = (0, 25, 50, 75, 100)
SWITCH_INTERVAL_S = 0.0005  # sys.setswitchinterval while serving (see start)


@dataclass(eq=False)
class _Running:
    """A job in the engine's scheduler: what its events need on the engine thread."""

    job: Job
    started: float
    timer: threading.Timer
    last: float | None = None
    pieces: list[str] = field(default_factory=list)


class _LoadAborted(Exception):
    """Raised from the progress callback to stop a model load when shutdown was asked for."""


def _rfc3339_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _per_second(n: int, ms: float) -> float:
    return n * 1000.0 / ms if ms > 0 else 0.0


class EngineWorker:
    """Owns the engine. `loader(progress)` returns a loaded Engine (Engine.load with the server's
    flags); it is called on the engine thread."""

    def __init__(
        self,
        *,
        loader: Callable[[Callable[[float], None]], Any],
        queue: JobQueue,
        metrics: Metrics,
        log,
        inference_timeout_s: float,
        shutdown_timeout_s: float,
        log_prompts: bool = False,
        on_exit: Callable[[int], None] | None = None,
    ) -> None:
        self.loader = loader
        self.queue = queue
        self.metrics = metrics
        self.log = log
        self.inference_timeout_s = inference_timeout_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.log_prompts = log_prompts
        self.on_exit = on_exit
        self.phase = "starting"  # starting | loading | ready | draining | stopped | failed
        self.load_percent = 0.0
        self.error: str | None = None
        self.exit_code: int | None = None
        self.engine: Any = None
        self.info: dict[str, Any] = {}  # engine.info(), refreshed on the engine thread only
        self.model_name: str | None = None
        self.n_ctx: int | None = None
        self.draining = False
        self.mean_job_seconds = 1.0  # running mean of job run times, for 429's Retry-After
        self._logged_steps: set[int] = set()
        self._shutdown_timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._main, name="orcd-engine", daemon=True)
        self.stopped = threading.Event()

    # -- control (any thread) ---------------------------------------------------------------------

    def start(self) -> None:
        # Two threads share the GIL: this one's per-token work and the event loop's SSE writes. A thread
        # waiting for the GIL waits up to the switch interval (5 ms by default) while the other runs
        # Python, which at a few hundred tokens a second is most of a token's time; 0.5 ms bounds it.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def ready(self) -> bool:
        return self.phase == "ready" and not self.draining

    def begin_shutdown(self, reason: str) -> bool:
        """Stop taking work; end waiting jobs with CANCELLED; give the running job until the deadline.
        Returns False when a shutdown was already under way."""
        with self._lock:
            if self.draining or self.stopped.is_set():
                return False
            self.draining = True
        running, waiting = self.queue.close()
        self.log.info("shutdown", phase="begin", reason=reason, running_jobs=[j.job_id for j in running],
                      queued=len(waiting), deadline_s=self.shutdown_timeout_s)
        for job in waiting:
            job.request_cancel("shutdown")
            self._terminal(job, "cancelled", error=("CANCELLED", "the worker is shutting down", True))

        def cancel_running():
            for job in self.queue.running:  # (the jobs running when the deadline comes)
                job.request_cancel("shutdown")

        if running:
            if self.shutdown_timeout_s <= 0:
                cancel_running()
            else:
                self._shutdown_timer = threading.Timer(self.shutdown_timeout_s, cancel_running)
                self._shutdown_timer.daemon = True
                self._shutdown_timer.start()
        return True

    def cancel(self, job_id: str, reason: str) -> str:
        """POST /cancel and client disconnects. Returns "removed", "cancelling" or "unknown"."""
        job = self.queue.get(job_id)
        status = self.queue.cancel(job_id, reason)
        if status == "removed" and job is not None:
            self._terminal(job, "cancelled", error=("CANCELLED", f"job cancelled ({reason}) while queued", False))
        return status

    # -- the engine thread ------------------------------------------------------------------------

    def _progress(self, fraction: float) -> None:
        if self.draining:
            raise _LoadAborted
        percent = max(0.0, min(100.0, float(fraction) * 100.0))
        self.load_percent = percent
        for step in PROGRESS_STEPS:
            if percent >= step and step not in self._logged_steps:
                self._logged_steps.add(step)
                self.log.info("model_load_progress", percent=step)

    def _main(self) -> None:
        code = 0
        try:
            if self._load():
                self._serve_jobs()
            code = 0 if self.phase != "failed" else 1
        except BaseException as exc:  # never leave the process hanging on a dead engine thread
            self.phase = "failed"
            self.error = f"internal error: {exc!r}"
            self.log.error("error", where="engine_thread", message=str(exc), traceback=traceback.format_exc())
            code = 1
        finally:
            self._close_engine()
            if self._shutdown_timer is not None:
                self._shutdown_timer.cancel()
            if self.phase != "failed":
                self.phase = "stopped"
            self.exit_code = code
            self.log.info("shutdown", phase="complete", exit_code=code)
            self.stopped.set()
            if self.on_exit is not None:
                self.on_exit(code)

    def _load(self) -> bool:
        self.phase = "loading"
        t0 = time.perf_counter()
        self.log.info("model_load_start")
        try:
            self._progress(0.0)
            engine = self.loader(self._progress)
        except _LoadAborted:
            self.log.info("model_load_aborted", reason="shutdown")
            return False
        except ModelLoadError as exc:
            return self._load_failed("MODEL_LOAD_FAILED", str(exc))
        except GenerationError as exc:  # VRAM_OOM / CUDA_ERROR while uploading weights
            return self._load_failed(exc.code, str(exc))
        except OrcdError as exc:
            return self._load_failed("MODEL_LOAD_FAILED", str(exc))
        self.engine = engine
        self._refresh_info()
        self.model_name = engine.model_name
        self.n_ctx = int(engine.n_ctx)
        self._progress_done()
        self.log.info(
            "model_load_complete",
            seconds=round(time.perf_counter() - t0, 3),
            model=engine.model_name,
            architecture=getattr(engine, "architecture", None),
            backend=getattr(engine, "backend", None),
            n_ctx=self.n_ctx,
            vram_bytes_used=self.info.get("vram_bytes_used"),
        )
        if self.draining:
            return False
        self.phase = "ready"
        self.log.info("ready")
        return True

    def _progress_done(self) -> None:
        self.load_percent = 100.0
        for step in PROGRESS_STEPS:
            if step not in self._logged_steps:
                self._logged_steps.add(step)
                self.log.info("model_load_progress", percent=step)

    def _load_failed(self, code: str, message: str) -> bool:
        self.phase = "failed"
        self.error = message
        self.log.error("error", code=code, message=message, where="model_load")
        return False

    def _refresh_info(self) -> None:
        try:
            self.info = dict(self.engine.info())
        except Exception as exc:  # info() is cached state; a failure here must not kill a job
            self.log.warning("error", where="engine.info", message=str(exc))

    def _close_engine(self) -> None:
        engine, self.engine = self.engine, None
        if engine is None:
            return
        try:
            engine.close()
        except Exception as exc:
            self.log.error("error", where="engine.close", message=str(exc))
        self.info = {**self.info, "vram_bytes_used": 0, "resident": False}

    def _serve_jobs(self) -> None:
        """Continuous batching: jobs join the engine's scheduler while it has a place, and every
        `step()` advances all of them (orcd_core.scheduler). A step's events, every job's, go to the
        event loop together once the step is handled (one `Outbox` flush); a job's `started` goes at
        once (a long prefill follows it)."""
        sched = self.engine.scheduler
        running: dict[Any, _Running] = {}  # scheduler sequence -> its job's state
        outbox = Outbox()
        while True:
            while sched.n_free > 0:
                job = self.queue.take(block=not sched.busy)
                if job is None:
                    break
                self._start_job(job, sched, running)
            if not sched.busy:
                if self.queue.closed and self.queue.n_waiting == 0:
                    return
                continue
            t0 = time.perf_counter()
            try:
                events = sched.step()
            except Exception as exc:  # a fault outside the requests' own errors: fail them all, go on
                self.log.error("error", code="INTERNAL", message=repr(exc), where="scheduler",
                               traceback=traceback.format_exc())
                sched.close()
                for seq, r in list(running.items()):
                    del running[seq]
                    self._end_job(r, {"outcome": "error", "error": ("INTERNAL", f"internal error: {exc!r}", False)},
                                  outbox)
                outbox.flush()
                continue
            t1 = time.perf_counter()
            try:
                for seq, event in events:
                    r = running.get(seq)
                    if r is None:
                        continue
                    if isinstance(event, GeneratedToken):
                        self._on_token(r, event, outbox)
                        continue
                    del running[seq]
                    self._end_job(r, self._outcome(r.job, event), outbox)
            finally:
                outbox.flush()
            self._observe_step(sched, t1 - t0, time.perf_counter() - t1)

    def _observe_step(self, sched, step_s: float, events_s: float) -> None:
        """The iteration's timings (orcd_engine_*; the scheduler's `last_rows` / `last_wait_s` / `last_gpu_s`)."""
        m = self.metrics
        m.engine_step.observe(step_s)
        m.engine_events.observe(events_s)
        if sched.last_rows:
            m.decode_rows.observe(sched.last_rows)
            m.engine_gpu_wait.observe(sched.last_wait_s)
            m.engine_gpu_step.observe(sched.last_gpu_s)

    def _start_job(self, job: Job, sched, running: dict) -> None:
        if job.cancel_token.cancelled:  # cancelled between take() and here
            self._terminal(job, "cancelled", error=("CANCELLED", f"job cancelled ({job.cancel_reason})", False))
            return
        job.emit(
            "started",
            {
                "job_id": job.job_id,
                "model": self.model_name,
                "started_at": _rfc3339_now(),
                "seed": job.seed,
                "n_prompt_tokens": job.n_prompt_tokens,
            },
        )
        started = time.monotonic()
        job.log.info("execute_start", n_prompt_tokens=job.n_prompt_tokens, seed=job.seed,
                     queue_wait_ms=round((started - job.accepted_at) * 1000, 3), running=len(running) + 1,
                     **text_fields("prompt", job.prompt_text, self.log_prompts))
        timer = threading.Timer(self.inference_timeout_s, job.request_cancel, ("timeout",))
        timer.daemon = True
        timer.start()
        seq = sched.submit(job.prepared, job.cancel_token)
        running[seq] = _Running(job=job, started=started, timer=timer)

    def _on_token(self, r: "_Running", token: GeneratedToken, outbox: Outbox) -> None:
        now = time.monotonic()
        if r.last is None:
            self.metrics.ttft.observe(now - r.started)
        else:
            self.metrics.itl.observe(now - r.last)
        r.last = now
        r.pieces.append(token.text)
        event = {"t": token.text, "i": token.index, "id": token.id}
        if token.logprobs is not None:
            event["logprob"] = token.logprobs.logprob
            event["top_logprobs"] = [{"id": i, "logprob": v} for i, v in token.logprobs.top]
        r.job.emit("token", event, outbox)

    def _outcome(self, job: Job, event) -> dict[str, Any]:
        """The terminal event of a job from the scheduler's last event for it."""
        if isinstance(event, GenerationResult):
            tokens_out, tokens_in = int(event.tokens_out), int(event.tokens_in)
            prompt_ms, decode_ms = round(float(event.prompt_ms), 3), round(float(event.decode_ms), 3)
            self.metrics.prompt_tokens.inc(tokens_in)
            self.metrics.generation_tokens.inc(tokens_out)
            end = {
                "tokens_out": tokens_out,
                "tokens_in": tokens_in,
                "decode_time_ms": decode_ms,
                "finish_reason": event.finish_reason,
                "timings": {
                    "prompt_n": tokens_in,
                    "prompt_ms": prompt_ms,
                    "prompt_per_second": _per_second(tokens_in, prompt_ms),
                    "predicted_n": tokens_out,
                    "predicted_ms": decode_ms,
                    "predicted_per_second": _per_second(tokens_out, decode_ms),
                },
            }
            return {"outcome": "completed", "end": end}
        if isinstance(event, Cancelled):
            if job.cancel_reason == "timeout":
                message = f"inference exceeded --inference-timeout-sec {self.inference_timeout_s:g}"
                return {"outcome": "timeout", "error": ("INFERENCE_TIMEOUT", message, True)}
            reason = job.cancel_reason or "cancelled"
            return {"outcome": "cancelled", "error": ("CANCELLED", f"job cancelled ({reason})", reason == "shutdown")}
        if isinstance(event, GenerationError):
            return {"outcome": "error", "error": (event.code, str(event), bool(event.retriable))}
        job.log.error("error", code="INTERNAL", message=repr(event))
        return {"outcome": "error", "error": ("INTERNAL", f"internal error: {event!r}", False)}

    def _end_job(self, r: "_Running", terminal: dict[str, Any], outbox: Outbox) -> None:
        r.timer.cancel()
        self._refresh_info()
        # the job's resources are released: it stops counting as running before its terminal event
        self._terminal(r.job, terminal.pop("outcome"), output="".join(r.pieces), run_s=time.monotonic() - r.started,
                       outbox=outbox, **terminal)

    def _terminal(self, job: Job, outcome: str, *, end: dict | None = None,
                  error: tuple[str, str, bool] | None = None, output: str = "", run_s: float | None = None,
                  outbox: Outbox | None = None) -> None:
        """Count and log the job's one terminal event, then send it (so that a client that reads
        /metrics right after its stream ended sees the job counted), now or with `outbox`'s flush.
        `run_s`: the job's run time on the engine thread (no queue wait), for the Retry-After estimate."""
        if not job.claim_terminal():
            return
        self.queue.finish(job)
        job.outcome = outcome
        duration = time.monotonic() - job.accepted_at
        self.metrics.outcome(outcome)
        self.metrics.duration.observe(duration)
        fields: dict[str, Any] = {"outcome": outcome, "duration_ms": round(duration * 1000, 3)}
        if end is not None:
            if run_s is not None:
                self.mean_job_seconds = 0.8 * self.mean_job_seconds + 0.2 * run_s
            fields.update(finish_reason=end["finish_reason"], tokens_in=end["tokens_in"],
                          tokens_out=end["tokens_out"], timings=end["timings"])
        else:
            fields.update(code=error[0], message=error[1])
            if outcome != "cancelled":
                job.log.error("error", code=error[0], message=error[1])
        fields.update(text_fields("output", output, self.log_prompts))
        job.log.info("execute_end", **fields)
        if end is not None:
            job.emit("end", end, outbox)
        else:
            code, message, retriable = error
            job.emit("error", {"code": code, "message": message, "retriable": retriable}, outbox)
