"""Opening and validating GGUF files.

`open_gguf(path)` walks the file's header, metadata and tensor table with bounds checks
(`_StructureCheck`), so that a truncated, bit-flipped or hostile file fails with a `ModelLoadError`
that names the file, the field or tensor, and what was expected, long before anything touches a GPU.
The same walk decodes the metadata values (the same Python types as `gguf.GGUFReader`'s
`ReaderField.contents()`; numeric arrays through `np.frombuffer`): GGUFReader builds one NumPy view per
array element, which took 40-60 s for a vocabulary of 128k tokens and 280k merges on the CI box, while
this walk takes well under a second. Tensor data is never copied: each `TensorInfo.data` is a read-only
view of the memory-mapped file.
"""

from __future__ import annotations

import functools
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import (
    GGUFFormatError,
    GGUFMetadataError,
    GGUFTensorError,
    ModelFileNotFound,
    UnsupportedArchitecture,
    UnsupportedTensorType,
)

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
DEFAULT_MAX_TENSORS = 10_000
MAX_KV = 1_000_000
MAX_DIMS = 4
MAX_KEY_LEN = 65_536
#: Longest tensor name, in bytes (llama.cpp's GGML_MAX_NAME is 64, including the terminating NUL).
MAX_TENSOR_NAME = 63
#: Most elements in one metadata array. Real vocabularies have about 2^18 entries; the limit keeps a
#: hostile count from turning a large file into tens of GB of Python objects.
MAX_ARRAY_LEN = 1 << 24
#: Longest context a file may claim (`{arch}.context_length`, rope original context). The longest
#: trained context of any released model is about 10M tokens; 2^24 leaves room and keeps position
#: arithmetic far from int32/int64 overflow.
MAX_CONTEXT_LENGTH = 1 << 24

_REQUIRED = object()

# GGUF metadata value types
_SCALARS = {  # type id -> (struct format, size, name)
    0: ("<B", 1, "uint8"),
    1: ("<b", 1, "int8"),
    2: ("<H", 2, "uint16"),
    3: ("<h", 2, "int16"),
    4: ("<I", 4, "uint32"),
    5: ("<i", 4, "int32"),
    6: ("<f", 4, "float32"),
    7: ("<?", 1, "bool"),
    10: ("<Q", 8, "uint64"),
    11: ("<q", 8, "int64"),
    12: ("<d", 8, "float64"),
}
_STRING, _ARRAY = 8, 9
_INT_TYPES = {0, 1, 2, 3, 4, 5, 10, 11}


@functools.cache
def ggml_type_table() -> dict[int, tuple[str, int, int]]:
    """Every GGML type gguf-py knows: id -> (name, block size, type size)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return {int(t): (t.name, *GGML_QUANT_SIZES[t]) for t in GGMLQuantizationType if t in GGML_QUANT_SIZES}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file. `shape` is GGML's order (ne0 first, the contiguous axis);
    `np_shape` is NumPy's (reversed). `data` is a read-only uint8 view into the mapped file."""

    name: str
    ggml_type: int
    type_name: str
    shape: tuple[int, ...]
    offset: int  # absolute offset in the file
    nbytes: int
    data: np.ndarray = field(repr=False, compare=False)

    @property
    def np_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass
class GGUFModel:
    """A validated GGUF file: metadata and tensor table; tensor data stays in the mapping."""

    path: Path
    version: int
    file_size: int
    alignment: int
    data_offset: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str, kind: type | tuple[type, ...] | None = None) -> Any:
        """A metadata value that must be present (and of `kind`), else `GGUFMetadataError`."""
        if key not in self.metadata:
            raise GGUFMetadataError(self.path, f"metadata key {key!r} is missing")
        value = self.metadata[key]
        if kind is not None and not isinstance(value, kind):
            raise GGUFMetadataError(
                self.path, f"metadata key {key!r} is {type(value).__name__} {value!r:.60}, expected {_kind_name(kind)}"
            )
        return value

    def int_value(self, key: str, default: Any = _REQUIRED, *, lo: int | None = None, hi: int | None = None) -> Any:
        """An integer metadata value checked to lie in lo..hi; `default` when absent (required when no
        default is given). A bool, float or string is the wrong type. Raises `GGUFMetadataError`."""
        if key not in self.metadata:
            if default is _REQUIRED:
                raise GGUFMetadataError(self.path, f"metadata key {key!r} is missing")
            return default
        value = self.metadata[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise GGUFMetadataError(
                self.path, f"metadata key {key!r} is {type(value).__name__} {value!r:.60}, expected an integer")
        _check_range(self.path, key, value, lo, hi)
        return value

    def float_value(self, key: str, default: Any = _REQUIRED, *, lo: float | None = None, hi: float | None = None,
                    lo_open: bool = False) -> Any:
        """A finite number (float or integer metadata) in [lo, hi] ((lo, hi] with `lo_open`); `default`
        when absent (required when no default is given). Raises `GGUFMetadataError`."""
        if key not in self.metadata:
            if default is _REQUIRED:
                raise GGUFMetadataError(self.path, f"metadata key {key!r} is missing")
            return default
        value = self.metadata[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise GGUFMetadataError(
                self.path, f"metadata key {key!r} is {type(value).__name__} {value!r:.60}, expected a number")
        value = float(value)
        if not math.isfinite(value):
            raise GGUFMetadataError(self.path, f"metadata key {key!r} is {value}, expected a finite number")
        if lo_open and lo is not None and value <= lo:
            raise GGUFMetadataError(self.path, f"metadata key {key!r} is {value!r}, expected more than {lo!r}")
        _check_range(self.path, key, value, lo, hi)
        return value

    def arch_key(self, suffix: str) -> str:
        return f"{self.architecture}.{suffix}"

    @property
    def tensor_data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def quant_mix(self) -> dict[str, dict[str, int]]:
        """GGML type name -> {"tensors": count, "bytes": bytes}."""
        mix: dict[str, dict[str, int]] = {}
        for t in self.tensors.values():
            entry = mix.setdefault(t.type_name, {"tensors": 0, "bytes": 0})
            entry["tensors"] += 1
            entry["bytes"] += t.nbytes
        return dict(sorted(mix.items(), key=lambda kv: -kv[1]["bytes"]))


def _check_range(path, key: str, value, lo, hi) -> None:
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        span = f"{lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}"
        raise GGUFMetadataError(path, f"metadata key {key!r} is {value!r}, expected a value in {span}")


def embedding_rows(model: "GGUFModel", name: str = "token_embd.weight") -> int:
    """Rows of the token embedding (the model's vocabulary size), checked against the file's
    vocabulary: a table with fewer rows than `tokenizer.ggml.tokens` would be indexed out of bounds by
    the tokenizer's ids. More rows are fine (padded vocabularies)."""
    t = model.tensors.get(name)
    if t is None:
        raise GGUFTensorError(model.path, f"tensor {name!r} is missing")
    if len(t.shape) != 2:
        raise GGUFTensorError(model.path, f"tensor {name!r} has shape {list(t.np_shape)}, expected 2 dimensions")
    rows = int(t.np_shape[0])
    tokens = model.metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and len(tokens) > rows:
        raise GGUFTensorError(
            model.path, f"tensor {name!r} has {rows} rows, fewer than the {len(tokens)} tokens of 'tokenizer.ggml.tokens'")
    return rows


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


class _StructureCheck:
    """Walks the GGUF layout with bounds checks; raises on the first inconsistency."""

    def __init__(self, path: Path, buf: memoryview, max_tensors: int):
        self.path, self.buf, self.max_tensors = path, buf, max_tensors
        self.size = len(buf)
        self.pos = 0
        self.alignment = DEFAULT_ALIGNMENT

    def fail(self, what: str) -> GGUFFormatError:
        return GGUFFormatError(self.path, what)

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"file ends inside {what} (needs {n} bytes at offset {self.pos}, file has {self.size})")
        start = self.pos
        self.pos += n
        return start

    def unpack(self, fmt: str, size: int, what: str):
        start = self.take(size, what)
        return struct.unpack_from(fmt, self.buf, start)[0]

    def string(self, what: str, limit: int | None = None) -> bytes:
        n = self.unpack("<Q", 8, f"the length of {what}")
        if limit is not None and n > limit:
            raise self.fail(f"{what} has length {n}, more than the limit {limit}")
        start = self.take(n, what)
        return bytes(self.buf[start : start + n])

    def value(self, vtype: int, what: str) -> Any:
        """The decoded value (str, int, float, bool, or a list of those); raw bytes for strings."""
        if vtype in _SCALARS:
            fmt, size, _ = _SCALARS[vtype]
            return self.unpack(fmt, size, what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            etype = self.unpack("<I", 4, f"the element type of {what}")
            count = self.unpack("<Q", 8, f"the length of {what}")
            if count > MAX_ARRAY_LEN:
                raise self.fail(f"{what} has {count} elements, more than the limit {MAX_ARRAY_LEN}")
            if etype in _SCALARS:
                fmt, size, _ = _SCALARS[etype]
                start = self.take(count * size, f"{what} ({count} elements)")
                return np.frombuffer(self.buf, dtype=np.dtype(fmt), count=count, offset=start).tolist()
            if etype == _STRING:
                if count > self.size // 8:
                    raise self.fail(f"{what} claims {count} strings, more than the file can hold")
                buf, unpack_len, size = self.buf, struct.Struct("<Q").unpack_from, self.size
                pos, items = self.pos, []
                append = items.append
                for i in range(count):
                    if pos + 8 > size:
                        self.pos = pos
                        self.take(8, f"{what}[{i}]")
                    (n,) = unpack_len(buf, pos)
                    pos += 8
                    if pos + n > size:
                        self.pos = pos
                        self.take(n, f"{what}[{i}]")
                    append(bytes(buf[pos : pos + n]))
                    pos += n
                self.pos = pos
                return items
            raise self.fail(f"{what} has element type {etype}, expected a scalar or string type")
        raise self.fail(f"{what} has value type {vtype}, expected one of 0..12")

    def run(self) -> tuple[int, int, list[tuple[str, tuple[int, ...], int, int]]]:
        magic = bytes(self.buf[0:4]) if self.size >= 4 else bytes(self.buf)
        if magic != GGUF_MAGIC:
            raise self.fail(f"not a GGUF file: magic {magic!r}, expected {GGUF_MAGIC!r}")
        self.pos = 4
        version = self.unpack("<I", 4, "the version")
        if version not in SUPPORTED_VERSIONS:
            hint = " (a big-endian file?)" if struct.unpack(">I", struct.pack("<I", version))[0] in SUPPORTED_VERSIONS else ""
            raise self.fail(f"GGUF version {version}, expected one of {SUPPORTED_VERSIONS}{hint}")
        n_tensors = self.unpack("<Q", 8, "the tensor count")
        n_kv = self.unpack("<Q", 8, "the metadata count")
        self.metadata: dict[str, Any] = {}
        if n_tensors > self.max_tensors:
            raise self.fail(f"tensor count {n_tensors} exceeds the limit {self.max_tensors}")
        if n_kv > MAX_KV:
            raise self.fail(f"metadata count {n_kv} exceeds the limit {MAX_KV}")
        for i in range(n_kv):
            raw_key = self.string(f"metadata key #{i}", MAX_KEY_LEN)
            try:
                key = raw_key.decode("utf-8")
            except UnicodeDecodeError:
                raise self.fail(f"metadata key #{i} is not valid UTF-8: {raw_key[:40]!r}") from None
            if key in self.metadata:
                raise self.fail(f"metadata key {key!r} appears twice")
            vtype = self.unpack("<I", 4, f"the type of metadata {key!r}")
            value = self.value(vtype, f"metadata {key!r}")
            if key == "general.alignment":
                if vtype != 4:  # the GGUF spec (and llama.cpp) require uint32
                    raise self.fail(f"metadata 'general.alignment' has value type {vtype}, expected 4 (uint32)")
                if not value or value & (value - 1) or value > 1 << 20:
                    raise self.fail(f"metadata 'general.alignment' is {value!r}, expected a power of two up to 2^20")
                self.alignment = int(value)
            self.metadata[key] = value
        types = ggml_type_table()
        infos = []
        for i in range(n_tensors):
            raw_name = self.string(f"the name of tensor #{i}", MAX_KEY_LEN)
            try:
                name = raw_name.decode("utf-8")
            except UnicodeDecodeError:
                raise GGUFTensorError(self.path, f"the name of tensor #{i} is not valid UTF-8: {raw_name[:40]!r}") from None
            if len(raw_name) > MAX_TENSOR_NAME:
                raise GGUFTensorError(
                    self.path, f"tensor #{i} name {name[:80]!r} is {len(raw_name)} bytes long, expected at most {MAX_TENSOR_NAME}"
                )
            n_dims = self.unpack("<I", 4, f"the dimension count of tensor {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise GGUFTensorError(self.path, f"tensor {name!r} has {n_dims} dimensions, expected 1 to {MAX_DIMS}")
            dims = tuple(self.unpack("<Q", 8, f"the dimensions of tensor {name!r}") for _ in range(n_dims))
            ttype = self.unpack("<I", 4, f"the type of tensor {name!r}")
            offset = self.unpack("<Q", 8, f"the data offset of tensor {name!r}")
            if ttype not in types:
                raise GGUFTensorError(self.path, f"tensor {name!r} has unknown GGML type id {ttype}")
            tname, block, tsize = types[ttype]
            if any(d == 0 for d in dims) or any(d > 1 << 40 for d in dims):
                raise GGUFTensorError(self.path, f"tensor {name!r} has dimensions {list(dims)}, expected each in 1..2^40")
            if dims[0] % block:
                raise GGUFTensorError(
                    self.path, f"tensor {name!r} ({tname}) has row length {dims[0]}, expected a multiple of {block}"
                )
            n_el = 1
            for d in dims:
                n_el *= d  # Python ints: no overflow
            infos.append((name, dims, ttype, offset, n_el // block * tsize, tname))
        data_offset = (self.pos + self.alignment - 1) // self.alignment * self.alignment
        if data_offset > self.size and n_tensors:
            raise self.fail(f"file ends before the tensor data (data starts at {data_offset}, file has {self.size})")
        seen = set()
        spans = []
        for name, dims, ttype, offset, nbytes, tname in infos:
            if name in seen:
                raise GGUFTensorError(self.path, f"tensor {name!r} appears twice in the tensor table")
            seen.add(name)
            if offset % self.alignment:
                raise GGUFTensorError(
                    self.path, f"tensor {name!r} data offset {offset} is not a multiple of the alignment {self.alignment}"
                )
            end = data_offset + offset + nbytes
            if end > self.size:
                raise GGUFTensorError(
                    self.path,
                    f"tensor {name!r} ({tname} {list(dims)}) needs bytes {data_offset + offset}..{end}, "
                    f"past the end of the file ({self.size} bytes): truncated file?",
                )
            spans.append((offset, offset + nbytes, name, tname, dims))
        # Overlapping data is never valid (llama.cpp even requires the tensors back to back); it is
        # also what a tensor retyped to a wider type (say Q8_0 -> F32) looks like: it reaches into
        # its neighbour's bytes.
        spans.sort()
        for (s0, e0, n0, t0, d0), (s1, e1, n1, t1, d1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise GGUFTensorError(
                    self.path, f"tensor {n1!r} ({t1} {list(d1)}) data at relative offset {s1} overlaps tensor {n0!r} "
                    f"({t0} {list(d0)}, bytes {s0}..{e0}): a wrong offset, or a wrong type or shape for its size?")
        return version, data_offset, infos


def _utf8(path: Path, raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GGUFMetadataError(
            path, f"{what} is not valid UTF-8 (byte {raw[exc.start]:#04x} at position {exc.start}): {raw[:40]!r}"
        ) from None


def open_gguf(path: str | os.PathLike[str], max_tensors: int = DEFAULT_MAX_TENSORS) -> GGUFModel:
    """Validate and open a GGUF file. Raises a `ModelLoadError` subclass on any problem."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise ModelFileNotFound(path, "not a regular file")
        fh = open(path, "rb")
    except ModelFileNotFound:
        raise
    except OSError as exc:
        raise ModelFileNotFound(path, f"cannot open: {exc.strerror or exc}") from None
    with fh:
        if size == 0:
            raise GGUFFormatError(path, "the file is empty")
        mapped = np.memmap(fh, dtype=np.uint8, mode="r")
    check = _StructureCheck(path, memoryview(mapped), max_tensors)
    version, data_offset, infos = check.run()

    metadata: dict[str, Any] = {}
    for key, value in check.metadata.items():
        if isinstance(value, bytes):
            value = _utf8(path, value, f"metadata key {key!r}")
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            try:
                value = [v.decode("utf-8") for v in value]
            except UnicodeDecodeError:
                value = [_utf8(path, v, f"metadata key {key!r} element {i}") for i, v in enumerate(value)]
        metadata[key] = value

    tensors: dict[str, TensorInfo] = {}
    for name, dims, ttype, offset, nbytes, tname in infos:
        start = data_offset + offset
        tensors[name] = TensorInfo(name, ttype, tname, tuple(int(d) for d in dims), start, nbytes, mapped[start : start + nbytes])
    model = GGUFModel(path, version, size, check.alignment, data_offset, metadata, tensors)
    if "general.architecture" not in metadata:
        raise GGUFMetadataError(path, "metadata key 'general.architecture' is missing")
    if not isinstance(metadata["general.architecture"], str):
        raise GGUFMetadataError(path, "metadata key 'general.architecture' is not a string")
    return model


def check_supported(model: GGUFModel, registry) -> Any:
    """Check that installed plugins provide the file's architecture and every tensor type, and that
    the architecture's required metadata is present. Returns the `Architecture` object (None when no
    plugin provides it). A vocab-only file (no tensors, e.g. llama.cpp's ggml-vocab-*.gguf) passes
    whatever its architecture: it can be tokenized, never run."""
    arch_name = model.architecture
    arch = registry.architectures.get(arch_name)
    if arch is None and model.tensors:
        raise UnsupportedArchitecture(
            model.path,
            f"architecture {arch_name!r} is not provided by any installed plugin "
            f"(installed: {registry.describe_installed()}; architectures: {sorted(registry.architectures) or 'none'})",
        )
    for t in model.tensors.values():
        if registry.quant_format(t.ggml_type) is None:
            raise UnsupportedTensorType(
                model.path,
                f"tensor {t.name!r} has type {t.type_name} (id {t.ggml_type}), which no installed plugin provides "
                f"(installed: {registry.describe_installed()}; types: "
                f"{sorted(f.name for f in registry.quant_formats.values()) or 'none'})",
            )
    if arch is not None and model.tensors:
        for suffix, kind in getattr(arch, "required_metadata", {}).items():
            model.require(model.arch_key(suffix), kind)
    return arch
