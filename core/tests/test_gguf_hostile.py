"""Hostile GGUF files: a table of corruptions of tiny but complete models (tests/support/gguf_builder.py),
each taken through the whole load path (parse, plugin support check, architecture config, tokenizer
and chat template, reference-backend weight build). Every row must raise exactly its `ModelLoadError`
subclass, with a message naming the file and the field or tensor, within 1 s and with bounded memory
(tracemalloc peak; no allocation proportional to a claimed length). Then a truncation sweep: every
byte of the header region and every 1% of the data of a small model."""

from __future__ import annotations

import math
import struct
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from orcd_core.engine import Engine
from orcd_core.errors import (
    GGUFFormatError,
    GGUFMetadataError,
    GGUFTensorError,
    GGUFVocabularyError,
    InsufficientVram,
    ModelLoadError,
    UnsupportedArchitecture,
)
from orcd_core.generation import GenerationRequest
from orcd_core.gguf_file import open_gguf
from orcd_core.plugins import default_registry
from gguf_builder import (
    ARCHITECTURES, ARRAY, BOOL, F32, FLOAT32, INT32, INT64, KV, STRING, UINT32, UINT64, GGUFBuilder, Tensor,
    tiny_model,
)

MAX_SECONDS = 1.0
MAX_PEAK_BYTES = 32 << 20  # the tiny files are ~100 KB; a claimed length must never be allocated

EPS_KEY = {a: f"{a}.attention.layer_norm_rms_epsilon" for a in ARCHITECTURES} | {
    "gpt2": "gpt2.attention.layer_norm_epsilon"}


@dataclass(frozen=True)
class Case:
    id: str
    arch: str
    mutate: Callable[[GGUFBuilder], object]  # edits the builder; may return a bytes -> bytes post-edit
    error: type[ModelLoadError]
    field: str  # must appear in the message


def raw(key: str, body: bytes):
    def f(b: GGUFBuilder):
        b.get(key).raw = body
    return f


def set_(key: str, value, vtype=None, etype=None):
    return lambda b: b.set(key, value, vtype, etype)


def remove(key: str):
    return lambda b: b.remove(key)


def tensor_edit(tensor_name: str, **changes):
    def f(b: GGUFBuilder):
        t = b.tensor(tensor_name)
        for k, v in changes.items():
            setattr(t, k, v)
    return f


def header(**changes):
    def f(b: GGUFBuilder):
        for k, v in changes.items():
            setattr(b, k, v)
    return f


def overlap(b: GGUFBuilder):
    offsets = b.layout()
    b.tensors[2].offset = offsets[1]


def misalign(b: GGUFBuilder):
    b.tensors[1].offset = b.layout()[1] + 4


def duplicate_tensor(b: GGUFBuilder):
    t = b.tensors[-1]
    b.tensors.append(Tensor(t.name, list(t.dims), t.ggml_type, t.data))


def duplicate_key(b: GGUFBuilder):
    b.kvs.append(KV("general.name", STRING, "again"))


def first_key_length_huge(b: GGUFBuilder):
    return lambda data: data[:24] + struct.pack("<Q", 1 << 62) + data[32:]


def fewer_embedding_rows(b: GGUFBuilder):
    t = b.tensor("token_embd.weight")
    t.dims = [t.dims[0], t.dims[1] - 8]
    t.data = t.data[: t.dims[0] * t.dims[1] * 2]


def merges_unknown(b: GGUFBuilder):
    b.get("tokenizer.ggml.merges").value.append("zq qz")


def token_type_value(value: int):
    def f(b: GGUFBuilder):
        b.get("tokenizer.ggml.token_type").value[40] = value
    return f


def token_types_short(b: GGUFBuilder):
    kv = b.get("tokenizer.ggml.token_type")
    kv.value = kv.value[:-1]


def token_types_long(b: GGUFBuilder):
    b.get("tokenizer.ggml.token_type").value.append(1)


def scores_short(b: GGUFBuilder):
    kv = b.get("tokenizer.ggml.scores")
    kv.value = kv.value[:-3]


def byte_type_on_text(b: GGUFBuilder):
    kv = b.get("tokenizer.ggml.token_type")
    kv.value[-1] = 6  # "th" marked as a byte token


def n_vocab(b: GGUFBuilder) -> int:
    return len(b.get("tokenizer.ggml.tokens").value)


def halve_norm(b: GGUFBuilder):
    t = b.tensor("output_norm.weight")
    t.dims = [t.dims[0] // 2]
    t.data = t.data[: len(t.data) // 2]


def extra_tensor(b: GGUFBuilder):
    b.tensors.append(Tensor("blk.0.mystery.weight", [32], F32, bytes(128)))


CASES: list[Case] = [
    # -- header and structure ---------------------------------------------------------------------
    Case("bad-magic", "qwen2", header(magic=b"GGUX"), GGUFFormatError, "magic"),
    *[Case(f"version-{v}", "qwen2", header(version=v), GGUFFormatError, "version") for v in (0, 1, 4, 99)],
    Case("n-tensors-huge", "qwen2", header(n_tensors=1 << 63), GGUFFormatError, "tensor count"),
    Case("n-kv-huge", "qwen2", header(n_kv=1 << 63), GGUFFormatError, "metadata count"),
    # one count too many: the parser reads the next section as one more entry and finds a length
    # that no file can hold
    Case("n-kv-one-too-many", "qwen2", lambda b: setattr(b, "n_kv", len(b.kvs) + 1), GGUFFormatError, "tensor #0"),
    Case("n-tensors-one-too-many", "qwen2", lambda b: setattr(b, "n_tensors", len(b.tensors) + 1),
         GGUFFormatError, "tensor #"),
    Case("key-length-huge", "qwen2", first_key_length_huge, GGUFFormatError, "metadata key #0"),
    Case("string-length-huge", "qwen2", raw("general.name", struct.pack("<Q", 1 << 62)), GGUFFormatError,
         "general.name"),
    Case("string-past-eof", "qwen2", raw("general.name", struct.pack("<Q", 1 << 24) + b"tiny"), GGUFFormatError,
         "general.name"),
    Case("string-array-count-huge", "qwen2", raw("tokenizer.ggml.tokens", struct.pack("<IQ", STRING, 1 << 40)),
         GGUFFormatError, "tokenizer.ggml.tokens"),
    Case("string-array-count-past-eof", "qwen2", raw("tokenizer.ggml.tokens", struct.pack("<IQ", STRING, 1 << 20)),
         GGUFFormatError, "tokenizer.ggml.tokens"),
    Case("int-array-past-eof", "qwen2", raw("tokenizer.ggml.token_type", struct.pack("<IQ", INT32, 10_000_000)),
         GGUFFormatError, "tokenizer.ggml.token_type"),
    Case("int-array-count-huge", "qwen2", raw("tokenizer.ggml.token_type", struct.pack("<IQ", INT32, 1 << 62)),
         GGUFFormatError, "tokenizer.ggml.token_type"),
    Case("unknown-value-type", "qwen2", lambda b: (setattr(b.get("general.name"), "vtype", 13),
                                                   setattr(b.get("general.name"), "raw", b"")) and None,
         GGUFFormatError, "general.name"),
    Case("unknown-array-element-type", "qwen2", raw("tokenizer.ggml.merges", struct.pack("<IQ", 77, 3)),
         GGUFFormatError, "tokenizer.ggml.merges"),
    Case("key-not-utf8", "qwen2", lambda b: setattr(b.kvs[1], "key", b"\xff\xfename"), GGUFFormatError,
         "metadata key #1"),
    Case("duplicate-key", "qwen2", duplicate_key, GGUFFormatError, "general.name"),
    Case("alignment-0", "qwen2", set_("general.alignment", 0), GGUFFormatError, "general.alignment"),
    Case("alignment-not-power-of-two", "qwen2", set_("general.alignment", 48), GGUFFormatError, "general.alignment"),
    Case("alignment-wrong-type", "qwen2", set_("general.alignment", 32.0, FLOAT32), GGUFFormatError,
         "general.alignment"),
    Case("alignment-huge", "qwen2", set_("general.alignment", 1 << 31), GGUFFormatError, "general.alignment"),
    # -- tensor table -----------------------------------------------------------------------------
    Case("n-dims-0", "qwen2", tensor_edit("output_norm.weight", dims=[]), GGUFTensorError, "output_norm.weight"),
    Case("n-dims-5", "qwen2", tensor_edit("output_norm.weight", dims=[32, 1, 1, 1, 1]), GGUFTensorError,
         "output_norm.weight"),
    Case("dim-0", "qwen2", tensor_edit("output_norm.weight", dims=[0]), GGUFTensorError, "output_norm.weight"),
    Case("dim-huge", "qwen2", tensor_edit("output_norm.weight", dims=[1 << 50]), GGUFTensorError,
         "output_norm.weight"),
    Case("dims-product-overflows-int64", "qwen2", tensor_edit("output_norm.weight", dims=[1 << 32] * 3),
         GGUFTensorError, "output_norm.weight"),
    Case("unknown-ggml-type", "qwen2", tensor_edit("output_norm.weight", ggml_type=99), GGUFTensorError,
         "output_norm.weight"),
    Case("row-not-multiple-of-block", "qwen2", tensor_edit("blk.0.attn_q.weight", dims=[33, 32]), GGUFTensorError,
         "blk.0.attn_q.weight"),
    Case("name-not-utf8", "qwen2", tensor_edit("output_norm.weight", name=b"out\xff"), GGUFTensorError, "tensor #"),
    Case("name-too-long", "qwen2", tensor_edit("output_norm.weight", name="x" * 200), GGUFTensorError, "tensor #"),
    Case("offset-past-eof", "qwen2", tensor_edit("output_norm.weight", offset=1 << 40), GGUFTensorError,
         "output_norm.weight"),
    Case("offset-misaligned", "qwen2", misalign, GGUFTensorError, "alignment"),
    Case("offsets-overlap", "qwen2", overlap, GGUFTensorError, "overlaps"),
    Case("duplicate-tensor-name", "qwen2", duplicate_tensor, GGUFTensorError, "appears twice"),
    Case("quantized-retyped-f32", "qwen2", tensor_edit("blk.0.attn_q.weight", ggml_type=F32), GGUFTensorError,
         "blk.0.attn_q.weight"),
    Case("embedding-fewer-rows-than-vocab", "qwen2", fewer_embedding_rows, GGUFTensorError, "token_embd.weight"),
    # -- general metadata -------------------------------------------------------------------------
    Case("architecture-missing", "qwen2", remove("general.architecture"), GGUFMetadataError, "general.architecture"),
    Case("architecture-not-string", "qwen2", set_("general.architecture", 7, UINT32), GGUFMetadataError,
         "general.architecture"),
    Case("architecture-unknown", "qwen2", set_("general.architecture", "qwen9"), UnsupportedArchitecture, "qwen9"),
    # -- model metadata, per architecture ---------------------------------------------------------
    *[Case(f"{a}-block-count-missing", a, remove(f"{a}.block_count"), GGUFMetadataError, f"{a}.block_count")
      for a in ARCHITECTURES],
    *[Case(f"{a}-head-count-wrong-type", a, set_(f"{a}.attention.head_count", "four", STRING), GGUFMetadataError,
           f"{a}.attention.head_count") for a in ARCHITECTURES],
    *[Case(f"{a}-head-count-0", a, set_(f"{a}.attention.head_count", 0), GGUFMetadataError,
           f"{a}.attention.head_count") for a in ARCHITECTURES],
    *[Case(f"{a}-context-2^63", a, set_(f"{a}.context_length", 1 << 63, UINT64), GGUFMetadataError,
           f"{a}.context_length") for a in ARCHITECTURES],
    *[Case(f"{a}-context-2^40", a, set_(f"{a}.context_length", 1 << 40, UINT64), GGUFMetadataError,
           f"{a}.context_length") for a in ARCHITECTURES],
    *[Case(f"{a}-epsilon-nan", a, set_(EPS_KEY[a], math.nan), GGUFMetadataError, EPS_KEY[a]) for a in ARCHITECTURES],
    *[Case(f"{a}-epsilon-wrong-type", a, set_(EPS_KEY[a], "small", STRING), GGUFMetadataError, EPS_KEY[a])
      for a in ARCHITECTURES],
    *[Case(f"{a}-tensor-shape-wrong", a, halve_norm, GGUFTensorError, "output_norm.weight") for a in ARCHITECTURES],
    *[Case(f"{a}-tensor-missing", a, lambda b: b.remove_tensor("blk.1.attn_norm.weight"), GGUFTensorError,
           "blk.1.attn_norm.weight") for a in ARCHITECTURES],
    Case("qwen2-epsilon-negative", "qwen2", set_("qwen2.attention.layer_norm_rms_epsilon", -1e-5), GGUFMetadataError,
         "layer_norm_rms_epsilon"),
    Case("gpt2-epsilon-0", "gpt2", set_("gpt2.attention.layer_norm_epsilon", 0.0), GGUFMetadataError,
         "layer_norm_epsilon"),
    *[Case(f"llama-rope-base-{v}", "llama", set_("llama.rope.freq_base", v), GGUFMetadataError, "llama.rope.freq_base")
      for v in (0.0, math.nan, math.inf)],
    Case("gpt-oss-rope-base-0", "gpt-oss", set_("gpt-oss.rope.freq_base", 0.0), GGUFMetadataError,
         "gpt-oss.rope.freq_base"),
    Case("qwen2-block-count-2^32-1", "qwen2", set_("qwen2.block_count", (1 << 32) - 1), GGUFMetadataError,
         "qwen2.block_count"),
    Case("qwen2-block-count-minus-1", "qwen2", set_("qwen2.block_count", -1, INT32), GGUFMetadataError,
         "qwen2.block_count"),
    Case("qwen2-block-count-wrong-type", "qwen2", set_("qwen2.block_count", True, BOOL), GGUFMetadataError,
         "qwen2.block_count"),
    Case("llama-head-count-kv-over-heads", "llama", set_("llama.attention.head_count_kv", 8), GGUFMetadataError,
         "head_count_kv"),
    Case("phi3-head-count-not-dividing", "phi3", set_("phi3.attention.head_count", 5), GGUFMetadataError,
         "head_count"),
    Case("gpt2-head-count-not-dividing", "gpt2", set_("gpt2.attention.head_count", 5), GGUFMetadataError,
         "head_count"),
    Case("gpt-oss-key-length-0", "gpt-oss", set_("gpt-oss.attention.key_length", 0), GGUFMetadataError,
         "key_length"),
    Case("gpt-oss-experts-used-over-count", "gpt-oss", set_("gpt-oss.expert_used_count", 9), GGUFMetadataError,
         "expert_used_count"),
    Case("gpt-oss-sliding-window-0", "gpt-oss", set_("gpt-oss.attention.sliding_window", 0), GGUFMetadataError,
         "sliding_window"),
    Case("qwen2-unexpected-tensor", "qwen2", extra_tensor, GGUFTensorError, "blk.0.mystery.weight"),
    # -- vocabulary and chat template -------------------------------------------------------------
    Case("token-type-short", "qwen2", token_types_short, GGUFVocabularyError, "tokenizer.ggml.token_type"),
    Case("token-type-long", "qwen2", token_types_long, GGUFVocabularyError, "tokenizer.ggml.token_type"),
    Case("token-type-unknown", "qwen2", token_type_value(9), GGUFVocabularyError, "tokenizer.ggml.token_type"),
    Case("scores-short", "phi3", scores_short, GGUFVocabularyError, "tokenizer.ggml.scores"),
    Case("byte-type-on-text-token", "phi3", byte_type_on_text, GGUFVocabularyError, "tokenizer.ggml.token_type"),
    Case("merges-unknown-tokens", "qwen2", merges_unknown, GGUFVocabularyError, "tokenizer.ggml.merges"),
    Case("merges-as-integers", "qwen2", lambda b: b.set("tokenizer.ggml.merges", [1, 2, 3], ARRAY, INT32),
         GGUFVocabularyError, "tokenizer.ggml.merges"),
    Case("merges-missing", "gpt2", remove("tokenizer.ggml.merges"), GGUFVocabularyError, "tokenizer.ggml.merges"),
    Case("tokens-as-integers", "llama", lambda b: b.set("tokenizer.ggml.tokens", list(range(n_vocab(b))), ARRAY,
                                                          INT32), GGUFVocabularyError, "tokenizer.ggml.tokens"),
    Case("tokenizer-model-missing", "qwen2", remove("tokenizer.ggml.model"), GGUFVocabularyError,
         "tokenizer.ggml.model"),
    Case("tokenizer-model-unknown", "qwen2", set_("tokenizer.ggml.model", "wordpiece9"), GGUFVocabularyError,
         "tokenizer.ggml.model"),
    Case("pre-tokenizer-unknown", "qwen2", set_("tokenizer.ggml.pre", "nonesuch"), GGUFVocabularyError,
         "tokenizer.ggml.pre"),
    Case("eos-id-out-of-range", "qwen2", set_("tokenizer.ggml.eos_token_id", 1 << 20), GGUFVocabularyError,
         "tokenizer.ggml.eos_token_id"),
    Case("bos-id-negative", "phi3", set_("tokenizer.ggml.bos_token_id", -1, INT32), GGUFVocabularyError,
         "tokenizer.ggml.bos_token_id"),
    Case("eos-id-wrong-type", "gpt2", set_("tokenizer.ggml.eos_token_id", "eos", STRING), GGUFVocabularyError,
         "tokenizer.ggml.eos_token_id"),
    Case("chat-template-not-string", "qwen2", set_("tokenizer.chat_template", 42, UINT32), GGUFVocabularyError,
         "tokenizer.chat_template"),
    Case("chat-template-syntax-error", "qwen2", set_("tokenizer.chat_template", "{% for m in messages %}{{ m\x00"),
         GGUFVocabularyError, "tokenizer.chat_template"),
    Case("chat-template-undefined-name", "phi3", set_("tokenizer.chat_template", "{{ messages[0].content | nofilter }}"),
         GGUFVocabularyError, "tokenizer.chat_template"),
    Case("chat-template-fails-to-render", "gpt2", set_("tokenizer.chat_template", "{{ add_generati.x }}"),
         GGUFVocabularyError, "tokenizer.chat_template"),
    Case("chat-template-array", "llama", set_("tokenizer.chat_template", ["a", "b"], ARRAY, STRING),
         GGUFVocabularyError, "tokenizer.chat_template"),
    Case("context-int64-negative", "llama", set_("llama.context_length", -5, INT64), GGUFMetadataError,
         "llama.context_length"),
]


def load(path: Path) -> Engine:
    return Engine.load(path, backend="reference", registry=default_registry())


def write(tmp_path: Path, name: str, b: GGUFBuilder, post=None) -> Path:
    data = b.to_bytes()
    if post is not None:
        data = post(data)
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(data)
    return path


def test_the_matrix_is_large_and_covers_every_architecture():
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)
    assert {c.arch for c in CASES} == set(ARCHITECTURES)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_unmodified_tiny_models_load_and_chat(tmp_path, arch):
    """The control: each row's file differs from a model that loads and runs."""
    engine = load(write(tmp_path, arch, tiny_model(arch)))
    gen = engine.run(engine.prepare(GenerationRequest(prompt="the one", max_tokens=2, chat=True)))
    with pytest.raises(StopIteration) as done:
        while True:
            next(gen)
    assert done.value.value.tokens_out >= 1


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_file_fails_with_one_clean_error(tmp_path, case: Case):
    b = tiny_model(case.arch)
    post = case.mutate(b)
    path = write(tmp_path, case.id, b, post if callable(post) else None)
    default_registry()  # plugins imported outside the timing
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ModelLoadError) as info:
            load(path)
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    exc = info.value
    assert type(exc) is case.error, f"{type(exc).__name__}: {exc}"
    message = str(exc)
    assert "\n" not in message and str(path) in message and case.field in message, message
    assert elapsed < MAX_SECONDS, f"{elapsed:.2f} s"
    assert peak < MAX_PEAK_BYTES, f"peak {peak} bytes"


def test_a_context_whose_kv_cache_cannot_be_allocated_fails_at_load(tmp_path, monkeypatch):
    """A context within the file limit whose cache can never be allocated is a load error
    (InsufficientVram), not a retriable VRAM_OOM on every request."""
    from orcd_core.backends.reference import ReferenceDevice

    def no_memory(self, n_layers, n_ctx, *args, **kw):
        raise MemoryError(f"{n_ctx} positions")

    monkeypatch.setattr(ReferenceDevice, "new_kv_cache", no_memory)
    path = write(tmp_path, "big-context", tiny_model("qwen2").set("qwen2.context_length", 1 << 24))
    with pytest.raises(InsufficientVram) as info:
        load(path)
    assert str(path) in str(info.value) and "16777216" in str(info.value)


def _data_end(b: GGUFBuilder) -> tuple[int, int]:
    head = len(b.header_bytes())
    return head, head + max(off + len(t.data) for t, off in zip(b.tensors, b.layout()))


def test_truncation_sweep(tmp_path):
    """Every prefix ending in the header region, and one per 1% of the data, is refused by the parser
    with a format or tensor error (the file's last tensor ends at its last byte)."""
    b = tiny_model("qwen2")
    data = b.to_bytes()
    head, end = _data_end(b)
    cuts = list(range(0, head + 1)) + [head + (end - head) * k // 100 for k in range(1, 100)] + [end - 1]
    path = tmp_path / "cut.gguf"
    t0 = time.perf_counter()
    for n in cuts:
        path.write_bytes(data[:n])
        with pytest.raises((GGUFFormatError, GGUFTensorError)) as info:
            open_gguf(path)
        assert str(path) in str(info.value)
    assert len(cuts) > 1000
    assert time.perf_counter() - t0 < 30
