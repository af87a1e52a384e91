"""Continuous batching: the requests of one engine decoding together, one batched step at a time.

    sched = engine.scheduler                     # one per engine, `max_batch` sequences at once
    seq = sched.submit(prepared, cancel)         # waits for a place; its events come out of step()
    while sched.busy:
        for seq, event in sched.step():          # GeneratedToken | GenerationResult | GenerationError
            ...

One `step()` is one iteration: the sequences still prefilling run one prefill chunk each, oldest
first, while their chunks fit in one chunk's worth of tokens (PREFILL_CHUNK; the oldest always runs
one; when a prompt is in the cache its first token is sampled and the sequence joins the decode
batch), then every decoding sequence takes one decode step together (`Device.batch_decoder`: one
batched GEMV per weight, each row its own KV cache, position and sampling parameters). So a long
prompt holds the running streams back by one chunk per step, never by its whole prefill; short
prompts that arrive together join the batch in the same iteration (with one prefill an iteration, 8
streams sent together decoded 1..7 rows for their first steps); and a sequence that ends, fails or
is cancelled leaves between two steps while the others go on. Cancels are seen at every
step, also between the chunks of a prefill.

A sequence's tokens do not depend on its neighbours: each row is sampled with its own seed and step
index, and the backends compute each row of a decode step as they compute a lone token (the reference
backend row by row; the CUDA kernels with the same per-row arithmetic for any row count).

Per token (ENGINE.md's stop rules): an end-of-generation id ends the sequence (`stop`) and is not
emitted; otherwise the id is detokenized (UTF-8 safe) and matched against the stop sequences; a
completed stop sequence ends it (`stop_sequence`, the stop text dropped); `max_tokens` ends it
(`length`). A token is emitted as soon as its text is final; only while text is held back (a split
code point, a possible stop-sequence prefix) does it wait for the next, so that text released at the
end of the generation rides on the last token event.
"""

from __future__ import annotations

import collections
import dataclasses
import time

from .device import DecodeRow
from .generation import (
    Cancelled,
    CancelToken,
    GeneratedToken,
    GenerationError,
    GenerationResult,
    PreparedRequest,
)
from .sampling import token_logprobs
from .stops import StopMatcher


class Sequence:
    """One request in the scheduler: its cache, its place in the decode batch and its output."""

    def __init__(self, prepared: PreparedRequest, cancel: CancelToken | None):
        self.prepared = prepared
        self.cancel = cancel
        self.state = "waiting"  # waiting -> prefill -> decode -> done
        self.cache = None
        self.row: DecodeRow | None = None
        self.n_prefilled = 0
        self.fence = None  # after its last queued prefill chunk (Device.fence): the host stays one chunk ahead
        self.out_ids: list[int] = []
        self.text_parts: list[str] = []
        self.pending: GeneratedToken | None = None
        self.detok = None
        self.stops = StopMatcher(prepared.request.stop)
        self.eog: frozenset[int] = frozenset()
        self.t_start = 0.0
        self.t_first = 0.0
        self.prompt_ms = 0.0

    @property
    def done(self) -> bool:
        return self.state == "done"


class Scheduler:
    """The engine's sequences: at most `max_batch` prefilling or decoding, the rest waiting (FIFO)."""

    def __init__(self, engine, max_batch: int):
        self.engine = engine
        self.max_batch = int(max_batch)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.active: list[Sequence] = []  # prefill or decode, in arrival order
        self._decoder = None
        # what the last `step()` did, for the worker's metrics: sequences in its decode step (0: none),
        # seconds that step waited for the device (BatchDecoder.wait_s) and the device's time for it
        # (BatchDecoder.gpu_s)
        self.last_rows = 0
        self.last_wait_s = 0.0
        self.last_gpu_s = 0.0

    # -- the caller's side -------------------------------------------------------------------------

    def submit(self, prepared: PreparedRequest, cancel: CancelToken | None = None) -> Sequence:
        seq = Sequence(prepared, cancel)
        self.waiting.append(seq)
        return seq

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.active)

    @property
    def n_free(self) -> int:
        """Places left before a submitted sequence has to wait."""
        return max(0, self.max_batch - len(self.active) - len(self.waiting))

    def step(self) -> list[tuple[Sequence, object]]:
        """One iteration (see the module docstring); returns the events it produced, in order."""
        events: list[tuple[Sequence, object]] = []
        self.last_rows, self.last_wait_s, self.last_gpu_s = 0, 0.0, 0.0
        for seq in [s for s in self.active if s.cancel is not None and s.cancel.cancelled]:
            where = " during prefill" if seq.state == "prefill" else ""
            self._fail(seq, Cancelled(f"the request was cancelled{where}", tokens_out=len(seq.out_ids)), events)
        for seq in [s for s in self.waiting if s.cancel is not None and s.cancel.cancelled]:
            self.waiting.remove(seq)
            self._fail(seq, Cancelled("the request was cancelled while waiting", tokens_out=0), events)
        while self.waiting and len(self.active) < self.max_batch:
            seq = self.waiting.popleft()
            seq.state = "prefill"
            self.active.append(seq)
        self._prefill(events)
        decoder = self._decoder
        if decoder is not None and decoder.rows:
            by_row = {id(s.row): s for s in self.active if s.state == "decode"}
            try:
                pairs = decoder.step()
            except GenerationError as exc:  # a failed step fails every sequence in it
                for seq in list(by_row.values()):
                    self._fail(seq, exc, events)
                return events
            self.last_rows, self.last_wait_s, self.last_gpu_s = len(pairs), decoder.wait_s, decoder.gpu_s
            for row, token in pairs:
                seq = by_row[id(row)]
                self._push(seq, token, events, row.last_logprobs)
        return events

    def warm_up(self, cache) -> None:
        """Before the first request: the decode loop's `BatchDecoder.warm_up` on a scratch KV cache of
        the engine's layout (`cache`, the caller's)."""
        if self.busy:
            raise RuntimeError("Scheduler.warm_up: sequences are running")
        self._decoder_for().warm_up(cache)

    def close(self) -> None:
        """End everything (without events) and release the decoder's graphs."""
        for seq in list(self.active):
            self._release(seq)
        self.waiting.clear()
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None

    # -- the work ----------------------------------------------------------------------------------

    def _prefill(self, events) -> None:
        """One chunk of each prefilling sequence, in arrival order, while the chunks' tokens add up to
        at most PREFILL_CHUNK (the first one runs whatever its size); the first that does not fit
        ends the round, so a later short prompt never overtakes an earlier long one."""
        from .engine import PREFILL_CHUNK

        budget = PREFILL_CHUNK
        for seq in [s for s in self.active if s.state == "prefill"]:
            n = min(PREFILL_CHUNK, len(seq.prepared.prompt_ids) - seq.n_prefilled)
            if n > budget and budget < PREFILL_CHUNK:
                break
            budget -= n
            try:
                self._prefill_chunk(seq, events)
            except GenerationError as exc:
                self._fail(seq, exc, events)

    def _prefill_chunk(self, seq: Sequence, events) -> None:
        from .engine import PREFILL_CHUNK
        from .tokenizer import IncrementalDetokenizer

        eng, dev = self.engine, self.engine.device
        prompt = seq.prepared.prompt_ids
        if seq.cache is None:
            seq.t_start = time.perf_counter()
            seq.cache = eng.model.new_kv_cache(seq.prepared.n_ctx)
        i0 = seq.n_prefilled
        logits = eng.prefill(prompt[i0 : i0 + PREFILL_CHUNK], seq.cache, start_pos=i0)
        seq.n_prefilled = min(len(prompt), i0 + PREFILL_CHUNK)
        if seq.n_prefilled < len(prompt):
            # the chunk before this one must be done before the next iteration: the GPU always has a
            # chunk queued, and a cancel (checked as each iteration starts) stops the prefill within
            # about two chunks instead of after the whole prompt, all of which the host would have queued
            prev, seq.fence = seq.fence, dev.fence()
            if prev is not None:
                prev.wait()
            return
        seq.fence = None
        params = seq.prepared.request.sampling
        W = max(1, params.repetition_window)
        recent = ([-1] * W + prompt)[-W:]
        last = dev.logits_last(logits)
        first = dev.sample(last, params, dev.to_device(recent), dev.to_device([0]))
        token = int(dev.to_host(first).reshape(-1)[0])
        k = seq.prepared.request.logprobs
        lp = token_logprobs(dev.to_host(last), token, k) if k is not None else None
        seq.t_first = time.perf_counter()
        seq.prompt_ms = (seq.t_first - seq.t_start) * 1e3
        seq.detok = IncrementalDetokenizer(eng.tokenizer, skip_special=True)  # control tokens render empty
        seq.eog = frozenset(eng.tokenizer.eog_ids)
        seq.state = "decode"
        max_tokens = seq.prepared.request.max_tokens
        if max_tokens <= 0:
            self._finish(seq, "length", events)
            return
        if not self._push(seq, token, events, lp) and max_tokens > 1:
            W = int(params.repetition_window)
            seq.row = DecodeRow(cache=seq.cache, id=token, position=len(prompt), step_index=1, params=params,
                                recent=(prompt + [token])[-W:] if W > 0 else [], budget=max_tokens - 1,
                                logprobs=k)
            self._decoder_for().join(seq.row)

    def _decoder_for(self):
        if self._decoder is None:
            eng = self.engine
            self._decoder = eng.device.batch_decoder(eng.decode_forward, max_rows=self.max_batch)
        return self._decoder

    def _push(self, seq: Sequence, token: int, events, logprobs=None) -> bool:
        """Account one sampled token of `seq` (with its `TokenLogprobs` when asked for); True when it
        ended the sequence."""
        if token in seq.eog:
            self._finish(seq, "stop", events)
            return True
        if seq.pending is not None:
            events.append((seq, seq.pending))
            seq.pending = None
        seq.out_ids.append(token)
        text = seq.stops.push(seq.detok.push(token))
        seq.text_parts.append(text)
        tok = GeneratedToken(id=token, index=len(seq.out_ids) - 1, text=text, logprobs=logprobs)
        if seq.stops.stopped:
            seq.pending = tok
            self._finish(seq, "stop_sequence", events)
            return True
        if seq.detok.holding or seq.stops.held:
            seq.pending = tok  # its text may still grow at the end: sent with the next token
        else:
            events.append((seq, tok))
        if len(seq.out_ids) >= seq.prepared.request.max_tokens:
            self._finish(seq, "length", events)
            return True
        return False

    def _finish(self, seq: Sequence, finish: str, events) -> None:
        if finish != "stop_sequence" and seq.detok is not None:
            tail = seq.stops.push(seq.detok.flush()) + seq.stops.flush()
            if tail:
                seq.text_parts.append(tail)
                p = seq.pending
                if p is None:  # (nothing was held back: the tail is empty then; kept for safety)
                    p = GeneratedToken(id=seq.out_ids[-1], index=len(seq.out_ids) - 1, text="")
                seq.pending = dataclasses.replace(p, text=p.text + tail)
        if seq.pending is not None:
            events.append((seq, seq.pending))
            seq.pending = None
        decode_ms = (time.perf_counter() - seq.t_first) * 1e3 if seq.t_first else 0.0
        result = GenerationResult(tokens_in=len(seq.prepared.prompt_ids), tokens_out=len(seq.out_ids),
                                  finish_reason=finish, prompt_ms=seq.prompt_ms, decode_ms=decode_ms,
                                  ids=list(seq.out_ids), text="".join(seq.text_parts))
        self._release(seq)
        events.append((seq, result))

    def _fail(self, seq: Sequence, exc: GenerationError, events) -> None:
        self._release(seq)
        events.append((seq, exc))

    def _release(self, seq: Sequence) -> None:
        if seq.row is not None and self._decoder is not None and seq.row in self._decoder.rows:
            self._decoder.leave(seq.row)
        seq.row = None
        if seq.cache is not None:
            self.engine.device.free_kv_cache(seq.cache)  # stream-ordered after any step still using it
            seq.cache = None
        if seq in self.active:
            self.active.remove(seq)
        seq.state = "done"
