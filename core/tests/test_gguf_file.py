"""GGUF loading: valid files open; malformed ones raise the right ModelLoadError subclass, with a
message naming the file and the field or tensor. Files are written by gguf-py's GGUFWriter (an
independent writer) and then damaged byte by byte."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter

from orcd_core.errors import (
    GGUFFormatError,
    GGUFMetadataError,
    GGUFTensorError,
    ModelFileNotFound,
    ModelLoadError,
)
from orcd_core.gguf_file import open_gguf

ARCH = "llama"
# shapes in NumPy order; every tensor's byte size is a multiple of 32 (the alignment), so the file
# ends exactly where the last tensor's data ends and any truncation cuts real data.
TENSORS = {
    "token_embd.weight": ("F32", (8, 32)),
    "blk.0.attn_q.weight": ("Q8_0", (4, 64)),  # 8 blocks of 34 bytes = 272 bytes
    "output_norm.weight": ("F16", (32,)),
}


def raw_q8_0(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    rows, cols = shape
    blocks = np.zeros((rows * cols // 32, 34), dtype=np.uint8)
    blocks[:, :2] = (rng.uniform(0.5, 1.5, (blocks.shape[0], 1)) * 0.01).astype(np.float16).view(np.uint8)
    blocks[:, 2:] = rng.integers(-127, 128, (blocks.shape[0], 32), dtype=np.int8).view(np.uint8)
    return blocks.reshape(rows, cols // 32 * 34)


def write_gguf(path: Path, *, tensors=TENSORS, extra_kv=None, context_length=True, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), ARCH)
    w.add_name("orcd test model")
    w.add_block_count(1)
    if context_length:
        w.add_context_length(2048)
    w.add_embedding_length(32)
    w.add_head_count(4)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>", "a", "b"])
    for key, value in (extra_kv or {}).items():
        w.add_uint32(key, value)
    for name, (tname, shape) in tensors.items():
        if tname == "F32":
            w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
        elif tname == "F16":
            w.add_tensor(name, rng.standard_normal(shape).astype(np.float16))
        else:
            raw = raw_q8_0(rng, shape)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@dataclass
class Field:
    label: str
    offset: int
    size: int


def layout(data: bytes) -> tuple[list[Field], int]:
    """An independent walk of a well-formed GGUF: every structural field (offset, size) and the end
    of the tensor table. Only the test's own files are walked, so no bounds checks."""
    fields: list[Field] = []
    pos = 0

    def take(label, size):
        nonlocal pos
        fields.append(Field(label, pos, size))
        pos += size
        return data[pos - size : pos]

    def string(label):
        (n,) = struct.unpack("<Q", take(f"{label}.length", 8))
        return take(label, n)

    take("magic", 4)
    take("version", 4)
    (n_tensors,) = struct.unpack("<Q", take("tensor_count", 8))
    (n_kv,) = struct.unpack("<Q", take("kv_count", 8))
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    for _ in range(n_kv):
        key = string("kv.key").decode()
        (vtype,) = struct.unpack("<I", take(f"{key}.type", 4))
        if vtype == 8:
            string(f"{key}.value")
        elif vtype == 9:
            (etype,) = struct.unpack("<I", take(f"{key}.element_type", 4))
            (count,) = struct.unpack("<Q", take(f"{key}.count", 8))
            for i in range(count):
                if etype == 8:
                    string(f"{key}[{i}]")
                else:
                    take(f"{key}[{i}]", sizes[etype])
        else:
            take(f"{key}.value", sizes[vtype])
    for _ in range(n_tensors):
        name = string("tensor.name").decode()
        (n_dims,) = struct.unpack("<I", take(f"{name}.n_dims", 4))
        for d in range(n_dims):
            take(f"{name}.dim{d}", 8)
        take(f"{name}.type", 4)
        take(f"{name}.offset", 8)
    return fields, pos


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[Path, bytes]:
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "good.gguf")
    return path, path.read_bytes()


def field(data: bytes, label: str) -> Field:
    fields, _ = layout(data)
    return next(f for f in fields if f.label == label)


def patched(data: bytes, label: str, fmt: str, value) -> bytes:
    f = field(data, label)
    packed = struct.pack(fmt, value)
    assert len(packed) == f.size
    return data[: f.offset] + packed + data[f.offset + f.size :]


def open_bytes(tmp_path: Path, data: bytes, name: str = "bad.gguf", **kwargs):
    path = tmp_path / name
    path.write_bytes(data)
    return open_gguf(path, **kwargs)


def expect(tmp_path, data, exc_type, *fragments, **kwargs) -> str:
    with pytest.raises(exc_type) as info:
        open_bytes(tmp_path, data, **kwargs)
    msg = str(info.value)
    assert msg.startswith(str(tmp_path / "bad.gguf") + ": "), msg  # names the file
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    assert "\n" not in msg
    return msg


# -- the well-formed file ---------------------------------------------------------------------------


def test_good_file_opens_with_metadata_and_tensor_views(good):
    path, data = good
    model = open_gguf(path)
    assert model.version == 3 and model.file_size == len(data) and model.architecture == ARCH
    assert model.get("llama.context_length") == 2048 and model.get("general.name") == "orcd test model"
    assert model.get("tokenizer.ggml.tokens") == ["<unk>", "<s>", "</s>", "a", "b"]
    assert list(model.tensors) == list(TENSORS)
    q = model.tensors["blk.0.attn_q.weight"]
    assert (q.type_name, q.shape, q.np_shape, q.nbytes, q.n_elements) == ("Q8_0", (64, 4), (4, 64), 272, 256)
    emb = model.tensors["token_embd.weight"]
    # the view is the file's bytes; compare with gguf-py's own reader
    from gguf import GGUFReader

    ref = {t.name: t for t in GGUFReader(path).tensors}
    for name, t in model.tensors.items():
        assert t.offset == ref[name].data_offset and t.nbytes == ref[name].n_bytes
        assert bytes(t.data) == bytes(ref[name].data.view(np.uint8).reshape(-1))
        assert not t.data.flags.writeable
    assert emb.data.view(np.float32).reshape(8, 32).dtype == np.float32
    # the last tensor ends at the end of the file: every truncation below cuts real data
    assert max(t.offset + t.nbytes for t in model.tensors.values()) == len(data)
    assert model.tensor_data_bytes == 8 * 32 * 4 + 272 + 64


def test_context_length_absent_is_none_not_a_crash(tmp_path):
    model = open_gguf(write_gguf(tmp_path / "noctx.gguf", context_length=False))
    assert model.get("llama.context_length") is None
    with pytest.raises(GGUFMetadataError, match=r"noctx\.gguf: metadata key 'llama\.context_length' is missing"):
        model.require("llama.context_length", int)


# -- damaged files ----------------------------------------------------------------------------------


def test_truncated_at_every_offset(good, tmp_path):
    """Cut the file at every length from 1 byte to 1 byte short: each raises a ModelLoadError;
    cuts inside the header, metadata or tensor table are format errors, cuts in the data name the tensor."""
    path, data = good
    fields, table_end = layout(data)
    for n in range(1, len(data)):
        with pytest.raises(ModelLoadError) as info:
            open_bytes(tmp_path, data[:n])
        msg = str(info.value)
        assert msg.startswith(str(tmp_path / "bad.gguf")), (n, msg)
        if n < table_end:
            assert isinstance(info.value, GGUFFormatError), (n, msg)
        elif isinstance(info.value, GGUFTensorError):
            assert "past the end of the file" in msg and "tensor '" in msg, (n, msg)
        else:
            assert isinstance(info.value, GGUFFormatError) and "before the tensor data" in msg, (n, msg)


def test_empty_file(tmp_path):
    expect(tmp_path, b"", GGUFFormatError, "empty")


@pytest.mark.parametrize("magic", [b"GGUG", b"FUGG", b"\x00\x00\x00\x00", b"ggml"])
def test_bad_magic(good, tmp_path, magic):
    expect(tmp_path, magic + good[1][4:], GGUFFormatError, "not a GGUF file", repr(magic))


@pytest.mark.parametrize("version", [0, 1, 4, 0x03000000])
def test_wrong_version(good, tmp_path, version):
    expect(tmp_path, patched(good[1], "version", "<I", version), GGUFFormatError, f"GGUF version {version}", "expected one of (2, 3)")


def test_big_endian_file_gets_a_hint(good, tmp_path):
    expect(tmp_path, patched(good[1], "version", ">I", 3), GGUFFormatError, "GGUF version 50331648", "big-endian")


def test_tensor_name_longer_than_llama_cpp_allows(tmp_path):
    name = "blk.0." + "x" * 50 + ".weight"  # 63 bytes: the longest llama.cpp accepts
    assert open_gguf(write_gguf(tmp_path / "ok.gguf", tensors={name: ("F32", (32,))})).tensors[name].nbytes == 128
    raw = write_gguf(tmp_path / "long.gguf", tensors={name + "s": ("F32", (32,))}).read_bytes()
    expect(tmp_path, raw, GGUFTensorError, "tensor #0 name", "64 bytes long, expected at most 63")


def test_version_2_is_accepted(good, tmp_path):
    assert open_bytes(tmp_path, patched(good[1], "version", "<I", 2)).version == 2


def test_too_many_tensors_limit_is_configurable(good, tmp_path):
    expect(tmp_path, good[1], GGUFFormatError, "tensor count 3 exceeds the limit 2", max_tensors=2)
    assert len(open_bytes(tmp_path, good[1], max_tensors=3).tensors) == 3
    expect(tmp_path, patched(good[1], "tensor_count", "<Q", 10_001), GGUFFormatError, "tensor count 10001 exceeds the limit 10000")


def test_huge_counts_and_lengths_do_not_allocate(good, tmp_path):
    data = good[1]
    expect(tmp_path, patched(data, "kv_count", "<Q", 2**63), GGUFFormatError, "metadata count")
    # a string length near 2^64: no overflow, no allocation, names the key being read
    expect(tmp_path, patched(data, "kv.key.length", "<Q", 2**64 - 1), GGUFFormatError, "metadata key #0", "limit")
    expect(tmp_path, patched(data, "general.name.value.length", "<Q", 2**63), GGUFFormatError, "metadata 'general.name'", "file ends")
    expect(tmp_path, patched(data, "tokenizer.ggml.tokens.count", "<Q", 2**62), GGUFFormatError, "tokenizer.ggml.tokens")


def test_offset_plus_size_past_eof(good, tmp_path):
    expect(
        tmp_path,
        patched(good[1], "output_norm.weight.offset", "<Q", 2**64 - 32),  # offset + size overflows 64 bits
        GGUFTensorError,
        "tensor 'output_norm.weight'",
        "past the end of the file",
    )
    # a dimension made large: the size grows past the end of the file
    expect(tmp_path, patched(good[1], "token_embd.weight.dim1", "<Q", 1 << 33), GGUFTensorError, "tensor 'token_embd.weight'", "past the end")


def test_misaligned_offset(good, tmp_path):
    f = field(good[1], "blk.0.attn_q.weight.offset")
    (offset,) = struct.unpack_from("<Q", good[1], f.offset)
    expect(
        tmp_path,
        patched(good[1], "blk.0.attn_q.weight.offset", "<Q", offset + 4),
        GGUFTensorError,
        "tensor 'blk.0.attn_q.weight'",
        f"offset {offset + 4} is not a multiple of the alignment 32",
    )


def test_bad_alignment_metadata(tmp_path):
    # general.alignment must be a power of two and a uint32
    write_gguf(tmp_path / "a.gguf", extra_kv={"general.alignment": 48})
    expect(tmp_path, (tmp_path / "a.gguf").read_bytes(), GGUFFormatError, "'general.alignment'", "power of two")
    path = tmp_path / "b.gguf"
    w = GGUFWriter(str(path), ARCH)
    w.add_uint64("general.alignment", 64)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    expect(tmp_path, path.read_bytes(), GGUFFormatError, "'general.alignment'", "uint32")


def test_more_than_four_dims(good, tmp_path):
    expect(tmp_path, patched(good[1], "output_norm.weight.n_dims", "<I", 5), GGUFTensorError, "tensor 'output_norm.weight' has 5 dimensions", "1 to 4")
    expect(tmp_path, patched(good[1], "output_norm.weight.n_dims", "<I", 0), GGUFTensorError, "tensor 'output_norm.weight' has 0 dimensions")


def test_zero_dimension(good, tmp_path):
    expect(tmp_path, patched(good[1], "token_embd.weight.dim1", "<Q", 0), GGUFTensorError, "tensor 'token_embd.weight'", "dimensions [32, 0]")


def test_row_length_not_a_multiple_of_the_block_size(good, tmp_path):
    expect(
        tmp_path,
        patched(good[1], "blk.0.attn_q.weight.dim0", "<Q", 48),
        GGUFTensorError,
        "tensor 'blk.0.attn_q.weight' (Q8_0) has row length 48, expected a multiple of 32",
    )


@pytest.mark.parametrize("type_id", [4, 5, 42, 1000, 2**32 - 1])
def test_unknown_type_id(good, tmp_path, type_id):
    expect(tmp_path, patched(good[1], "output_norm.weight.type", "<I", type_id), GGUFTensorError, "tensor 'output_norm.weight'", f"unknown GGML type id {type_id}")


def test_duplicate_tensor_names(tmp_path):
    # GGUFWriter refuses duplicates: write two names of equal length, then rename one in place
    tensors = {"blk.0.ffn_a.weight": ("F32", (2, 32)), "blk.0.ffn_b.weight": ("F32", (2, 32))}
    raw = write_gguf(tmp_path / "two.gguf", tensors=tensors).read_bytes()
    assert raw.count(b"blk.0.ffn_b.weight") == 1
    dup = raw.replace(b"blk.0.ffn_b.weight", b"blk.0.ffn_a.weight")
    expect(tmp_path, dup, GGUFTensorError, "tensor 'blk.0.ffn_a.weight' appears twice")


def test_duplicate_metadata_keys(good, tmp_path):
    raw = write_gguf(tmp_path / "keys.gguf", extra_kv={"orcd.test.a": 1, "orcd.test.b": 2}).read_bytes()
    assert open_bytes(tmp_path, raw).get("orcd.test.b") == 2
    dup = raw.replace(b"orcd.test.b", b"orcd.test.a")
    expect(tmp_path, dup, GGUFFormatError, "metadata key 'orcd.test.a' appears twice")


def test_strings_that_are_not_utf8(good, tmp_path):
    data = good[1]
    f = field(data, "general.name.value")
    bad_value = data[: f.offset] + b"\xff\xfe" + data[f.offset + 2 :]
    expect(tmp_path, bad_value, GGUFMetadataError, "metadata key 'general.name'", "UTF-8")
    f = field(data, "kv.key")
    bad_key = data[: f.offset] + b"\xc3\x28" + data[f.offset + 2 :]
    expect(tmp_path, bad_key, GGUFFormatError, "metadata key #0", "UTF-8")
    names = [f for f in layout(data)[0] if f.label == "tensor.name"]
    bad_name = data[: names[1].offset] + b"\x80" + data[names[1].offset + 1 :]
    expect(tmp_path, bad_name, GGUFTensorError, "tensor #1", "UTF-8")


def test_missing_architecture(tmp_path):
    path = tmp_path / "bad.gguf"
    w = GGUFWriter(str(path), ARCH)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    raw = path.read_bytes()
    raw = raw.replace(b"general.architecture", b"general.architectur_")
    expect(tmp_path, raw, GGUFMetadataError, "'general.architecture' is missing")


def test_directory_and_missing_and_unreadable_paths(tmp_path):
    with pytest.raises(ModelFileNotFound, match=f"{tmp_path}: not a regular file"):
        open_gguf(tmp_path)
    with pytest.raises(ModelFileNotFound, match=r"nope\.gguf: cannot open: No such file or directory"):
        open_gguf(tmp_path / "nope.gguf")
    (tmp_path / "file").write_bytes(b"GGUF")
    with pytest.raises(ModelFileNotFound, match=r"file/x\.gguf: cannot open: Not a directory"):
        open_gguf(tmp_path / "file" / "x.gguf")
    (tmp_path / "dangling.gguf").symlink_to(tmp_path / "gone")
    with pytest.raises(ModelFileNotFound, match=r"dangling\.gguf: cannot open"):
        open_gguf(tmp_path / "dangling.gguf")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of their mode")
def test_unreadable_file(good, tmp_path):
    path = tmp_path / "locked.gguf"
    path.write_bytes(good[1])
    path.chmod(0)
    with pytest.raises(ModelFileNotFound, match=r"locked\.gguf: cannot open: Permission denied"):
        open_gguf(path)


# -- bit flips --------------------------------------------------------------------------------------

# flips that must be detected, per kind of structural field: (bit indices, exception type)
STRUCTURAL_FLIPS = [
    ("magic", range(32), GGUFFormatError),
    ("version", [b for b in range(32) if b != 0], GGUFFormatError),  # bit 0 turns 3 into 2, a valid version
    ("tensor_count", range(14, 64), GGUFFormatError),
    ("kv_count", range(20, 64), GGUFFormatError),
    ("kv.key.length", range(17, 64), GGUFFormatError),
    ("general.name.value.length", range(12, 64), GGUFFormatError),
    ("tokenizer.ggml.tokens.count", range(12, 64), GGUFFormatError),
    ("general.name.type", range(4, 32), GGUFFormatError),
    ("output_norm.weight.n_dims", range(2, 32), GGUFTensorError),
    ("token_embd.weight.dim1", range(12, 64), GGUFTensorError),
    ("token_embd.weight.type", range(6, 32), GGUFTensorError),
    ("blk.0.attn_q.weight.offset", list(range(5)) + list(range(12, 64)), GGUFTensorError),
]


@pytest.mark.parametrize("label, bits, exc_type", STRUCTURAL_FLIPS, ids=[s[0] for s in STRUCTURAL_FLIPS])
def test_bit_flips_in_structural_fields(good, tmp_path, label, bits, exc_type):
    data = bytearray(good[1])
    f = field(good[1], label)
    for bit in bits:
        flipped = bytearray(data)
        flipped[f.offset + bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(exc_type) as info:
            open_bytes(tmp_path, bytes(flipped))
        assert str(info.value).startswith(str(tmp_path / "bad.gguf") + ": "), (label, bit, str(info.value))


def test_any_bit_flip_before_the_data_loads_or_raises_a_model_load_error(good, tmp_path):
    """Every single-bit flip in the header, metadata and tensor table: the file either still opens
    or raises a ModelLoadError — never another exception."""
    data = good[1]
    _, table_end = layout(data)
    outcomes = {"opened": 0, "rejected": 0}
    for byte in range(table_end):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[byte] ^= 1 << bit
            try:
                open_bytes(tmp_path, bytes(flipped))
                outcomes["opened"] += 1
            except ModelLoadError:
                outcomes["rejected"] += 1
    assert outcomes["rejected"] > outcomes["opened"] > 0, outcomes


def _reader_metadata(path):
    from gguf import GGUFReader

    return {k: f.contents() for k, f in GGUFReader(path).fields.items() if not k.startswith("GGUF.")}


def test_metadata_equals_gguf_readers(good):
    """Our walk decodes the metadata itself (GGUFReader took 40-60 s on a 128k-token vocabulary);
    gguf-py's reader stays the oracle for the values and their Python types."""
    path, _ = good
    ours, ref = open_gguf(path).metadata, _reader_metadata(path)
    assert ours == ref
    assert {k: type(v) for k, v in ours.items()} == {k: type(v) for k, v in ref.items()}


def test_metadata_equals_gguf_readers_on_a_real_vocabulary():
    from orcd_core.testmodels import DownloadError, llama_cpp_models_dir

    try:
        path = llama_cpp_models_dir() / "ggml-vocab-phi-3.gguf"
    except DownloadError as exc:
        pytest.skip(f"llama.cpp's vocab files are not available: {exc}")
    ours, ref = open_gguf(path).metadata, _reader_metadata(path)
    assert ours.keys() == ref.keys() and len(ours["tokenizer.ggml.tokens"]) == 32064
    for key in ref:
        assert ours[key] == ref[key], key
        assert type(ours[key]) is type(ref[key]), key
