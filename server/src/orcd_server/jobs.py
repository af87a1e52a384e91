"""Jobs and the bounded FIFO queue between the HTTP handlers (event loop) and the engine thread.

A `Job` is created by POST /execute after validation and tokenization. Its events are produced on
the engine thread and handed to the event loop with `call_soon_threadsafe`, where the SSE generator
reads them from an asyncio queue. The engine thread gathers the events of one scheduler step (every
running job's) in an `Outbox` and hands them over in one call: one wake-up of the event loop per
step, not one per token (each is a write to the loop's self-pipe, and the GIL goes back and forth
with the loop). Order is kept, per job and across jobs. Exactly one terminal event (`end` or
`error`) per job: `claim_terminal` enforces it, whichever thread gets there first (the engine, a
cancel of a queued job, shutdown).
"""

from __future__ import annotations

import asyncio
import collections
import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from orcd_core.generation import CancelToken

TERMINAL_EVENTS = ("end", "error")


class JobState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"


class QueueFull(Exception):
    pass


class DuplicateJob(Exception):
    pass


class QueueClosed(Exception):
    pass


@dataclass(eq=False)
class Job:
    job_id: str
    prepared: Any  # orcd_core.generation.PreparedRequest
    seed: int
    n_prompt_tokens: int
    loop: asyncio.AbstractEventLoop
    log: Any = None  # bound logger (job_id)
    prompt_text: str = ""  # for the log's digest only
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel_token: CancelToken = field(default_factory=CancelToken)
    cancel_reason: str | None = None  # "client" | "disconnect" | "shutdown" | "timeout"
    state: JobState = JobState.QUEUED
    accepted_at: float = field(default_factory=time.monotonic)
    on_terminal: Callable[[Job, str, dict], None] | None = None  # runs on the event loop
    outcome: str | None = None
    _terminal_sent: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def request_cancel(self, reason: str) -> None:
        """Ask the engine to stop (checked between decode steps). The first reason wins."""
        with self._lock:
            if self.cancel_reason is None:
                self.cancel_reason = reason
        self.cancel_token.cancel()

    @property
    def done(self) -> bool:
        return self._terminal_sent

    def claim_terminal(self) -> bool:
        """Reserve the job's one terminal event (True once, then False); send it with `emit`."""
        with self._lock:
            if self._terminal_sent:
                return False
            self._terminal_sent = True
            self.state = JobState.DONE
            return True

    def emit(self, name: str, data: dict, outbox: Outbox | None = None) -> bool:
        """Send an event from any thread (returns False when dropped), now or, with `outbox`, when
        the outbox is flushed. A terminal event must have been claimed first (`claim_terminal`), so
        that what follows it (metrics, logs) can be done before the client sees it; nothing is sent
        after the terminal event."""
        with self._lock:
            if self._terminal_sent and name not in TERMINAL_EVENTS:
                return False
        if outbox is not None:
            outbox.items.append((self, name, data))
            return True
        try:
            self.loop.call_soon_threadsafe(self._deliver, name, data)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass
        return True

    def _deliver(self, name: str, data: dict) -> None:
        self.events.put_nowait((name, data))
        if name in TERMINAL_EVENTS and self.on_terminal is not None:
            self.on_terminal(self, name, data)


class Outbox:
    """Events of several jobs gathered on one thread (`Job.emit(..., outbox)`), handed to their
    event loop by `flush` in one `call_soon_threadsafe`, in the order they were emitted."""

    def __init__(self) -> None:
        self.items: list[tuple[Job, str, dict]] = []

    def flush(self) -> None:
        if not self.items:
            return
        items, self.items = self.items, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, str, dict]]] = {}
        for item in items:
            by_loop.setdefault(item[0].loop, []).append(item)
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver_all, batch)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass


def _deliver_all(batch: list[tuple[Job, str, dict]]) -> None:
    for job, name, data in batch:
        try:
            job._deliver(name, data)
        except Exception as exc:  # as when each was a callback of its own: reported, the others go on
            job.loop.call_exception_handler({"message": f"delivering {name!r} of job {job.job_id}",
                                             "exception": exc})


class JobQueue:
    """At most `maxsize` jobs waiting, plus those running (the engine takes up to its batch size).
    Thread-safe."""

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("queue size must be >= 1")
        self.maxsize = maxsize
        self._waiting: collections.deque[Job] = collections.deque()
        self._by_id: dict[str, Job] = {}
        self._running: dict[str, Job] = {}
        self._closed = False
        self._cond = threading.Condition()

    # -- producer side (event loop) ---------------------------------------------------------------

    def submit(self, job: Job) -> int:
        """Enqueue; returns the number of jobs ahead of it. Raises QueueFull, DuplicateJob, QueueClosed."""
        with self._cond:
            if self._closed:
                raise QueueClosed
            if job.job_id in self._by_id:
                raise DuplicateJob(job.job_id)
            if len(self._waiting) >= self.maxsize:
                raise QueueFull
            ahead = len(self._waiting)
            self._waiting.append(job)
            self._by_id[job.job_id] = job
            self._cond.notify()
            return ahead

    def cancel(self, job_id: str, reason: str) -> str:
        """Cancel a job by id: "removed" (was waiting; the caller sends its terminal event),
        "cancelling" (running; the engine stops it), or "unknown" (finished or never seen)."""
        with self._cond:
            job = self._by_id.get(job_id)
            if job is None:
                return "unknown"
            if self._running.get(job_id) is job:
                job.request_cancel(reason)
                return "cancelling"
            self._waiting.remove(job)
            del self._by_id[job_id]
        job.request_cancel(reason)
        return "removed"

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._by_id.get(job_id)

    def close(self) -> tuple[list[Job], list[Job]]:
        """Accept nothing more; return (the running jobs, the waiting jobs), read under one lock.
        The waiting jobs are removed from the queue; the running ones stay."""
        with self._cond:
            self._closed = True
            running = list(self._running.values())
            waiting = list(self._waiting)
            self._waiting.clear()
            for job in waiting:
                del self._by_id[job.job_id]
            self._cond.notify_all()
            return running, waiting

    # -- consumer side (engine thread) ------------------------------------------------------------

    def take(self, block: bool = True) -> Job | None:
        """The oldest waiting job, marked running; None when none is waiting and `block` is False, or
        the queue is closed and empty. With `block`, waits for one."""
        with self._cond:
            while block and not self._waiting and not self._closed:
                self._cond.wait()
            if not self._waiting:
                return None
            job = self._waiting.popleft()
            self._running[job.job_id] = job
            job.state = JobState.RUNNING
            return job

    def finish(self, job: Job) -> None:
        with self._cond:
            if self._running.get(job.job_id) is job:
                del self._running[job.job_id]
            self._by_id.pop(job.job_id, None)

    # -- state (any thread) -----------------------------------------------------------------------

    @property
    def n_waiting(self) -> int:
        return len(self._waiting)

    @property
    def n_running(self) -> int:
        return len(self._running)

    @property
    def running(self) -> list[Job]:
        with self._cond:
            return list(self._running.values())

    @property
    def closed(self) -> bool:
        return self._closed
