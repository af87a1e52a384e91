"""A GGUF writer for hostile-file tests: every header field, value type, count, offset and byte can
be set to anything, including what no valid writer would produce (duplicate keys, lengths past the
end, overlapping tensors). `tiny_model(arch)` returns a complete, loadable model of each built-in
architecture family (qwen2, llama, phi3, gpt-oss, gpt2) with a small vocabulary, a few KB in all,
for tests to corrupt one field at a time (core/tests/test_gguf_hostile.py, scripts/fuzz_gguf.py).

    b = tiny_model("qwen2")
    b.set("qwen2.attention.head_count", 0)          # keeps the key's type (uint32)
    b.tensor("blk.0.attn_q.weight").ggml_type = 0   # retype in place; data and offsets unchanged
    data = b.to_bytes()

The layout follows the GGUF spec (and gguf-py's writer): header, key/values, tensor infos, padding
to `alignment`, tensor data with each tensor padded to `alignment`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# GGUF value types
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_FMT = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i", FLOAT32: "<f",
        BOOL: "<?", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}
# GGML types used here
F32, F16, Q8_0 = 0, 1, 8


def encode_string(text: str | bytes) -> bytes:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def encode_value(vtype: int, value: Any, etype: int | None = None) -> bytes:
    """The bytes of one metadata value (without its type id)."""
    if vtype == STRING:
        return encode_string(value)
    if vtype == ARRAY:
        assert etype is not None
        items = b"".join(encode_value(etype, v) for v in value) if etype in (STRING, ARRAY) else \
            np.asarray(value, dtype=np.dtype(_FMT[etype])).tobytes()
        return struct.pack("<IQ", etype, len(value)) + items
    return struct.pack(_FMT[vtype], value)


@dataclass
class KV:
    key: str | bytes
    vtype: int
    value: Any = None
    etype: int | None = None  # element type of an array
    raw: bytes | None = None  # the value's bytes verbatim (after the type id), overriding `value`

    def encode(self) -> bytes:
        body = self.raw if self.raw is not None else encode_value(self.vtype, self.value, self.etype)
        return encode_string(self.key) + struct.pack("<I", self.vtype) + body


@dataclass
class Tensor:
    name: str | bytes
    dims: list[int]  # GGML order: ne0 (the contiguous axis) first
    ggml_type: int
    data: bytes
    offset: int | None = None  # relative to the data section; None: laid out after the previous one

    def info(self, offset: int) -> bytes:
        name = encode_string(self.name)
        return name + struct.pack("<I", len(self.dims)) + b"".join(struct.pack("<Q", d) for d in self.dims) + \
            struct.pack("<IQ", self.ggml_type, offset)


@dataclass
class GGUFBuilder:
    kvs: list[KV] = field(default_factory=list)
    tensors: list[Tensor] = field(default_factory=list)
    magic: bytes = b"GGUF"
    version: int = 3
    n_tensors: int | None = None  # header counts; None: the real ones
    n_kv: int | None = None
    alignment: int = 32  # padding used for the layout (general.alignment is a separate KV)

    # -- editing -------------------------------------------------------------------------------

    def index(self, key: str) -> int:
        for i, kv in enumerate(self.kvs):
            if kv.key == key:
                return i
        raise KeyError(key)

    def get(self, key: str) -> KV:
        return self.kvs[self.index(key)]

    def has(self, key: str) -> bool:
        return any(kv.key == key for kv in self.kvs)

    def set(self, key: str, value: Any, vtype: int | None = None, etype: int | None = None) -> GGUFBuilder:
        """Set `key` (appended when absent). Without `vtype`, an existing key keeps its type; a new
        one gets a type from the Python value."""
        if self.has(key):
            kv = self.get(key)
            kv.value, kv.raw = value, None
            if vtype is not None:
                kv.vtype, kv.etype = vtype, etype
            return self
        if vtype is None:
            vtype, etype = _infer(value)
        self.kvs.append(KV(key, vtype, value, etype))
        return self

    def remove(self, key: str) -> GGUFBuilder:
        del self.kvs[self.index(key)]
        return self

    def tensor(self, name: str) -> Tensor:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def remove_tensor(self, name: str) -> GGUFBuilder:
        self.tensors.remove(self.tensor(name))
        return self

    # -- writing -------------------------------------------------------------------------------

    def layout(self) -> list[int]:
        """Each tensor's offset in the data section."""
        offsets, pos = [], 0
        for t in self.tensors:
            off = t.offset if t.offset is not None else pos
            offsets.append(off)
            pos = max(pos, _pad(off + len(t.data), self.alignment))
        return offsets

    def header_bytes(self) -> bytes:
        out = [self.magic, struct.pack("<I", self.version),
               struct.pack("<Q", len(self.tensors) if self.n_tensors is None else self.n_tensors),
               struct.pack("<Q", len(self.kvs) if self.n_kv is None else self.n_kv)]
        out += [kv.encode() for kv in self.kvs]
        out += [t.info(off) for t, off in zip(self.tensors, self.layout())]
        head = b"".join(out)
        return head + b"\0" * (_pad(len(head), self.alignment) - len(head))

    def to_bytes(self) -> bytes:
        """The file. A tensor whose explicit offset lies beyond MAX_PLACED_OFFSET keeps that offset
        in its table entry but has no data written (the file would be that large)."""
        head = self.header_bytes()
        placed = [(t, off) for t, off in zip(self.tensors, self.layout()) if off <= MAX_PLACED_OFFSET]
        size = max([_pad(off + len(t.data), self.alignment) for t, off in placed], default=0)
        data = bytearray(size)
        for t, off in placed:
            data[off : off + len(t.data)] = t.data
        return head + bytes(data)


MAX_PLACED_OFFSET = 1 << 26


def _pad(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _infer(value: Any) -> tuple[int, int | None]:
    if isinstance(value, bool):
        return BOOL, None
    if isinstance(value, int):
        return (UINT32, None) if 0 <= value < 2**32 else (INT64, None)
    if isinstance(value, float):
        return FLOAT32, None
    if isinstance(value, (str, bytes)):
        return STRING, None
    if isinstance(value, list):
        return ARRAY, _infer(value[0])[0] if value else INT32
    raise TypeError(f"no GGUF type for {type(value).__name__}")


# -- tiny models ----------------------------------------------------------------------------------

ARCHITECTURES = ("qwen2", "llama", "phi3", "gpt-oss", "gpt2")
D, N_HEAD, N_HEAD_KV, HEAD_DIM, N_FF, N_LAYER = 32, 4, 2, 8, 64, 2
N_EXPERT, N_EXPERT_USED, N_FF_EXP = 4, 2, 32
CONTEXT = 256
GPT2_POSITIONS = 64
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_symbols() -> list[str]:
    """GPT-2's bytes_to_unicode (the tokenizer's own table): the printable symbol of each byte 0..255."""
    from orcd_core.tokenizer.base import BYTE_TO_CHAR

    return [BYTE_TO_CHAR[b] for b in range(256)]


def _bpe_vocab(b: GGUFBuilder) -> int:
    tokens = byte_symbols()
    merges = []
    for x in "etaon":
        for y in "etaon":
            tokens.append(x + y)
            merges.append(f"{x} {y}")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens += specials
    types = [1] * (len(tokens) - len(specials)) + [3] * len(specials)
    eos = tokens.index("<|endoftext|>")
    b.set("tokenizer.ggml.model", "gpt2")
    b.set("tokenizer.ggml.pre", "default")
    b.set("tokenizer.ggml.tokens", tokens)
    b.set("tokenizer.ggml.token_type", types, ARRAY, INT32)
    b.set("tokenizer.ggml.merges", merges)
    b.set("tokenizer.ggml.bos_token_id", eos)
    b.set("tokenizer.ggml.eos_token_id", eos)
    b.set("tokenizer.ggml.add_bos_token", False)
    b.set("tokenizer.chat_template", CHAT_TEMPLATE)
    return len(tokens)


def _spm_vocab(b: GGUFBuilder) -> int:
    tokens = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"] + [f"<0x{i:02X}>" for i in range(256)]
    types = [2, 3, 3, 3, 3] + [6] * 256
    pieces = ["\u2581", *"etaonis", *("\u2581" + c for c in "etaon"), "\u2581the", "he", "th"]
    tokens += pieces
    types += [1] * len(pieces)
    scores = [0.0] * (len(tokens) - len(pieces)) + [-float(i) for i in range(len(pieces))]
    b.set("tokenizer.ggml.model", "llama")
    b.set("tokenizer.ggml.tokens", tokens)
    b.set("tokenizer.ggml.scores", scores, ARRAY, FLOAT32)
    b.set("tokenizer.ggml.token_type", types, ARRAY, INT32)
    b.set("tokenizer.ggml.bos_token_id", 1)
    b.set("tokenizer.ggml.eos_token_id", 2)
    b.set("tokenizer.ggml.unknown_token_id", 0)
    b.set("tokenizer.chat_template", CHAT_TEMPLATE)
    return len(tokens)


class _Data:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def f32(self, *shape: int, scale: float = 0.2, offset: float = 0.0) -> bytes:
        return (offset + self.rng.standard_normal(shape) * scale).astype(np.float32).tobytes()

    def f16(self, *shape: int) -> bytes:
        return (self.rng.standard_normal(shape) * shape[-1] ** -0.5).astype(np.float16).tobytes()

    def q8_0(self, rows: int, cols: int) -> bytes:
        blocks = np.empty((rows * cols // 32, 34), np.uint8)
        blocks[:, :2] = self.rng.uniform(0.001, 0.01, (len(blocks), 1)).astype(np.float16).view(np.uint8)
        blocks[:, 2:] = self.rng.integers(-127, 128, (len(blocks), 32), dtype=np.int8).view(np.uint8)
        return blocks.tobytes()


def tiny_model(arch: str, seed: int = 0) -> GGUFBuilder:
    """A complete model of `arch` (see ARCHITECTURES) that loads and generates on the reference
    backend: 2 layers, width 32, GQA 4/2 (gpt2: 4/4), a byte-level BPE vocabulary (phi3: an
    SPM-style one with scores and <0xNN> byte tokens) and a chat template. Matrices are F16 (the
    attention projections of qwen2 are Q8_0)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"no tiny model for {arch!r} (have {ARCHITECTURES})")
    b, g = GGUFBuilder(), _Data(seed)
    b.set("general.architecture", arch)
    b.set("general.name", f"tiny-{arch}")
    b.set("general.alignment", 32)
    a = arch
    b.set(f"{a}.context_length", GPT2_POSITIONS if arch == "gpt2" else CONTEXT)
    b.set(f"{a}.embedding_length", D)
    b.set(f"{a}.block_count", N_LAYER)
    b.set(f"{a}.feed_forward_length", N_FF_EXP if arch == "gpt-oss" else N_FF)
    b.set(f"{a}.attention.head_count", N_HEAD)
    if arch == "gpt2":
        b.set(f"{a}.attention.layer_norm_epsilon", 1e-5)
    else:
        b.set(f"{a}.attention.head_count_kv", N_HEAD_KV)
        b.set(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)
        b.set(f"{a}.rope.freq_base", 10000.0)
    if arch == "gpt-oss":
        b.set(f"{a}.attention.key_length", HEAD_DIM)
        b.set(f"{a}.attention.value_length", HEAD_DIM)
        b.set(f"{a}.attention.sliding_window", 8)
        b.set(f"{a}.expert_count", N_EXPERT)
        b.set(f"{a}.expert_used_count", N_EXPERT_USED)
        b.set(f"{a}.expert_feed_forward_length", N_FF_EXP)
    n_vocab = _spm_vocab(b) if arch == "phi3" else _bpe_vocab(b)

    def add(name: str, dims_np: tuple[int, ...], gtype: int, data: bytes) -> None:
        b.tensors.append(Tensor(name, list(reversed(dims_np)), gtype, data))

    def vec(name: str, n: int, offset: float = 0.0) -> None:
        add(name, (n,), F32, g.f32(n, offset=offset))

    def mat(name: str, rows: int, cols: int, gtype: int = F16) -> None:
        add(name, (rows, cols), gtype, g.q8_0(rows, cols) if gtype == Q8_0 else g.f16(rows, cols))

    V, nq, nkv = n_vocab, N_HEAD * HEAD_DIM, (N_HEAD if arch == "gpt2" else N_HEAD_KV) * HEAD_DIM
    add("token_embd.weight", (V, D), F16, g.f16(V, D))
    if arch == "gpt2":
        add("position_embd.weight", (GPT2_POSITIONS, D), F32, g.f32(GPT2_POSITIONS, D))
    vec("output_norm.weight", D, 1.0)
    if arch == "gpt2":
        vec("output_norm.bias", D)
    mat("output.weight", V, D)
    for il in range(N_LAYER):
        p = f"blk.{il}."
        vec(p + "attn_norm.weight", D, 1.0)
        if arch == "gpt2":
            vec(p + "attn_norm.bias", D)
            mat(p + "attn_qkv.weight", 3 * D, D)
            vec(p + "attn_qkv.bias", 3 * D)
            mat(p + "attn_output.weight", D, D)
            vec(p + "attn_output.bias", D)
            vec(p + "ffn_norm.weight", D, 1.0)
            vec(p + "ffn_norm.bias", D)
            mat(p + "ffn_up.weight", N_FF, D)
            vec(p + "ffn_up.bias", N_FF)
            mat(p + "ffn_down.weight", D, N_FF)
            vec(p + "ffn_down.bias", D)
            continue
        if arch == "phi3":
            mat(p + "attn_qkv.weight", nq + 2 * nkv, D)
        else:
            qtype = Q8_0 if arch == "qwen2" else F16
            for x, rows in (("q", nq), ("k", nkv), ("v", nkv)):
                mat(p + f"attn_{x}.weight", rows, D, qtype)
                if arch in ("qwen2", "gpt-oss"):
                    vec(p + f"attn_{x}.bias", rows)
        mat(p + "attn_output.weight", D, nq, Q8_0 if arch == "qwen2" else F16)
        if arch == "gpt-oss":
            vec(p + "attn_output.bias", D)
            vec(p + "attn_sinks.weight", N_HEAD)
            vec(p + "post_attention_norm.weight", D, 1.0)
            mat(p + "ffn_gate_inp.weight", N_EXPERT, D)
            vec(p + "ffn_gate_inp.bias", N_EXPERT)
            E, F = N_EXPERT, N_FF_EXP
            for part in ("gate", "up"):
                add(p + f"ffn_{part}_exps.weight", (E, F, D), F16, g.f16(E, F, D))
                add(p + f"ffn_{part}_exps.bias", (E, F), F32, g.f32(E, F))
            add(p + "ffn_down_exps.weight", (E, D, F), F16, g.f16(E, D, F))
            add(p + "ffn_down_exps.bias", (E, D), F32, g.f32(E, D))
            continue
        vec(p + "ffn_norm.weight", D, 1.0)
        if arch == "phi3":
            mat(p + "ffn_up.weight", 2 * N_FF, D)
        else:
            mat(p + "ffn_gate.weight", N_FF, D)
            mat(p + "ffn_up.weight", N_FF, D)
        mat(p + "ffn_down.weight", D, N_FF)
    return b
