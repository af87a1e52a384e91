"""The contract between the engine (orcd_core.engine) and its callers (CLI, HTTP server).

A caller builds a `GenerationRequest`, asks the engine to `prepare` it (tokenize, chat template,
context check: errors surface here, before any GPU work), then iterates `run(prepared, cancel)`,
which yields one `GeneratedToken` per sampled token and finally returns a `GenerationResult`
(as the generator's return value, i.e. `StopIteration.value`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Literal

from .errors import OrcdError

FinishReason = Literal["stop", "length", "stop_sequence", "cancelled"]


@dataclass(frozen=True)
class SamplingParams:
    """Applied in llama.cpp's order: temperature -> penalties (repetition, frequency, presence) -> top-k ->
    top-p -> min-p -> sample.
    temperature 0 means greedy (argmax); 0/1 values switch a filter off as documented per field."""

    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    repetition_window: int = 64  # how many previous tokens the penalties look at (llama.cpp's default)
    presence_penalty: float = 0.0  # subtracted once from each id in the window (0 = off)
    frequency_penalty: float = 0.0  # subtracted per occurrence of an id in the window (0 = off)
    seed: int = 0  # uint64


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


#: The repetition penalty's window at most (the GPU keeps a ring of this many ids per decoding request).
MAX_REPETITION_WINDOW = 1024

#: Alternatives per token that `GenerationRequest.logprobs` may ask for at most (OpenAI's limit).
MAX_TOP_LOGPROBS = 20

#: Stop sequences per request at most (the engine's and the HTTP API's limit; each is matched on every
#: token's text).
MAX_STOP_STRINGS = 4


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None  # a full conversation (implies the chat template)
    chat: bool = False  # apply the model's chat template to `prompt` as one user message
    max_tokens: int = 256
    stop: tuple[str, ...] = ()  # stop sequences, matched on the decoded text
    sampling: SamplingParams = field(default_factory=SamplingParams)
    prompt_ids: tuple[int, ...] | None = None  # exact ids (no template, no BOS): bypasses tokenization
    # None: no log-probabilities; k in 0..MAX_TOP_LOGPROBS: each token's log-probability under the model
    # (raw logits, before temperature, penalties and filters, as vLLM reports them) and the k likeliest ids'
    logprobs: int | None = None


@dataclass
class PreparedRequest:
    request: GenerationRequest
    prompt_ids: list[int]
    n_ctx: int  # the context this request will use (prompt + max_tokens <= n_ctx)


@dataclass(frozen=True)
class TokenLogprobs:
    """A sampled token's log-probability and the `k` likeliest ids' (id, log-probability), likeliest
    first (ties: the lower id first), from the step's raw logits."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class GeneratedToken:
    id: int
    index: int  # 0-based index among generated tokens
    text: str  # complete UTF-8 text released by this token (may be "" while a code point is split)
    logprobs: TokenLogprobs | None = None  # when the request asked for them


@dataclass
class GenerationResult:
    tokens_in: int
    tokens_out: int
    finish_reason: FinishReason
    prompt_ms: float
    decode_ms: float
    ids: list[int] = field(default_factory=list)
    text: str = ""


class CancelToken:
    """Set from any thread; the engine checks it between decode steps."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


class GenerationError(OrcdError):
    """A request failed. `code` is one of the stable error codes of the HTTP API."""

    code = "INTERNAL"
    retriable = False

    def __init__(self, message: str, **details):
        super().__init__(message)
        self.details = details


class InvalidRequest(GenerationError):
    code = "INVALID_REQUEST"


class ContextLengthExceeded(GenerationError):
    code = "CONTEXT_LENGTH_EXCEEDED"


class VramOOM(GenerationError):
    code = "VRAM_OOM"
    retriable = True


class CudaError(GenerationError):
    code = "CUDA_ERROR"


class InferenceTimeout(GenerationError):
    code = "INFERENCE_TIMEOUT"
    retriable = True


class Cancelled(GenerationError):
    code = "CANCELLED"
