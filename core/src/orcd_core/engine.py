"""The engine: one loaded model on one device, generating for up to `max_batch` requests at once.

    engine = Engine.load(path, backend="reference", max_batch=8)
    prepared = engine.prepare(GenerationRequest(prompt="Hello", max_tokens=16))
    gen = engine.run(prepared)            # one request alone: yields GeneratedToken, returns GenerationResult
    engine.scheduler.submit(prepared)     # or several: continuous batching (orcd_core.scheduler)

Backend-agnostic: everything on the device goes through the model's forward pass (adapters written
against `orcd_core.device.Device`) and `Device.sample`. Prefill is `prefill`; the per-token work is
the device's `BatchDecoder` (`Device.batch_decoder(decode_forward, ...)`): `decode_forward` is the
model's forward for one token of each sequence in the batch, which the CUDA backend captures once per
row count as a graph and replays per step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Generator

import numpy as np

from .device import MAX_BATCH, MAX_STEP_TOKENS, Device, KVBatch, KVCache, Step
from .backends import create_device
from .errors import OrcdError
from .generation import (
    Cancelled,
    CancelToken,
    ContextLengthExceeded,
    GeneratedToken,
    GenerationRequest,
    GenerationResult,
    MAX_REPETITION_WINDOW,
    MAX_STOP_STRINGS,
    MAX_TOP_LOGPROBS,
    InvalidRequest,
    PreparedRequest,
)
from .gguf_file import check_supported, open_gguf
from .shape import resolve_context

PREFILL_CHUNK = MAX_STEP_TOKENS  # tokens per prefill forward call

class Engine:
    def __init__(self, *, model_path: Path, gguf, arch, model, device: Device, tokenizer, n_ctx: int,
                 backend: str, registry, max_batch: int = 1) -> None:
        self.model_path = model_path
        self.gguf = gguf
        self.arch = arch
        self.model = model
        self.device = device
        self.tokenizer = tokenizer
        self.n_ctx = n_ctx
        self.backend = backend
        self.registry = registry
        self.architecture = gguf.architecture
        self.model_name = str(gguf.get("general.name") or model_path.stem)
        self.config = model.config
        self.max_batch = int(max_batch)
        self._scheduler = None
        self._info: dict | None = None

    # -- loading -----------------------------------------------------------------------------------

    @classmethod
    def load(cls, model_path, *, backend: str = "reference", gpu_device: int = 0, registry=None,
             tokenizer_path=None, max_context: int | None = None, load_chunk_mb: int = 1,
             progress: Callable[[float], None] | None = None, max_batch: int = 1) -> "Engine":
        """Open and validate the file, build its tokenizer, then upload the weights to a new device.
        `max_batch`: requests decoded together at most (1..MAX_BATCH); the device plans VRAM for that
        many KV caches of the context."""
        from .plugins import default_registry
        from .tokenizer import load_tokenizer

        registry = registry if registry is not None else default_registry()
        path = Path(model_path)
        gguf = open_gguf(path)
        arch = check_supported(gguf, registry)
        if arch is None or not gguf.tensors:  # a vocab-only file: check_supported accepts it, the engine cannot run it
            from .errors import UnsupportedArchitecture

            raise UnsupportedArchitecture(path, "the file has no tensors (vocabulary only): nothing to run")
        config = arch.config(gguf)  # metadata errors surface before the device is touched
        if max_context is not None and max_context < 1:
            raise InvalidRequest(f"max_context must be >= 1, got {max_context}")
        if not 1 <= int(max_batch) <= MAX_BATCH:
            raise InvalidRequest(f"max_batch must be in 1..{MAX_BATCH}, got {max_batch}", field="max_batch")
        n_ctx = resolve_context(max_context, config.context_length)
        tokenizer = load_tokenizer(gguf, registry=registry, tokenizer_json=tokenizer_path)
        opts = {"load_chunk_mb": load_chunk_mb} if backend == "cuda" else {}
        device = create_device(backend, gpu_device, **opts)
        device.prepare_load(gguf, n_ctx=int(n_ctx), shape=config.shape(), progress=progress, n_seq=int(max_batch))
        model = arch.build(gguf, device, registry=registry)  # each upload_weight reports progress
        device.finish_load()
        if not device.plans_memory:
            _check_kv_fits(path, model, device, int(n_ctx))
        engine = cls(model_path=path, gguf=gguf, arch=arch, model=model, device=device, tokenizer=tokenizer,
                     n_ctx=int(n_ctx), backend=backend, registry=registry, max_batch=int(max_batch))
        _warm_up(engine)
        return engine

    def info(self) -> dict:
        """Facts about the loaded model, from host-side state only (no GPU call): the fixed part is
        computed once; VRAM in use (the backend's own byte counters) and residency are read live."""
        if self._info is None:
            self._info = {
                "model": self.model_name,
                "architecture": self.architecture,
                "quant_kind": quant_kind(self.gguf),
                "tokenizer_kind": self.tokenizer.kind,
                "vocab_size": int(self.config.n_vocab or len(self.gguf.get("tokenizer.ggml.tokens", []))),
                "context_length": self.config.context_length,
                "n_ctx": self.n_ctx,
                "backend": self.backend,
                "sm": self.device.sm,
                "cuda_runtime_version": self.device.cuda_runtime_version,
            }
        mem = self.device.memory_report()
        return {**self._info,
                "vram_bytes_used": int(sum(mem.values())) if self.backend == "cuda" else 0,
                "resident": bool(self.device.healthy)}

    def close(self) -> None:
        if self._scheduler is not None:
            self._scheduler.close()
            self._scheduler = None
        self.device.close()
        self.model = None

    # -- requests ----------------------------------------------------------------------------------

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Tokenize and validate; raises InvalidRequest or ContextLengthExceeded before device work."""
        validate_request(request)
        if request.prompt_ids is not None:
            ids = [int(i) for i in request.prompt_ids]
            vocab = int(self.config.n_vocab or 0)
            bad = [i for i in ids if i < 0 or (vocab and i >= vocab)]
            if bad:
                raise InvalidRequest(f"prompt_ids holds ids outside the vocabulary (0..{vocab - 1}): {bad[:5]}",
                                     field="prompt_ids")
        elif request.messages is not None or request.chat:
            from .tokenizer import encode_chat

            if request.messages is not None:
                messages = [{"role": m.role, "content": m.content} for m in request.messages]
            else:
                messages = [{"role": "user", "content": request.prompt or ""}]
            # as llama-cpp-python's chat completion (the template writes BOS itself where it wants
            # one: no specials added, special tokens of the template parsed), except that special-token
            # text typed inside a message stays text (a user cannot close their own turn)
            ids = encode_chat(self.tokenizer, messages)
        else:
            # raw user text: special-token text stays ordinary text (only chat templates may write
            # control tokens), BOS/EOS as the model's metadata says
            ids = self.tokenizer.encode(request.prompt or "", add_special=True, parse_special=False)
        ids = list(ids)
        if not ids:
            raise InvalidRequest("the prompt is empty (no tokens to start from)")
        if len(ids) + request.max_tokens > self.n_ctx:
            raise ContextLengthExceeded(
                f"the prompt has {len(ids)} tokens and max_tokens is {request.max_tokens}: "
                f"{len(ids) + request.max_tokens} exceeds the context of {self.n_ctx}",
                n_prompt_tokens=len(ids), n_ctx=self.n_ctx,
            )
        return PreparedRequest(request=request, prompt_ids=ids, n_ctx=self.n_ctx)

    @property
    def scheduler(self):
        """The engine's continuous-batching scheduler (`orcd_core.scheduler`): up to `max_batch`
        requests prefilled and decoded together. One thread drives it."""
        if self._scheduler is None:
            from .scheduler import Scheduler

            self._scheduler = Scheduler(self, self.max_batch)
        return self._scheduler

    def run(self, prepared: PreparedRequest, cancel: CancelToken | None = None
            ) -> Generator[GeneratedToken, None, GenerationResult]:
        """One request alone: prefill, then decode token by token (the scheduler's rules, see
        orcd_core.scheduler). Yields its tokens, returns its result, raises its error."""
        sched = self.scheduler
        if sched.busy:
            raise RuntimeError("Engine.run: the scheduler is serving other requests (drive it with step())")
        seq = sched.submit(prepared, cancel)
        try:
            while True:
                for _, event in sched.step():
                    if isinstance(event, GeneratedToken):
                        if cancel is not None and cancel.cancelled:
                            break  # the next step ends it as cancelled
                        yield event
                    elif isinstance(event, GenerationResult):
                        return event
                    else:
                        raise event
        finally:
            if not seq.done:  # the caller stopped early (generator closed): release its cache
                sched._release(seq)

    # -- the device work ---------------------------------------------------------------------------

    def prefill(self, ids: list[int], cache: KVCache, *, all_logits: bool = False,
                cancel: CancelToken | None = None, start_pos: int = 0):
        """Feed `ids` from position `start_pos` (the cache holds the positions before it) in chunks of
        PREFILL_CHUNK; logits of the last token ([1, V]), or of every token ([T, V] on the host) with
        `all_logits`. A cancel is honoured between chunks."""
        dev, outs, logits = self.device, [], None
        for i0 in range(0, len(ids), PREFILL_CHUNK):
            start = start_pos + i0
            if cancel is not None and cancel.cancelled:
                raise Cancelled("the request was cancelled during prefill", tokens_out=0)
            logits = dev.prefill_chunk(self.model.forward, ids[i0 : i0 + PREFILL_CHUNK], start, cache,
                                       all_logits=all_logits)
            if all_logits:
                outs.append(np.asarray(dev.to_host(logits), dtype=np.float32))
        return np.concatenate(outs) if all_logits else logits

    def decode_forward(self, step: Step, kv: KVBatch):
        """A decode step's device work: the model's forward for one token of each sequence of `kv`
        -> the rows' logits [T, V]. Device ops only (the CUDA backend captures it as a graph)."""
        return self.model.forward(step, kv, all_logits=True)

    def logits(self, ids: list[int]) -> np.ndarray:
        """[T, V] float32 logits for exactly these ids from position 0 (no BOS added)."""
        ids = [int(i) for i in ids]
        if not ids:
            raise InvalidRequest("logits: no ids")
        if len(ids) > self.n_ctx:
            raise ContextLengthExceeded(f"{len(ids)} ids exceed the context of {self.n_ctx}",
                                        n_prompt_tokens=len(ids), n_ctx=self.n_ctx)
        vocab = int(self.config.n_vocab or 0)
        if vocab and any(i < 0 or i >= vocab for i in ids):
            raise InvalidRequest(f"logits: ids must be in 0..{vocab - 1}")
        cache = self.model.new_kv_cache(self.n_ctx)
        try:
            return self.prefill(ids, cache, all_logits=True)
        finally:
            self.device.free_kv_cache(cache)


def _check_kv_fits(path: Path, model, device: Device, n_ctx: int) -> None:
    """A context whose KV cache can never be allocated is a load error, not a retriable VRAM_OOM on
    every request: allocate one cache of `n_ctx` positions at load and free it (the reference
    backend's arrays are zero pages until written, so this costs no memory traffic)."""
    from .errors import InsufficientVram
    from .generation import VramOOM

    try:
        cache = model.new_kv_cache(n_ctx)
    except (VramOOM, MemoryError) as exc:
        raise InsufficientVram(path, f"the KV cache for a context of {n_ctx} tokens cannot be allocated ({exc}); "
                                     "serve a shorter context (--max-context)") from None
    device.free_kv_cache(cache)


def _warm_up(engine: "Engine") -> None:
    """`Device.warm_up` (the prefill) and the scheduler's decode loop's `BatchDecoder.warm_up` (every
    row count's first steps) with a scratch KV cache of the engine's layout. Memory that does not fit
    now (the cache, or what the warm-up takes) ends it: the load goes on, and the backend prepares what
    is left at the first requests, where running out of VRAM fails the request that needs it."""
    from .generation import VramOOM

    model, device = engine.model, engine.device
    try:
        cache = model.new_kv_cache(engine.n_ctx)
    except (VramOOM, MemoryError):
        return
    try:
        device.warm_up(model.forward, cache)
        engine.scheduler.warm_up(cache)
    except VramOOM:
        pass
    finally:
        device.free_kv_cache(cache)


def quant_kind(gguf) -> str:
    """The dominant weight type: for a mixture of experts (a file with 3-D weights: one matrix per
    expert) the type holding most of the expert bytes, else general.file_type's name (llama.cpp's
    `llama_ftype`, as gguf-py names it), else the type holding the most bytes."""
    experts = [t for t in gguf.tensors.values() if len(t.shape) == 3]
    pool = experts or list(gguf.tensors.values())
    if not experts:
        name = file_type_name(gguf.get("general.file_type"))
        if name is not None:
            return name
    by_type: dict[str, int] = {}
    for t in pool:
        by_type[t.type_name] = by_type.get(t.type_name, 0) + t.nbytes
    return max(by_type, key=by_type.get) if by_type else "unknown"


def file_type_name(file_type) -> str | None:
    """"Q4_K_M" for general.file_type 15 (gguf-py's LlamaFileType without its MOSTLY_/ALL_ prefix);
    None for an absent, unknown or GUESSED value."""
    import gguf as ggufpy

    if isinstance(file_type, bool) or not isinstance(file_type, int):
        return None
    try:
        member = ggufpy.LlamaFileType(file_type)
    except ValueError:
        return None
    if member is ggufpy.LlamaFileType.GUESSED:
        return None
    return member.name.removeprefix("MOSTLY_").removeprefix("ALL_")


def validate_request(request: GenerationRequest) -> None:
    """Raises `InvalidRequest` whose `details["field"]` names the request field at fault (the names
    of `GenerationRequest` and `SamplingParams`, which the HTTP API shares), None when no one field is."""
    s = request.sampling
    checks = [
        ("max_tokens", request.max_tokens >= 0, f"max_tokens must be >= 0, got {request.max_tokens}"),
        ("temperature", s.temperature >= 0, f"temperature must be >= 0, got {s.temperature}"),
        ("top_k", s.top_k >= 0, f"top_k must be >= 0, got {s.top_k}"),
        ("top_p", 0 <= s.top_p <= 1, f"top_p must be in [0, 1], got {s.top_p}"),
        ("min_p", 0 <= s.min_p <= 1, f"min_p must be in [0, 1], got {s.min_p}"),
        ("repetition_penalty", s.repetition_penalty > 0, f"repetition_penalty must be > 0, got {s.repetition_penalty}"),
        ("presence_penalty", -2 <= s.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {s.presence_penalty}"),
        ("frequency_penalty", -2 <= s.frequency_penalty <= 2,
         f"frequency_penalty must be in [-2, 2], got {s.frequency_penalty}"),
        ("repetition_window", 0 <= s.repetition_window <= MAX_REPETITION_WINDOW,
         f"repetition_window must be in 0..{MAX_REPETITION_WINDOW}, got {s.repetition_window}"),
        ("seed", 0 <= s.seed < 2**64, f"seed must be in 0..2^64-1, got {s.seed}"),
        ("logprobs", request.logprobs is None or 0 <= request.logprobs <= MAX_TOP_LOGPROBS,
         f"logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {request.logprobs}"),
        ("stop", len(request.stop) <= MAX_STOP_STRINGS,
         f"at most {MAX_STOP_STRINGS} stop sequences, got {len(request.stop)}"),
        ("stop", all(isinstance(x, str) and x for x in request.stop), "stop sequences must be non-empty strings"),
    ]
    sources = sum(x is not None for x in (request.prompt, request.messages, request.prompt_ids))
    checks.append((None, sources == 1, "give exactly one of prompt, messages, prompt_ids"))
    checks.append((None, not (request.chat and request.prompt is None), "chat=True needs a prompt"))
    for name, ok, message in checks:
        if not ok:
            raise InvalidRequest(message, field=name)


__all__ = ["Engine", "OrcdError", "quant_kind", "validate_request"]
