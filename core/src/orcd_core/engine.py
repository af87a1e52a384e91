"""The engine: one loaded model on one device, generating for one request at a time.

    engine = Engine.load(path, backend="reference")
    prepared = engine.prepare(GenerationRequest(prompt="Hello", max_tokens=16))
    gen = engine.run(prepared)            # yields GeneratedToken, returns GenerationResult

Backend-agnostic: everything on the device goes through the model's forward pass (adapters written
against `orcd_core.device.Device`) and `Device.sample`. Prefill is `prefill`; the per-token work is
the device's `Decoder` (`Device.decoder(decode_forward, ...)`): `decode_forward` is the model's
forward for one token, which the CUDA backend captures once as a graph and replays per token.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Generator

import numpy as np

from .device import MAX_STEP_TOKENS, Device, KVCache, Step
from .backends import create_device
from .errors import OrcdError
from .generation import (
    Cancelled,
    CancelToken,
    ContextLengthExceeded,
    GeneratedToken,
    GenerationRequest,
    GenerationResult,
    MAX_STOP_STRINGS,
    InvalidRequest,
    PreparedRequest,
)
from .gguf_file import check_supported, open_gguf
from .shape import resolve_context
from .stops import StopMatcher

PREFILL_CHUNK = MAX_STEP_TOKENS  # tokens per prefill forward call

class Engine:
    def __init__(self, *, model_path: Path, gguf, arch, model, device: Device, tokenizer, n_ctx: int,
                 backend: str, registry) -> None:
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
        self._info: dict | None = None

    # -- loading -----------------------------------------------------------------------------------

    @classmethod
    def load(cls, model_path, *, backend: str = "reference", gpu_device: int = 0, registry=None,
             tokenizer_path=None, max_context: int | None = None, load_chunk_mb: int = 1,
             progress: Callable[[float], None] | None = None) -> "Engine":
        """Open and validate the file, build its tokenizer, then upload the weights to a new device."""
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
        n_ctx = resolve_context(max_context, config.context_length)
        tokenizer = load_tokenizer(gguf, registry=registry, tokenizer_json=tokenizer_path)
        opts = {"load_chunk_mb": load_chunk_mb} if backend == "cuda" else {}
        device = create_device(backend, gpu_device, **opts)
        device.prepare_load(gguf, n_ctx=int(n_ctx), shape=config.shape(), progress=progress)
        model = arch.build(gguf, device, registry=registry)  # each upload_weight reports progress
        device.finish_load()
        if not device.plans_memory:
            _check_kv_fits(path, model, device, int(n_ctx))
        return cls(model_path=path, gguf=gguf, arch=arch, model=model, device=device, tokenizer=tokenizer,
                   n_ctx=int(n_ctx), backend=backend, registry=registry)

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

    def run(self, prepared: PreparedRequest, cancel: CancelToken | None = None
            ) -> Generator[GeneratedToken, None, GenerationResult]:
        """Prefill, then decode token by token (see ENGINE.md for the stop rules)."""
        from .tokenizer import IncrementalDetokenizer

        req, dev = prepared.request, self.device
        prompt = prepared.prompt_ids
        params = req.sampling
        cache = self.model.new_kv_cache(prepared.n_ctx)
        decoder = None
        try:
            t0 = time.perf_counter()
            logits = self.prefill(prompt, cache, cancel=cancel)  # [1, V]
            W = max(1, params.repetition_window)
            recent = ([-1] * W + prompt)[-W:]
            next_id = dev.sample(dev.logits_last(logits), params, dev.to_device(recent), dev.to_device([0]))
            token = int(dev.to_host(next_id).reshape(-1)[0])
            prompt_ms = (time.perf_counter() - t0) * 1e3
            t1 = time.perf_counter()
            eog = set(self.tokenizer.eog_ids)
            detok = IncrementalDetokenizer(self.tokenizer, skip_special=True)  # control tokens render empty
            stops = StopMatcher(req.stop)
            out_ids: list[int] = []
            text_parts: list[str] = []
            finish = "length"
            pending: GeneratedToken | None = None  # yielded one step late, so the last one can
            for index in range(req.max_tokens):  # carry the text released at the end
                if cancel is not None and cancel.cancelled:
                    raise Cancelled("the request was cancelled", tokens_out=len(out_ids))
                if index > 0:
                    if decoder is None:  # feeds out_ids[-1] at its position, then samples
                        decoder = dev.decoder(lambda step: self.decode_forward(step, cache), first_id=out_ids[-1],
                                              position=len(prompt) + index - 1, params=params, step_index=index,
                                              recent_ids=prompt + out_ids, max_steps=req.max_tokens - index)
                    token = decoder.next()
                if token in eog:
                    finish = "stop"
                    break
                if pending is not None:
                    yield pending
                out_ids.append(token)
                text = stops.push(detok.push(token))
                text_parts.append(text)
                pending = GeneratedToken(id=token, index=index, text=text)
                if stops.stopped:
                    finish = "stop_sequence"
                    break
            if finish != "stop_sequence":
                tail = stops.push(detok.flush())
                tail += stops.flush()
                if tail and pending is not None:
                    text_parts.append(tail)
                    pending = GeneratedToken(id=pending.id, index=pending.index, text=pending.text + tail)
            if pending is not None:
                yield pending
            decode_ms = (time.perf_counter() - t1) * 1e3
            return GenerationResult(tokens_in=len(prompt), tokens_out=len(out_ids), finish_reason=finish,
                                    prompt_ms=prompt_ms, decode_ms=decode_ms, ids=out_ids, text="".join(text_parts))
        finally:
            if decoder is not None:
                decoder.close()
            dev.free_kv_cache(cache)

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
            chunk = ids[i0 : i0 + PREFILL_CHUNK]
            step = Step(len(chunk), dev.to_device(chunk), dev.to_device(np.arange(start, start + len(chunk))),
                        dev.to_device([start]))
            dev.begin_step(prefill=True)
            logits = self.model.forward(step, cache, all_logits=all_logits)
            if all_logits:
                outs.append(np.asarray(dev.to_host(logits), dtype=np.float32))
        return np.concatenate(outs) if all_logits else logits

    def decode_forward(self, step: Step, cache: KVCache):
        """The decode step's device work: the model's forward for one token -> its logits [V].
        Device ops only (the CUDA backend captures it as one graph)."""
        return self.device.logits_last(self.model.forward(step, cache))

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
        ("repetition_window", s.repetition_window >= 0, f"repetition_window must be >= 0, got {s.repetition_window}"),
        ("seed", 0 <= s.seed < 2**64, f"seed must be in 0..2^64-1, got {s.seed}"),
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
