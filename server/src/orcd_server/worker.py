"""The engine thread: the one thread that loads the model, runs jobs one at a time, and frees the
device at the end. Everything that touches the GPU happens here (CuPy's current device is per
thread), so the event loop only ever reads cached state and answers /health and /metrics at once.

Life: loading (progress 0..100) -> ready (jobs from the queue, FIFO, batch 1) -> draining (after
SIGTERM or POST /shutdown: no new work, waiting jobs end with CANCELLED, the running one may finish
until the deadline, then is cancelled) -> engine.close() -> `on_exit(code)`.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from orcd_core.errors import ModelLoadError, OrcdError
from orcd_core.generation import Cancelled, GenerationError

from .jobs import Job, JobQueue
from .logging import text_fields
from .metrics import Metrics

PROGRESS_STEPS = (0, 25, 50, 75, 100)
SWITCH_INTERVAL_S = 0.0005  # sys.setswitchinterval while serving (see start)


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
        self.log.info("shutdown", phase="begin", reason=reason, running_job=running.job_id if running else None,
                      queued=len(waiting), deadline_s=self.shutdown_timeout_s)
        for job in waiting:
            job.request_cancel("shutdown")
            self._terminal(job, "cancelled", error=("CANCELLED", "the worker is shutting down", True))
        if running is not None:
            if self.shutdown_timeout_s <= 0:
                running.request_cancel("shutdown")
            else:
                self._shutdown_timer = threading.Timer(self.shutdown_timeout_s, running.request_cancel, ("shutdown",))
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
        while True:
            job = self.queue.take()
            if job is None:  # closed and empty
                return
            try:
                self._run_job(job)  # its terminal event (`_terminal`) finishes it in the queue
            except BaseException:
                self.queue.finish(job)  # failed before its terminal event: it must not stay "running"
                raise
            finally:
                self._refresh_info()

    def _run_job(self, job: Job) -> None:
        log = job.log
        started = time.monotonic()
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
        log.info("execute_start", n_prompt_tokens=job.n_prompt_tokens, seed=job.seed,
                 queue_wait_ms=round((started - job.accepted_at) * 1000, 3),
                 **text_fields("prompt", job.prompt_text, self.log_prompts))
        timer = threading.Timer(self.inference_timeout_s, job.request_cancel, ("timeout",))
        timer.daemon = True
        timer.start()
        pieces: list[str] = []
        last = None
        gen = None
        terminal: dict[str, Any]
        try:
            gen = self.engine.run(job.prepared, job.cancel_token)
            while True:
                try:
                    token = next(gen)
                except StopIteration as stop:
                    result = stop.value
                    break
                now = time.monotonic()
                if last is None:
                    self.metrics.ttft.observe(now - started)
                else:
                    self.metrics.itl.observe(now - last)
                last = now
                pieces.append(token.text)
                job.emit("token", {"t": token.text, "i": token.index, "id": token.id})
            if result.finish_reason == "cancelled":
                raise Cancelled("generation cancelled")
            tokens_out = int(result.tokens_out)
            tokens_in = int(result.tokens_in)
            prompt_ms = round(float(result.prompt_ms), 3)
            decode_ms = round(float(result.decode_ms), 3)
            self.metrics.prompt_tokens.inc(tokens_in)
            self.metrics.generation_tokens.inc(tokens_out)
            end = {
                "tokens_out": tokens_out,
                "tokens_in": tokens_in,
                "decode_time_ms": decode_ms,
                "finish_reason": result.finish_reason,
                "timings": {
                    "prompt_n": tokens_in,
                    "prompt_ms": prompt_ms,
                    "prompt_per_second": _per_second(tokens_in, prompt_ms),
                    "predicted_n": tokens_out,
                    "predicted_ms": decode_ms,
                    "predicted_per_second": _per_second(tokens_out, decode_ms),
                },
            }
            terminal = {"outcome": "completed", "end": end}
        except Cancelled:
            if job.cancel_reason == "timeout":
                message = f"inference exceeded --inference-timeout-sec {self.inference_timeout_s:g}"
                terminal = {"outcome": "timeout", "error": ("INFERENCE_TIMEOUT", message, True)}
            else:
                reason = job.cancel_reason or "cancelled"
                terminal = {"outcome": "cancelled", "error": ("CANCELLED", f"job cancelled ({reason})", reason == "shutdown")}
        except GenerationError as exc:
            terminal = {"outcome": "error", "error": (exc.code, str(exc), bool(exc.retriable))}
        except Exception as exc:
            job.log.error("error", code="INTERNAL", message=repr(exc), traceback=traceback.format_exc())
            terminal = {"outcome": "error", "error": ("INTERNAL", f"internal error: {exc!r}", False)}
        finally:
            timer.cancel()
            if gen is not None:
                gen.close()  # the engine's `finally` frees the KV cache (already done unless we failed)
        # the job's resources are released: it stops counting as running before its terminal event
        self._terminal(job, terminal.pop("outcome"), output="".join(pieces), run_s=time.monotonic() - started,
                       **terminal)

    def _terminal(self, job: Job, outcome: str, *, end: dict | None = None,
                  error: tuple[str, str, bool] | None = None, output: str = "", run_s: float | None = None) -> None:
        """Count and log the job's one terminal event, then send it (so that a client that reads
        /metrics right after its stream ended sees the job counted). `run_s`: the job's run time
        on the engine thread (no queue wait), for the Retry-After estimate."""
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
            job.emit("end", end)
        else:
            code, message, retriable = error
            job.emit("error", {"code": code, "message": message, "retriable": retriable})
