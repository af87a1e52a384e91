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
    def __init__(self, *, step_s: float = 0.005, n_ctx: int = 4096, fail_with: Exception | None = None):
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

    def run(self, prepared, cancel=None):
        self.runs += 1
        if self.fail_with is not None:
            raise self.fail_with
        request = prepared.request
        rng = random.Random(request.sampling.seed)
        self.kv_live += 1
        t0 = time.perf_counter()
        ids: list[int] = []
        try:
            for i in range(request.max_tokens):
                time.sleep(self.step_s)
                if cancel is not None and cancel.cancelled:
                    raise Cancelled("cancelled")
                k = rng.randrange(len(WORDS))
                ids.append(k)
                yield GeneratedToken(id=k, index=i, text=WORDS[k])
            ms = (time.perf_counter() - t0) * 1000
            return GenerationResult(
                tokens_in=len(prepared.prompt_ids), tokens_out=len(ids), finish_reason="length",
                prompt_ms=1.0, decode_ms=ms, ids=ids, text="".join(WORDS[k] for k in ids),
            )
        finally:
            self.kv_live -= 1

    def close(self) -> None:
        self.closed.set()


__all__ = ["FakeEngine", "FakeTokenizer", "VramOOM"]
