"""Synthetic GGUF models: the tensor names, shapes, types and metadata that llama.cpp's converter and
`llama-quantize` write for a real model, filled with random valid blocks, deterministic from a seed.

Test support, not on the serving path. The core knows no architecture: each architecture adapter that
can be synthesized returns a `SynthSpec` from its optional `Architecture.synth_spec()` (the dims of
its full-size and tiny models, its tensor table in converter order, its metadata, its default recipe
and vocabulary; see docs/plugin_hooks.md). `archs()` lists the installed ones (the built-in adapters
provide the five architectures of the design's table).

`size="tiny"` scales the widths down while keeping every structural feature (GQA ratio, head size and rope
dimension, the type mix including the legacy fall-backs of widths not divisible by 256, experts, sinks,
window, YaRN); `layers` overrides the layer count.

Types follow a *recipe* named like llama.cpp's file types: `Q4_K_M` (the mixture logic of llama-quantize:
attn_v / ffn_down get Q6_K on the `use_more_bits` layers, fused QKV gets Q5_K, output Q6_K, and types whose
block does not divide the row fall back to Q5_0 / Q5_1 / Q8_0), `MXFP4_MOE` (experts MXFP4, the rest Q8_0),
or the name of any installed tensor type, a third-party plugin's included (every quantizable tensor in
that type, as `llama-quantize ... TYPE` does, the output matrix Q6_K; `F32`/`F16` give unquantized
files); `recipes()` lists them. Tensors that the converter always keeps in F32 (norms, biases, 1-D tensors, the
router, learned positions) stay F32. Tensors are written in the order the converter emits them for a
single-file checkpoint (sorted by Hugging Face name), because llama-quantize's per-layer choices count
tensors in file order (an adapter's tests check its untied plan against a real file's tensor table
where one is at hand).

Random data comes from the registered `QuantFormat.random_blocks` of each type, in chunks of whole rows,
each chunk from its own generator seeded by (seed, tensor index, chunk index): the output does not depend
on the number of threads. Weights have magnitude ~1/sqrt(fan_in), norms ~1, biases ~0.02, so activations
stay finite through many layers. The file is streamed: tensor infos first, then data produced by a thread
pool (NumPy releases the GIL) and written in order with a bounded number of chunks in flight.
"""

from __future__ import annotations

import math
import os
import struct
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OrcdError

SIZES = ("full", "tiny")
CHUNK_BYTES = 8 << 20  # bytes of output per generation task
ALIGNMENT = 32


class SynthError(OrcdError):
    """A synthetic model cannot be built as asked (unknown arch, missing vocabulary or quant type)."""


# -- shapes ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dims:
    """Hyper-parameters of one synthetic model (GGUF metadata names in comments)."""

    n_layer: int  # block_count
    n_embd: int  # embedding_length
    n_ff: int  # feed_forward_length (per expert for MoE)
    n_head: int  # attention.head_count
    n_head_kv: int  # attention.head_count_kv
    head_dim: int  # n_embd / n_head unless the arch decouples them (gpt-oss)
    n_ctx: int  # context_length
    n_expert: int = 0
    n_expert_used: int = 0
    rope_dim: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


#: One row of a tensor table: (name, GGML shape (ne0 first), role, fan_in). Roles: "weight" (scaled
#: 1/sqrt(fan_in)), "norm" (gains near 1, always F32), "bias" (~0.02), "sinks" (~1).
TableRow = tuple[str, tuple[int, ...], str, int]


class TensorTable(list):
    """A tensor table being written in file order (what `SynthSpec.tensors` returns)."""

    def add(self, name: str, shape, role: str = "weight", fan_in: int | None = None) -> None:
        """`fan_in` defaults to ne0 (the row length)."""
        self.append((name, tuple(int(x) for x in shape), role, int(fan_in if fan_in is not None else shape[0])))


@dataclass(frozen=True)
class SynthSpec:
    """What an architecture adapter tells `build_plan` about its synthetic models."""

    model_name: str  # the real model the full size imitates ("Qwen2.5-0.5B-Instruct")
    sizes: dict[str, Dims]  # "full" and "tiny"
    recipe: str  # default type recipe (one of `recipes()`)
    tied: bool  # by default output.weight is the token embedding (not written)
    #: (dims, n_vocab, tied) -> the tensor table in the order the converter writes it
    tensors: Callable[[Dims, int, bool], list[TableRow]]
    #: (dims, n_vocab) -> (key suffix after "{arch}.", value, kind "u32" | "f32" | "str")
    metadata: Callable[[Dims, int], list[tuple[str, Any, str]]]
    #: progress -> the real vocabulary GGUF whose tokenizer.* entries are copied
    vocab: Callable[[Callable[[str], None] | None], Path]
    can_tie: bool = True  # False: the architecture always has a separate output.weight


def spec_of(arch: str, registry=None) -> SynthSpec:
    """The `SynthSpec` of an installed architecture; SynthError naming the ones that have one."""
    registry = _registry(registry)
    adapter = registry.architecture(arch)
    spec = adapter.synth_spec() if adapter is not None else None
    if spec is None:
        raise SynthError(f"unknown architecture {arch!r} (known: {', '.join(archs(registry))})")
    return spec


def archs(registry=None) -> tuple[str, ...]:
    """The installed architectures whose adapters can be synthesized, in registration order."""
    registry = _registry(registry)
    return tuple(name for name, a in registry.architectures.items() if a.synth_spec() is not None)


def _registry(registry):
    if registry is None:
        from ..plugins import default_registry

        registry = default_registry()
    return registry


@dataclass(frozen=True)
class TensorPlan:
    """One tensor: GGML shape (ne0 first), type name, how to fill it."""

    name: str
    shape: tuple[int, ...]
    type_name: str
    role: str  # "weight" | "norm" | "bias" | "sinks"
    scale: float

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclass
class SynthPlan:
    arch: str
    size: str
    recipe: str
    dims: Dims
    metadata: list[tuple[str, bytes]]  # (key, encoded value: GGUF type id + value bytes)
    tensors: list[TensorPlan]
    vocab_path: Path

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.type_name] = counts.get(t.type_name, 0) + 1
        return counts


def layer_order(n_layer: int) -> list[int]:
    """Layers in the order of their HF names sorted as strings (0, 1, 10, 11, ..., 2, 20, ...): the
    converter writes a single-file checkpoint sorted by Hugging Face name."""
    return sorted(range(n_layer), key=str)


# -- type recipes (llama-quantize's choices, written from its documented behaviour) -------------------

_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "Q2_K": "Q4_0", "Q3_K": "Q4_0"}
_FLOATS = ("F32", "F16", "BF16")
#: llama.cpp's type mixtures; the other recipes are the installed tensor types (`recipes()`)
MIXTURES = ("Q4_K_M", "MXFP4_MOE")


def recipes(registry=None) -> tuple[str, ...]:
    """The recipes `build_plan` accepts: the mixtures, then every installed tensor type by GGML type id
    (the core's floats and any plugin's formats, discovered through the registry)."""
    formats = _registry(registry).quant_formats
    return MIXTURES + tuple(formats[t].name for t in sorted(formats))


def _check_recipe(recipe: str, registry) -> None:
    known = recipes(registry)
    if recipe in known:
        return
    if recipe in _ggml_blocks():
        raise SynthError(f"recipe {recipe}: no installed plugin provides the tensor type {recipe} "
                         f"(installed: {_registry(registry).describe_installed()})")
    raise SynthError(f"unknown recipe {recipe!r} (known: {', '.join(known)})")


def _ggml_blocks() -> dict[str, int]:
    """GGML type name -> elements per block, for every type gguf-py knows (installed or not)."""
    from ..gguf_file import ggml_type_table

    return {name: block for name, block, _size in ggml_type_table().values()}


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _keeps_f32(name: str, shape: tuple[int, ...]) -> bool:
    """Tensors the converter writes in F32 and llama-quantize leaves alone."""
    return (
        len(shape) < 2
        or not name.endswith(".weight")
        or name.endswith("_norm.weight")
        or "ffn_gate_inp." in name
        or name == "position_embd.weight"
    )


def _fallback(type_name: str, ne0: int, blocks: dict[str, int]) -> str:
    if ne0 % blocks[type_name] == 0:
        return type_name
    fb = _FALLBACK.get(type_name, type_name)
    return fb if ne0 % blocks[fb] == 0 else "F16"


def _assign_types(table, recipe: str, n_layer: int) -> list[str]:
    """The GGML type of each tensor of `table` under `recipe` (checked by the caller), counting as
    llama-quantize does (file order)."""
    blocks = _ggml_blocks()
    tied = not any(name == "output.weight" for name, *_ in table)
    n_attn_v = sum(1 for name, *_ in table if name.endswith(("attn_v.weight", "attn_qkv.weight")))
    i_attn_v = i_ffn_down = 0
    default = {"Q4_K_M": "Q4_K", "MXFP4_MOE": "MXFP4"}.get(recipe, recipe)
    types = []
    for name, shape, _role, _fan in table:
        if _keeps_f32(name, shape):
            types.append("F32")
            continue
        if recipe in _FLOATS:
            types.append(recipe)
            continue
        ne0 = shape[0]
        t = default
        if name == "output.weight" or (tied and name == "token_embd.weight"):
            if recipe == "MXFP4_MOE" or ne0 % blocks[default]:
                t = "Q8_0"
            elif t != "Q8_0":
                t = "Q6_K"
        elif recipe == "MXFP4_MOE":
            t = "MXFP4" if len(shape) == 3 and shape[2] > 1 else "Q8_0"
        elif name.endswith(("attn_v.weight", "attn_qkv.weight")):
            if recipe == "Q4_K_M":
                if name.endswith("attn_qkv.weight"):
                    t = "Q5_K"
                elif _use_more_bits(i_attn_v, n_attn_v):
                    t = "Q6_K"
            i_attn_v += 1
        elif name.endswith(("ffn_down.weight", "ffn_down_exps.weight")):
            i_layer = int(name.split(".")[1]) if len(shape) == 3 else i_ffn_down
            if recipe == "Q4_K_M" and _use_more_bits(i_layer, n_layer):
                t = "Q6_K"
            i_ffn_down += 1
        types.append(_fallback(t, ne0, blocks))
    return types


# -- vocabularies ------------------------------------------------------------------------------------


def default_vocab(arch: str, progress: Callable[[str], None] | None = None, registry=None) -> Path:
    """The real vocabulary GGUF used for `arch` (fetched into the cache on first use)."""
    return spec_of(arch, registry).vocab(progress)


_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_T_STRING, _T_ARRAY, _T_UINT32, _T_FLOAT32 = 8, 9, 4, 6


def _vocab_fields(path: Path) -> tuple[list[tuple[str, bytes]], int]:
    """The `tokenizer.*` metadata entries of a GGUF file as raw encoded values (type + value bytes, copied
    verbatim) and its token count. A small scanner of our own: copying 300k tokens through a generic
    reader and writer takes tens of seconds, slicing the bytes takes a fraction of one."""
    if not path.is_file():
        raise SynthError(f"vocabulary file {path} does not exist")
    data = path.read_bytes()
    try:
        fields, n_vocab = _scan_tokenizer_kv(data)
    except (struct.error, IndexError, ValueError) as exc:
        raise SynthError(f"{path}: not a readable GGUF vocabulary ({exc})") from None
    if not n_vocab:
        raise SynthError(f"{path}: no tokenizer.ggml.tokens array (not a vocabulary GGUF)")
    return fields, n_vocab


def _scan_tokenizer_kv(data: bytes) -> tuple[list[tuple[str, bytes]], int]:
    if data[:4] != b"GGUF":
        raise ValueError("bad magic")
    version, _n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version}")
    pos = 24
    out: list[tuple[str, bytes]] = []
    n_vocab = 0

    def skip_value(vtype: int, pos: int) -> tuple[int, int]:
        """End of the value at `pos`, and its array length (0 for scalars)."""
        if vtype in _GGUF_SCALAR_SIZES:
            return pos + _GGUF_SCALAR_SIZES[vtype], 0
        if vtype == _T_STRING:
            (n,) = struct.unpack_from("<Q", data, pos)
            return pos + 8 + n, 0
        if vtype == _T_ARRAY:
            sub, n = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if sub in _GGUF_SCALAR_SIZES:
                return pos + n * _GGUF_SCALAR_SIZES[sub], n
            for _ in range(n):
                pos, _len = skip_value(sub, pos)
            return pos, n
        raise ValueError(f"unknown metadata type {vtype}")

    for _ in range(n_kv):
        (klen,) = struct.unpack_from("<Q", data, pos)
        key = data[pos + 8 : pos + 8 + klen].decode("utf-8")
        pos += 8 + klen
        (vtype,) = struct.unpack_from("<I", data, pos)
        end, length = skip_value(vtype, pos + 4)
        if end > len(data):
            raise ValueError(f"metadata {key!r} runs past the end of the file")
        if key.startswith("tokenizer."):
            out.append((key, data[pos:end]))
            if key == "tokenizer.ggml.tokens":
                n_vocab = length
        pos = end
    return out, n_vocab


def _kv_value(value: Any, kind: str) -> bytes:
    """Encode one scalar metadata value (type id + value)."""
    if kind == "u32":
        return struct.pack("<II", _T_UINT32, value)
    if kind == "f32":
        return struct.pack("<If", _T_FLOAT32, value)
    if kind == "str":
        raw = value.encode("utf-8")
        return struct.pack("<IQ", _T_STRING, len(raw)) + raw
    raise ValueError(kind)


def _gguf_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


# -- metadata ----------------------------------------------------------------------------------------


def _file_type(recipe: str) -> int:
    import gguf

    if recipe == "F32":
        return int(gguf.LlamaFileType.ALL_F32)
    try:
        return int(gguf.LlamaFileType[f"MOSTLY_{recipe}"])
    except KeyError:
        return int(gguf.LlamaFileType.GUESSED)


# -- the plan ----------------------------------------------------------------------------------------


def build_plan(
    arch: str,
    size: str = "tiny",
    layers: int | None = None,
    recipe: str | None = None,
    vocab: str | os.PathLike[str] | None = None,
    tied: bool | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    registry=None,
) -> SynthPlan:
    """Everything about the file except the random data: metadata and the tensor table."""
    spec = spec_of(arch, registry)
    if size not in SIZES:
        raise SynthError(f"unknown size {size!r} (known: {', '.join(SIZES)})")
    dims = spec.sizes[size]
    if layers is not None:
        if layers < 1:
            raise SynthError(f"--layers must be at least 1, got {layers}")
        dims = replace(dims, n_layer=layers)
    recipe = recipe or spec.recipe
    _check_recipe(recipe, registry)
    tied = spec.tied if tied is None else tied
    if tied and not spec.can_tie:
        raise SynthError(f"{arch} always has a separate output.weight (llama.cpp requires it)")
    vocab_path = Path(vocab) if vocab is not None else spec.vocab(progress)
    tok_fields, n_vocab = _vocab_fields(vocab_path)

    table = spec.tensors(dims, n_vocab, tied)
    types = _assign_types(table, recipe, dims.n_layer)
    tensors = []
    for (name, shape, role, fan_in), type_name in zip(table, types, strict=True):
        if role in ("weight",):
            scale = 1.0 / math.sqrt(fan_in)
        elif role == "bias":
            scale = 0.02
        else:
            scale = 1.0
        tensors.append(TensorPlan(name, shape, type_name, role, scale))

    metadata: list[tuple[str, bytes]] = [
        ("general.architecture", _kv_value(arch, "str")),
        ("general.type", _kv_value("model", "str")),
        ("general.name", _kv_value(f"orcd synthetic {spec.model_name} ({size}, {dims.n_layer} layers, seed {seed})", "str")),
    ]
    metadata += [(f"{arch}.{k}", _kv_value(v, kind)) for k, v, kind in spec.metadata(dims, n_vocab)]
    metadata.append(("general.file_type", _kv_value(_file_type(recipe), "u32")))
    metadata += tok_fields
    metadata.append(("general.quantization_version", _kv_value(2, "u32")))
    return SynthPlan(arch, size, recipe, dims, metadata, tensors, vocab_path)


# -- writing -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WriteStats:
    path: Path
    bytes: int
    tensors: int
    seconds: float
    threads: int

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else float("inf")


def _formats_for(plan: SynthPlan, registry) -> dict[str, Any]:
    formats = {}
    for t in plan.tensors:
        if t.type_name in formats:
            continue
        fmt = registry.quant_format_by_name(t.type_name)
        if fmt is None:
            raise SynthError(
                f"tensor {t.name!r} needs type {t.type_name}, which no installed plugin provides "
                f"(installed: {registry.describe_installed()}); choose another --recipe"
            )
        formats[t.type_name] = fmt
    return formats


def _chunk_tasks(plan: SynthPlan, formats: dict[str, Any]):
    """Yield (tensor index, chunk index, tensor, format, rows) for every chunk of whole rows, in file order."""
    for ti, t in enumerate(plan.tensors):
        fmt = formats[t.type_name]
        row_bytes = fmt.row_bytes(t.shape[0])
        n_rows = t.n_elements // t.shape[0]
        rows_per_chunk = max(1, CHUNK_BYTES // row_bytes)
        for ci, start in enumerate(range(0, n_rows, rows_per_chunk)):
            yield ti, ci, t, fmt, min(rows_per_chunk, n_rows - start)


def _generate(seed: int, ti: int, ci: int, t: TensorPlan, fmt, rows: int) -> np.ndarray:
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, ti, ci])))
    n = rows * t.shape[0]
    if t.role == "norm":  # norm gains around 1, never quantized
        if t.type_name != "F32":
            raise SynthError(f"{t.name}: norm weights must be F32, planned {t.type_name}")
        return (1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32)).view(np.uint8)
    try:
        blocks = fmt.random_blocks(rng, n // fmt.block_size, t.scale)
    except ValueError as exc:  # e.g. a scale the format's block scales cannot hold
        raise SynthError(f"{t.name} ({t.type_name}, scale {t.scale:.3g}): {exc}") from None
    return np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1)


def write_plan(
    plan: SynthPlan,
    out: str | os.PathLike[str],
    seed: int = 0,
    registry=None,
    threads: int | None = None,
) -> WriteStats:
    """Stream the file of `plan` to `out` (atomically: a temporary file renamed at the end)."""
    formats = _formats_for(plan, _registry(registry))
    threads = threads or min(32, os.cpu_count() or 1)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    t0 = time.perf_counter()
    header = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(plan.tensors), len(plan.metadata)))
    for key, value in plan.metadata:
        header += _gguf_string(key) + value
    offset = 0
    for t in plan.tensors:
        fmt = formats[t.type_name]
        header += _gguf_string(t.name) + struct.pack("<I", len(t.shape))
        header += struct.pack(f"<{len(t.shape)}Q", *t.shape)
        header += struct.pack("<IQ", int(fmt.ggml_type), offset)
        offset += _padded(fmt.row_bytes(t.shape[0]) * (t.n_elements // t.shape[0]))
    header += b"\0" * (-len(header) % ALIGNMENT)
    try:
        with open(tmp, "wb") as fout:
            fout.write(header)
            _write_data(plan, fout, formats, seed, threads)
            size = fout.tell()
        if size != len(header) + offset:
            raise SynthError(f"{out}: wrote {size} bytes, expected {len(header) + offset}")
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SynthError(f"{out}: cannot write ({exc.strerror or exc})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return WriteStats(out, size, len(plan.tensors), time.perf_counter() - t0, threads)


def _padded(n: int) -> int:
    return n + (-n % ALIGNMENT)


def _write_data(plan: SynthPlan, fout, formats, seed: int, threads: int) -> int:
    expected = {ti: formats[t.type_name].row_bytes(t.shape[0]) * (t.n_elements // t.shape[0]) for ti, t in enumerate(plan.tensors)}
    written = dict.fromkeys(expected, 0)
    max_in_flight = 2 * threads
    total = 0
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="synth") as pool:
        pending: deque = deque()

        def drain_one():
            nonlocal total
            ti, fut = pending.popleft()
            data = fut.result()
            fout.write(memoryview(data))
            written[ti] += data.nbytes
            total += data.nbytes
            if written[ti] == expected[ti]:
                fout.write(b"\0" * (-expected[ti] % ALIGNMENT))

        for ti, ci, t, fmt, rows in _chunk_tasks(plan, formats):
            pending.append((ti, pool.submit(_generate, seed, ti, ci, t, fmt, rows)))
            if len(pending) >= max_in_flight:
                drain_one()
        while pending:
            drain_one()
    for ti, n in written.items():
        if n != expected[ti]:
            raise SynthError(f"{plan.tensors[ti].name}: generated {n} bytes, expected {expected[ti]}")
    return total


def synthesize(
    arch: str,
    out: str | os.PathLike[str],
    *,
    size: str = "tiny",
    layers: int | None = None,
    seed: int = 0,
    recipe: str | None = None,
    vocab: str | os.PathLike[str] | None = None,
    tied: bool | None = None,
    registry=None,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> WriteStats:
    """Build the plan for `arch` and write it to `out`. See the module docstring."""
    plan = build_plan(arch, size, layers, recipe, vocab, tied, seed, progress, registry)
    return write_plan(plan, out, seed, registry, threads)
