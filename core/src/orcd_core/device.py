"""The device interface: what architecture adapters call, and what each backend implements.

Two backends implement it: `reference` (NumPy on the CPU, orcd_core.backends.reference; the oracle)
and `cuda` (CuPy + our kernels, orcd_core.backends.cuda; the product). An adapter writes its forward
pass once against this interface, so the same code runs on both.

Tensors are the backend's arrays (numpy.ndarray / cupy.ndarray): adapters may `.reshape`, slice
with basic indexing and read `.shape`, nothing else; all arithmetic goes through a `Device` method.
Activations are float32 unless a method says otherwise.

Rules that keep the CUDA decode step capturable as one CUDA graph:
- No op reads a device value on the host. Positions and lengths are passed as device int32 arrays
  (`Step.positions`, `Step.n_past`), never as Python ints, in every op that runs during decode.
- Ops return new arrays; for a decode step the CUDA backend takes them from a per-step workspace
  (bump allocation reset by `begin_step`), so a replayed graph sees the same addresses. A prefill
  step's (`begin_step(prefill=True)`) come from a pool and are reused as soon as the adapter drops
  them, so its VRAM is about one layer's activations, not the whole step's (a captured prefill chunk,
  `Device.prefill_chunk` on CUDA, takes them from a pool of the graphs' own).
- Shapes (T, the number of tokens in the step) are host ints and fixed for a captured graph.
- One forward call carries at most MAX_STEP_TOKENS tokens (the engine prefills in chunks of that
  size); the KV ring of a sliding-window layer is sized for it.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .gguf_file import TensorInfo
from .sampling import token_logprobs

if TYPE_CHECKING:
    from .shape import ModelShape

MAX_STEP_TOKENS = 512  # tokens of one forward call at most: the engine's prefill chunk
MAX_BATCH = 8  # sequences of one batched decode step at most (the rows of its GEMVs)


@dataclass(frozen=True)
class RopeSpec:
    """Rotary position embedding, with llama.cpp's semantics (ggml_rope_ext).

    `n_rot` leading dims of each head rotate (partial rotary when < head_dim). `neox`: rotate pairs
    (i, i + n_rot/2) (GPT-NeoX/Qwen2/Phi-3/gpt-oss) instead of adjacent pairs (2i, 2i+1) (llama).
    theta_i = pos * freq_scale * base^(-2i/n_rot) / freq_factors[i]; YaRN mixing when ext_factor != 0.
    `freq_factors_key` names a device array the adapter uploaded (llama-3 rope scaling, Phi-3
    long/short factors) or None.
    """

    n_rot: int
    neox: bool
    base: float = 10000.0
    freq_scale: float = 1.0
    ext_factor: float = 0.0
    attn_factor: float = 1.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    n_ctx_orig: int = 0
    freq_factors: Any = None  # device float32 [n_rot // 2] or None


@dataclass
class Weight:
    """A weight in the backend's storage, kept in its GGUF type (quantized stays quantized).

    `shape` is NumPy order: [rows, cols] for a matrix (cols = GGML ne0, the reduced axis of
    `linear`), [n_expert, rows, cols] for stacked experts, [n] for vectors. `fmt` is the
    QuantFormat object. `data` is backend-specific (raw bytes on the device)."""

    name: str
    shape: tuple[int, ...]
    fmt: Any
    data: Any
    nbytes: int


@dataclass
class KVCache:
    """Per-layer fp16 K/V storage for one sequence. Backend-specific arrays in `k`, `v`:
    [n_ctx_layer, n_kv_heads, head_dim] each. `window[layer]` > 0 bounds a sliding-window layer's
    storage: a ring buffer (slot = position % rows) of min(n_ctx, window + MAX_STEP_TOKENS - 1) rows
    on the CUDA backend, which writes a step's keys before its queries read them, so a step of T
    tokens needs the window's past keys and its own T; the reference keeps `window` rows."""

    n_layers: int
    n_ctx: int
    n_kv_heads: int
    head_dim: int
    k: list[Any]
    v: list[Any]
    window: list[int] = field(default_factory=list)
    nbytes: int = 0


@dataclass
class KVBatch:
    """The KV caches of a batched decode step: row b of the step is one token of its own sequence,
    at `step.positions[b]`, which reads and writes `caches[b]`. Every cache has the engine's layout
    (same layers, context, windows). `table` is the backend's (the CUDA one: per layer, the rows'
    K and V addresses, rewritten when the rows change, so a captured step serves any sequences)."""

    caches: list[KVCache]
    n_ctx: int
    window: list[int] = field(default_factory=list)
    table: Any = None
    # an upper bound of every row's position + 1 in this step and in any replay of it (0: the context);
    # a backend may size the step's attention for it (the CUDA decode graphs are captured per bound)
    span: int = 0


@dataclass
class Step:
    """The tokens of one forward call: a prefill chunk of one sequence, or a decode step of one
    token per sequence (the cache argument is then a `KVBatch`).

    ids: device int32 [T]; positions: device int32 [T] (absolute positions); n_past: device int32 [1]
    (tokens already in the cache before this step), or [T] in a batched decode step (each row's
    own: its position). `T` is a host int."""

    T: int
    ids: Any
    positions: Any
    n_past: Any


@dataclass(eq=False)
class DecodeRow:
    """One sequence of a batched decode loop, as the host knows it: `id` is the last chosen token
    (not yet in the cache) at `position`; `step_index` the index among generated tokens of the token
    the next step returns; `recent` the ids the repetition penalty sees (oldest first, at most
    `params.repetition_window`); `budget` how many more steps may include it (None: no bound);
    `logprobs` (None, or k alternatives) asks each step to set `last_logprobs` (a
    `generation.TokenLogprobs` of the token it returns, from that step's raw logits)."""

    cache: KVCache
    id: int
    position: int
    step_index: int
    params: Any
    recent: list[int]
    budget: int | None = None
    logprobs: int | None = None
    last_logprobs: Any = None

    def advance(self, token: int) -> None:
        """The host's copy of what a step did on the device for this row."""
        W = int(self.params.repetition_window)
        if W > 0:
            self.recent = (self.recent + [int(token)])[-W:]
        self.id, self.position, self.step_index = int(token), self.position + 1, self.step_index + 1


class Fence:
    """`Device.fence()`: what a synchronous backend returns (its work is done when queued)."""

    def wait(self) -> None:
        """Return once the work queued before the fence is done."""


DONE = Fence()


class Device(abc.ABC):
    """A backend. One instance per process; it owns the weights, caches and workspaces it creates."""

    name: str  # "reference" | "cuda"
    sm: str | None = None  # the GPU's compute capability ("90"); None off a GPU
    cuda_runtime_version: int | None = None  # cudaRuntimeGetVersion(); None off a GPU
    #: True when `prepare_load` checks weights + KV cache + workspace against free memory (the CUDA
    #: backend); else the engine allocates one KV cache of the context at load to prove it fits.
    plans_memory: bool = False

    def close(self) -> None:
        """Free everything the device holds (weights, caches, workspaces). The reference backend
        holds nothing beyond Python objects."""

    # -- memory -----------------------------------------------------------------------------------
    @abc.abstractmethod
    def upload_weight(self, name: str, parts: Sequence[TensorInfo], fmt: Any) -> Weight:
        """Copy one weight to the device, kept in its format. Several `parts` (same type and row
        length) are concatenated along the rows: that is how q|k|v and gate|up are fused at load."""

    @abc.abstractmethod
    def upload_array(self, name: str, array) -> Any:
        """A small dense host array (norm weights, biases, rope factors) as a float32 device array."""

    @abc.abstractmethod
    def new_kv_cache(self, n_layers: int, n_ctx: int, n_kv_heads: int, head_dim: int,
                     window: Sequence[int] | None = None) -> KVCache:
        """Allocate a KV cache; raises `orcd_core.generation.VramOOM` when it does not fit."""

    @abc.abstractmethod
    def free_kv_cache(self, cache: KVCache) -> None: ...

    @abc.abstractmethod
    def to_device(self, array, dtype: str = "int32") -> Any:
        """A host array (ids, positions) as a device array."""

    @abc.abstractmethod
    def to_host(self, array):
        """A device array as a NumPy array (synchronizes). Never called inside a decode step."""

    def fence(self) -> "Fence":
        """A marker after the work queued so far: its `wait()` returns once that work is done. The host
        queues a long prompt's prefill chunks without waiting for them, so a cancel checked between
        chunks would see them all queued; waiting on the fence of the chunk before the last one keeps
        the host at most one chunk ahead (Scheduler). Synchronous backends: done at once."""
        return DONE

    def begin_step(self, *, prefill: bool = False) -> None:
        """Start a forward call: the CUDA backend resets its per-step workspace here. `prefill`: a
        prefill chunk (its activations may come from a reusing pool)."""

    def prefill_chunk(self, forward: "Callable[..., Any]", ids: Sequence[int], start_pos: int, cache: KVCache, *,
                      all_logits: bool = False) -> Any:
        """One prefill forward call: `ids` (at most MAX_STEP_TOKENS) at positions `start_pos`, ... into
        `cache`, which holds the positions before them -> `forward(step, cache, all_logits=...)`'s logits:
        [1, V] for the last token, or [T, V]. `forward` is the model's; it must only call device ops.
        This default runs the ops one by one; the CUDA backend replays a CUDA graph per chunk length
        (backends/cuda/prefill.py)."""
        n = len(ids)
        step = Step(n, self.to_device(list(ids)), self.to_device(np.arange(start_pos, start_pos + n)),
                    self.to_device([start_pos]))
        self.begin_step(prefill=True)
        return forward(step, cache, all_logits=all_logits)

    def warm_up(self, forward: "Callable[..., Any]", cache: KVCache) -> None:
        """Called once at load with the model's forward and a KV cache of the engine's layout (freed
        after; anything may be written into it): what the backend prepares before the first request.
        The CUDA backend captures its prefill graphs here. This default does nothing."""

    def memory_report(self) -> dict[str, int]:
        """Bytes held by category: weights, kv_cache, workspace."""
        return {"weights": 0, "kv_cache": 0, "workspace": 0}

    @abc.abstractmethod
    def prepare_load(self, model, *, n_ctx: int, shape: "ModelShape",
                     progress: "ProgressFn | None" = None, n_seq: int = 1) -> None:
        """Called by the engine once, before the adapter uploads weights. `progress(fraction)` of
        the file's tensor bytes uploaded is reported through a `LoadProgress`: 0.0 here, then after
        each `upload_weight`, 1.0 in `finish_load`. A backend that `plans_memory` (the CUDA one)
        checks weights + `n_seq` KV caches (`n_ctx` positions of `shape`, the config's
        `orcd_core.shape.ModelShape`; one per request decoded at once) + workspace against free
        VRAM here (raising `orcd_core.errors.InsufficientVram`) and reserves its weight arena."""

    @abc.abstractmethod
    def finish_load(self) -> None:
        """Called by the engine once the adapter has uploaded every weight: reports progress 1.0;
        the CUDA backend also waits for the last chunk, frees its staging buffers, checks that every
        weight is resident in device memory and starts the periodic residency check."""

    @property
    def healthy(self) -> bool:
        """False once a periodic check found a weight no longer resident in device memory."""
        return True

    def batch_decoder(self, forward: "Callable[[Step, KVBatch], Any]", *, max_rows: int) -> "BatchDecoder":
        """The decode loop of up to `max_rows` (<= MAX_BATCH) sequences at once: each step feeds every
        row's last token, samples each row with its own parameters and returns one token per row.
        `forward(step, kv)` runs the model on a decode `Step` of T rows over the `KVBatch` and returns
        the rows' logits [T, V]; it must only call device ops. Rows join and leave between steps
        (`BatchDecoder.join` / `leave`). This default runs the ops one by one; the CUDA backend
        captures one CUDA graph per row count, kept across requests, and runs one step ahead."""
        return EagerBatchDecoder(self, forward, max_rows=max_rows)

    # -- ops --------------------------------------------------------------------------------------
    @abc.abstractmethod
    def embedding(self, table: Weight, ids) -> Any:
        """Rows of `table` [V, D] for `ids` [T] -> [T, D] float32 (dequantized row gather)."""

    @abc.abstractmethod
    def linear(self, x, w: Weight, bias=None) -> Any:
        """x [T, K] @ w[K -> N] (+ bias [N]) -> [T, N]. Matvec when T is small, else dequantize +
        GEMM. A 3-D (expert) weight is not accepted here: see `moe`."""

    @abc.abstractmethod
    def rms_norm(self, x, weight, eps: float) -> Any:
        """x [T, D] / rms(x) * weight [D]."""

    @abc.abstractmethod
    def layer_norm(self, x, weight, bias, eps: float) -> Any:
        """(x - mean) / std * weight + bias, over the last axis of [T, D]."""

    @abc.abstractmethod
    def rope(self, x, positions, spec: RopeSpec) -> Any:
        """Rotate x [T, H, head_dim] at `positions` [T] -> new array."""

    @abc.abstractmethod
    def attention(self, q, k, v, cache: KVCache, layer: int, step: Step, *, scale: float,
                  sinks=None, window: int = 0) -> Any:
        """Write k, v [T, Hkv, hd] into `cache` at `step.positions`, then causal attention of
        q [T, Hq, hd] over the cache (GQA: query head h uses KV head h // (Hq // Hkv)). `cache` may
        be a `KVBatch` (a batched decode step): row t then attends over `cache.caches[t]` only, at
        its own position.
        `sinks` [Hq]: learned logits added to each softmax denominator (gpt-oss). `window` > 0:
        a query at position p sees keys at positions > p - window. Returns [T, Hq, hd]."""

    @abc.abstractmethod
    def add(self, a, b) -> Any:
        """a + b, same shape (b may also be a [D] vector broadcast over rows)."""

    @abc.abstractmethod
    def silu_mul(self, gate, up) -> Any:
        """silu(gate) * up."""

    @abc.abstractmethod
    def gelu(self, x) -> Any:
        """GELU, tanh approximation (as ggml_gelu)."""

    @abc.abstractmethod
    def moe(self, x, router: Weight, router_bias, gate_up: Weight, gate_up_bias, down: Weight,
            down_bias, *, top_k: int, act: str, alpha: float = 1.702, limit: float = 7.0) -> Any:
        """Mixture of experts for x [T, D]: logits = x @ router (+ bias); choose top_k experts per
        token; weights = softmax over the chosen logits; each chosen expert e computes
        h = act(x @ gate_e, x @ up_e) then h @ down_e (+ biases); the output is the weighted sum.
        `gate_up` is [n_expert, 2*F, D]: rows [0, F) are gate, [F, 2F) are up. `act` is
        "swiglu_oai" (llama.cpp's ggml_swiglu_oai with `alpha`, `limit`) or "silu"."""

    @abc.abstractmethod
    def logits_last(self, x) -> Any:
        """The last row of x [T, V] as [V] float32 (a view where possible)."""

    @abc.abstractmethod
    def sample(self, logits, params, recent_ids, step_index) -> Any:
        """Choose the next token from logits [V] per `orcd_core.sampling` (same seed and inputs ->
        same id on every backend). `recent_ids`: device int32 [W] (for the repetition penalty,
        -1 = empty slot). `step_index`: device int32 [1]. Returns device int32 [1]."""


ProgressFn = Callable[[float], None]


class LoadProgress:
    """The load-progress callback of `Device.prepare_load`: `progress(fraction)` of `total_bytes`
    (the file's tensor bytes) uploaded, 0.0 at `start`, after each `add`, 1.0 at `finish`."""

    def __init__(self, progress: ProgressFn | None, total_bytes: int):
        self.progress = progress
        self.total = max(int(total_bytes), 1)
        self.done = 0

    def start(self) -> None:
        if self.progress is not None:
            self.progress(0.0)

    def add(self, nbytes: int) -> None:
        """`nbytes` more of the file's bytes are on the device (called by `upload_weight`)."""
        self.done += int(nbytes)
        if self.progress is not None:
            self.progress(min(1.0, self.done / self.total))

    def finish(self) -> None:
        if self.progress is not None:
            self.progress(1.0)



class BatchDecoder(abc.ABC):
    """A batched decode loop (see `Device.batch_decoder`). `rows` are the member sequences, in the
    order of the step's rows."""

    def __init__(self, device: Device, forward, *, max_rows: int):
        if not 1 <= int(max_rows) <= MAX_BATCH:
            raise ValueError(f"max_rows must be in 1..{MAX_BATCH}, got {max_rows}")
        self.device, self.forward, self.max_rows = device, forward, int(max_rows)
        self.rows: list[DecodeRow] = []
        self.changed = True  # the rows differ from those of the last step issued
        # seconds the last `step` waited for the device to finish a step it had issued (0 where the
        # loop cannot tell waiting from working, as the eager one): the rest of a step is host work
        self.wait_s = 0.0
        # seconds the device spent running the last step (0 where the loop cannot time it): beside
        # the step's wall time, whether the device or the host paces the loop
        self.gpu_s = 0.0

    def join(self, row: DecodeRow) -> None:
        if len(self.rows) >= self.max_rows:
            raise ValueError(f"batch decoder: already {len(self.rows)} rows (max_rows {self.max_rows})")
        if row.budget is not None and row.budget < 1:
            raise ValueError("batch decoder: a row without budget cannot join")
        self.rows.append(row)
        self.changed = True

    def leave(self, row: DecodeRow) -> None:
        """Remove a row; a step already issued with it may still write its cache (`close` or the next
        `step` waits for it before the caller frees the cache on the device's stream)."""
        self.rows.remove(row)
        self.changed = True

    def warm_up(self, cache: KVCache) -> None:
        """Called once at load with a scratch KV cache of the engine's layout (freed after; anything may
        be written into it), before any row joins: what the loop prepares for every row count before
        the first request. This default does nothing."""

    @abc.abstractmethod
    def step(self) -> list[tuple[DecodeRow, int]]:
        """Run one decode step of the current rows; returns (row, token) for each row of the step
        still a member, after `row.advance(token)` (and `row.last_logprobs` set where `row.logprobs`
        asks for them)."""

    def close(self) -> None:
        """Release what the loop holds (captured graphs); the KV caches stay the caller's."""


class EagerBatchDecoder(BatchDecoder):
    """`Device.batch_decoder`'s default: each step issued op by op, inputs uploaded per step, each row
    sampled by `Device.sample`."""

    def step(self) -> list[tuple[DecodeRow, int]]:
        d, rows = self.device, list(self.rows)
        if not rows:
            return []
        for r in rows:
            if r.budget is not None and r.budget < 1:
                raise RuntimeError("batch decoder: a row ran past its budget")
        self.changed = False
        d.begin_step()
        pos = d.to_device([r.position for r in rows])
        step = Step(T=len(rows), ids=d.to_device([r.id for r in rows]), positions=pos, n_past=pos)
        proto = rows[0].cache
        kv = KVBatch([r.cache for r in rows], proto.n_ctx, list(proto.window))
        logits = self.forward(step, kv)  # [T, V]
        out = []
        for b, r in enumerate(rows):
            W = max(int(r.params.repetition_window), 1)
            recent = ([-1] * W + r.recent)[-W:]
            tok = d.sample(logits[b], r.params, d.to_device(recent), d.to_device([r.step_index]))
            tok = int(d.to_host(tok).reshape(-1)[0])
            if r.logprobs is not None:
                r.last_logprobs = token_logprobs(d.to_host(logits[b]), tok, r.logprobs)
            if r.budget is not None:
                r.budget -= 1
            r.advance(tok)
            out.append((r, tok))
        return out
