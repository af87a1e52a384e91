"""A stand-in for orcd_core.engine.Engine with the same API, for the server's unit tests only
(fast and with controllable timing). The end-to-end suite (tests/test_serve_e2e.py) runs the real
engine."""

from __future__ import annotations

import random
import threading
import time

from orcd_core.generation import (
    Cancelled,
    ContextLengthExceeded,
    GeneratedToken,
    GenerationResult,
    PreparedRequest,
    VramOOM,
)

WORDS = ["alpha ", "beta ", "gamma ", "delta ", "日本 ", "🙂 ", "x"]


class FakeTokenizer:
    vocab_size = 1000

    def encode(self, text: str, add_special: bool = False) -> list[int]:
        return [ord(c) % self.vocab_size for c in text]


class FakeEngine:
    def __init__(self, *, step_s: float = 0.005, n_ctx: int = 4096, fail_with: Exception | None = None,
                 max_batch: int = 1):
        self.model_name = "fake-model"
        self.architecture = "fake"
        self.backend = "reference"
        self.tokenizer = FakeTokenizer()
        self.n_ctx = n_ctx
        self.step_s = step_s
        self.fail_with = fail_with
        self.closed = threading.Event()
        self.kv_live = 0  # KV caches allocated and not yet freed
        self.runs = 0
        self.max_batch = max_batch
        self._scheduler = None

    @classmethod
    def loader(cls, *, load_s: float = 0.0, **kwargs):
        """A `loader(progress)` for create_app; it keeps the engine it made in `loader.engine`."""

        def load(progress):
            for k in range(11):
                progress(k / 10)
                time.sleep(load_s / 10)
            load.engine = cls(**kwargs)
            return load.engine

        load.engine = None
        return load

    def info(self) -> dict:
        return {
            "model": self.model_name,
            "architecture": self.architecture,
            "quant_kind": "F32",
            "tokenizer_kind": "fake",
            "vocab_size": self.tokenizer.vocab_size,
            "context_length": self.n_ctx,
            "vram_bytes_used": 0 if self.closed.is_set() else 12345,
            "resident": not self.closed.is_set(),
            "backend": self.backend,
            "sm": None,
            "cuda_runtime_version": None,
        }

    def prepare(self, request) -> PreparedRequest:
        if request.messages is not None:
            text = "".join(f"<{m.role}>{m.content}" for m in request.messages)
        else:
            text = request.prompt
        ids = self.tokenizer.encode(text)
        if len(ids) + request.max_tokens > self.n_ctx:
            raise ContextLengthExceeded(
                f"{len(ids)} + {request.max_tokens} > {self.n_ctx}", n_prompt_tokens=len(ids), n_ctx=self.n_ctx
            )
        return PreparedRequest(request=request, prompt_ids=ids, n_ctx=self.n_ctx)

    @property
    def scheduler(self) -> "FakeScheduler":
        if self._scheduler is None:
            self._scheduler = FakeScheduler(self, self.max_batch)
        return self._scheduler

    def close(self) -> None:
        self.closed.set()


class _FakeSeq:
    def __init__(self, prepared, cancel):
        self.prepared, self.cancel = prepared, cancel
        self.rng = random.Random(prepared.request.sampling.seed)
        self.ids: list[int] = []
        self.t0 = 0.0


class FakeScheduler:
    """orcd_core.scheduler.Scheduler's interface: up to `max_batch` sequences advance one token per
    `step()`, which takes `step_s` whatever their number."""

    def __init__(self, engine: FakeEngine, max_batch: int):
        self.engine, self.max_batch = engine, max_batch
        self.waiting: list[_FakeSeq] = []
        self.active: list[_FakeSeq] = []
        self.last_rows, self.last_wait_s, self.last_gpu_s = 0, 0.0, 0.0  # (the last step's, as Scheduler's)

    def submit(self, prepared, cancel=None) -> _FakeSeq:
        seq = _FakeSeq(prepared, cancel)
        self.waiting.append(seq)
        return seq

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.active)

    @property
    def n_free(self) -> int:
        return max(0, self.max_batch - len(self.active) - len(self.waiting))

    def step(self) -> list:
        eng, events = self.engine, []
        while self.waiting and len(self.active) < self.max_batch:
            seq = self.waiting.pop(0)
            eng.runs += 1
            if eng.fail_with is not None:
                events.append((seq, eng.fail_with))
                continue
            eng.kv_live += 1
            seq.t0 = time.perf_counter()
            self.active.append(seq)
        self.last_rows, self.last_wait_s, self.last_gpu_s = 0, 0.0, 0.0
        if not self.active:
            return events
        t0 = time.perf_counter()
        time.sleep(eng.step_s)  # (the fake's "device": its step is all waiting)
        self.last_rows, self.last_wait_s = len(self.active), time.perf_counter() - t0
        self.last_gpu_s = eng.step_s  # (its "device" time: the step it slept)
        for seq in list(self.active):
            request = seq.prepared.request
            if seq.cancel is not None and seq.cancel.cancelled:
                self._leave(seq)
                events.append((seq, Cancelled("cancelled")))
                continue
            k = seq.rng.randrange(len(WORDS))
            seq.ids.append(k)
            events.append((seq, GeneratedToken(id=k, index=len(seq.ids) - 1, text=WORDS[k])))
            if len(seq.ids) >= request.max_tokens:
                self._leave(seq)
                ms = (time.perf_counter() - seq.t0) * 1000
                events.append((seq, GenerationResult(
                    tokens_in=len(seq.prepared.prompt_ids), tokens_out=len(seq.ids), finish_reason="length",
                    prompt_ms=1.0, decode_ms=ms, ids=list(seq.ids), text="".join(WORDS[k] for k in seq.ids))))
        return events

    def _leave(self, seq) -> None:
        self.active.remove(seq)
        self.engine.kv_live -= 1

    def close(self) -> None:
        for seq in list(self.active):
            self._leave(seq)
        self.waiting.clear()


__all__ = ["FakeEngine", "FakeTokenizer", "VramOOM"]
