"""The built-in tokenizer backends: `gguf-bpe`, `gguf-spm`, `hf-json`.

A backend is an object with `kind`, `priority`, `applies(model, tokenizer_json) -> bool` and
`load(model, tokenizer_json) -> Tokenizer`; the core registers these three through the
`orcd_register_tokenizers` hook and `load_tokenizer` picks the applicable one with the highest
priority. Each builds a `tokenizers.Tokenizer` (the Rust BPE) configured as llama.cpp interprets the
GGUF metadata; no BPE merge loop runs in Python.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Protocol, runtime_checkable

from tokenizers import Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from ..errors import GGUFVocabularyError, TokenizerError
from .base import Tokenizer, byte_token_value, gpt2_piece
from .pretokenizers import PRE_TOKENIZERS, UNSUPPORTED_PRE
from .vocab import A_BYTE, A_CONTROL, A_LSTRIP, A_NORMAL, A_RSTRIP, A_UNKNOWN, A_USER_DEFINED, EOG_TEXTS, GGUFVocab


@runtime_checkable
class TokenizerBackend(Protocol):
    """What a tokenizer plugin registers (one object per kind)."""

    kind: str  # e.g. "gguf-bpe"
    priority: int  # the applicable backend with the highest priority wins

    def applies(self, model, tokenizer_json: Path | None) -> bool:
        """Whether this backend can tokenize for `model` (and the optional tokenizer.json)."""

    def load(self, model, tokenizer_json: Path | None) -> Tokenizer:
        """Build the tokenizer; raise `TokenizerError` (one line, naming the field) on failure."""


# Long fragments are cut into pieces of about CHUNK_CHARS characters, encoded in parallel by the Rust
# side (`encode_batch_fast`, one thread per piece). A cut goes only where no pre-tokenizer match and
# no BPE merge can cross: between an ASCII letter and a space (byte-level BPE: every regex of
# pretokenizers.py ends a letter run there and starts anew at the space, and none has a lookbehind)
# or an ASCII letter and U+2581 (SPM, only when no vocabulary token contains a letter followed by
# U+2581). The differential tests against llama.cpp include 6,000-character strings that are cut.
CHUNK_CHARS = 1024
BPE_CUT = re.compile(r"(?<=[A-Za-z])(?= )")
SPM_CUT = re.compile("(?<=[A-Za-z])(?=\u2581)")


def _fragment_encoder(engine: HFTokenizer, cut: re.Pattern | None = None):
    encode_many = engine.encode_batch_fast  # no offsets: about half the time of `encode`, one piece too

    def split(text: str) -> list[str]:
        if cut is None or len(text) < 2 * CHUNK_CHARS:
            return [text]
        parts: list[str] = []
        start = 0
        while len(text) - start >= 2 * CHUNK_CHARS:
            m = cut.search(text, start + CHUNK_CHARS)
            if m is None:
                break
            parts.append(text[start : m.start()])
            start = m.start()
        parts.append(text[start:])
        return parts

    def encode(texts: list[str]) -> list[list[int]]:
        pieces: list[str] = []
        counts: list[int] = []
        for text in texts:
            parts = split(text)
            pieces += parts
            counts.append(len(parts))
        encodings = encode_many(pieces, add_special_tokens=False)
        out: list[list[int]] = []
        k = 0
        for c in counts:
            ids: list[int] = []
            for e in encodings[k : k + c]:
                ids += e.ids
            out.append(ids)
            k += c
        return out

    encode.engine = engine  # type: ignore[attr-defined]  # for tests and benchmarks
    return encode


def _pieces(tokens: list[str], attrs: list[int], byte_level: bool) -> list[bytes]:
    """llama.cpp's `token_to_piece(id, special=True)` for every token."""
    shown = A_CONTROL | A_UNKNOWN | A_USER_DEFINED
    out: list[bytes] = []
    for text, attr in zip(tokens, attrs):
        if attr & shown:
            out.append(text.encode("utf-8"))
        elif attr & A_NORMAL:
            out.append(gpt2_piece(text) if byte_level else text.replace("\u2581", " ").encode("utf-8"))
        elif attr & A_BYTE:
            out.append(bytes([byte_token_value(text)]))
        else:  # unused / undefined tokens render as nothing
            out.append(b"")
    return out


def _split_merges(path: str, merges: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """GGUF merges ("a b", split at the first space after the first character) -> pairs, first
    occurrence kept (llama.cpp's rank map). A merge whose parts or result are not tokens is an error
    (the Rust BPE needs ids for all three; no real vocabulary has such merges: checked on every
    llama.cpp vocab file and both real models)."""
    if any(w[:1] == " " for w in merges):
        pairs = [(w[:p], w[p + 1 :]) if (p := w.find(" ", 1)) > 0 else (w,) for w in merges]
    else:
        pairs = [tuple(w.split(" ", 1)) for w in merges]
    if len(set(pairs)) != len(pairs):
        pairs = list(dict.fromkeys(pairs))
    for i, p in enumerate(pairs):
        if len(p) != 2 or p[0] not in vocab or p[1] not in vocab or p[0] + p[1] not in vocab:
            raise GGUFVocabularyError(
                path, f"metadata key 'tokenizer.ggml.merges' entry {i} ({' '.join(p)!r:.60}) does not join two "
                "vocabulary tokens into a third")
    return pairs  # type: ignore[return-value]


def _vocab_tokenizer(kind: str, vocab, path: str, engine: HFTokenizer, cut: re.Pattern | None, *, spm_style: bool,
                     add_space_prefix: bool, pre: str, clean_spaces: bool = False) -> Tokenizer:
    """A Tokenizer over a GGUF vocabulary: what the BPE and SPM backends share (SPM pieces use the
    SentencePiece spelling, BPE pieces the byte-level one)."""
    return Tokenizer(
        kind=kind,
        tokens=vocab.tokens,
        attrs=vocab.attrs,
        pieces=_pieces(vocab.tokens, vocab.attrs, byte_level=not spm_style),
        special_ids=vocab.special_ids,
        encode_fragment=_fragment_encoder(engine, cut),
        spm_style=spm_style,
        bos_id=vocab.ids["bos"],
        eos_id=vocab.ids["eos"],
        eog_ids=vocab.eog_ids,
        add_bos=vocab.add_bos,
        add_eos=vocab.add_eos,
        add_space_prefix=add_space_prefix,
        chat_template=vocab.chat_template,
        model_max_context=vocab.model_max_context,
        pre=pre,
        clean_spaces=clean_spaces,
        source=path,
    )


class GGUFBPEBackend:
    """`tokenizer.ggml.model = gpt2`: byte-level BPE from `tokens` + `merges`, pre-tokenized by the
    regexes that llama.cpp ties to `tokenizer.ggml.pre`."""

    kind = "gguf-bpe"
    priority = 0

    def applies(self, model, tokenizer_json: Path | None) -> bool:
        return tokenizer_json is None and model.get("tokenizer.ggml.model") == "gpt2"

    def load(self, model, tokenizer_json: Path | None = None) -> Tokenizer:
        path = str(model.path)
        pre_name = model.get("tokenizer.ggml.pre") or "default"
        if not isinstance(pre_name, str):
            raise GGUFVocabularyError(path, f"metadata key 'tokenizer.ggml.pre' is a {type(pre_name).__name__}, expected a string")
        if pre_name in UNSUPPORTED_PRE:
            raise GGUFVocabularyError(path, f"pre-tokenizer 'tokenizer.ggml.pre' = {pre_name!r} {UNSUPPORTED_PRE[pre_name]}; "
                                      "not supported")
        pre = PRE_TOKENIZERS.get(pre_name)
        if pre is None:
            raise GGUFVocabularyError(
                path, f"unknown pre-tokenizer 'tokenizer.ggml.pre' = {pre_name!r:.60} "
                f"(known: {', '.join(sorted(PRE_TOKENIZERS))})"
            )
        vocab = GGUFVocab.from_model(model, pre_add_bos=pre.add_bos, pre_no_bos=pre.no_bos)
        if vocab.merges is None:
            raise GGUFVocabularyError(path, "metadata key 'tokenizer.ggml.merges' is missing (needed by a gpt2 vocabulary)")
        token_to_id = vocab.token_to_id
        merges = _split_merges(path, vocab.merges, token_to_id)
        bpe = models.BPE(vocab=token_to_id, merges=merges, ignore_merges=pre.ignore_merges, byte_fallback=False)
        engine = HFTokenizer(bpe)
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in pre.regexes]
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
        engine.pre_tokenizer = pre_tokenizers.Sequence([*splits, byte_level])
        return _vocab_tokenizer(self.kind, vocab, path, engine, BPE_CUT, spm_style=False, add_space_prefix=False,
                                pre=pre_name, clean_spaces=pre.clean_spaces)


def spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """The merges equivalent to llama.cpp's score-driven SPM tokenizer: every split of a vocabulary
    token into two vocabulary tokens, highest score of the result first (llama.cpp merges the
    adjacent pair whose concatenation has the best score, leftmost first on ties)."""
    token_to_id = {t: i for i, t in enumerate(tokens)}
    ranked: list[tuple[float, int, int, int, str, str]] = []
    for t, i in token_to_id.items():
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            ia = token_to_id.get(a)
            if ia is None:
                continue
            ib = token_to_id.get(b)
            if ib is None:
                continue
            ranked.append((-scores[i], i, ia, ib, a, b))
    ranked.sort()
    return [(a, b) for *_, a, b in ranked]


class GGUFSPMBackend:
    """`tokenizer.ggml.model = llama`: SentencePiece-style BPE over scores, `<0xNN>` byte fallback,
    spaces as U+2581 and the `add_space_prefix` rule (Phi-3, Llama-2)."""

    kind = "gguf-spm"
    priority = 0

    def applies(self, model, tokenizer_json: Path | None) -> bool:
        return tokenizer_json is None and model.get("tokenizer.ggml.model") == "llama"

    def load(self, model, tokenizer_json: Path | None = None) -> Tokenizer:
        path = str(model.path)
        vocab = GGUFVocab.from_model(model)
        scores = vocab.scores or [0.0] * len(vocab.tokens)
        token_to_id = vocab.token_to_id
        unk = vocab.ids["unk"]
        bpe = models.BPE(
            vocab=token_to_id,
            merges=spm_merges(vocab.tokens, scores),
            unk_token=vocab.tokens[unk] if unk is not None else None,
            byte_fallback=True,
            fuse_unk=False,
        )
        engine = HFTokenizer(bpe)  # no normalizer, no pre-tokenizer: the prepared fragment is one word
        letter_space = re.compile("[A-Za-z]\u2581")
        cut = None if any(letter_space.search(t) for t in vocab.tokens) else SPM_CUT
        return _vocab_tokenizer(self.kind, vocab, path, engine, cut, spm_style=True,
                                add_space_prefix=vocab.add_space_prefix, pre=vocab.pre)


class HFJSONBackend:
    """A Hugging Face `tokenizer.json` (byte-level BPE: gpt-oss, Llama-3, Qwen). Its model, normalizer
    and pre-tokenizer encode the text; its added tokens are matched by our special-token partition
    (so `parse_special` works as for GGUF vocabularies). BOS/EOS, end-of-generation ids, chat template
    and context length come from the GGUF metadata when the GGUF carries the same vocabulary."""

    kind = "hf-json"
    priority = 100

    def applies(self, model, tokenizer_json: Path | None) -> bool:
        return tokenizer_json is not None

    def load(self, model, tokenizer_json: Path | None) -> Tokenizer:
        if tokenizer_json is None:
            raise TokenizerError("hf-json needs a tokenizer.json path")
        jpath = Path(tokenizer_json)
        try:
            spec = json.loads(jpath.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TokenizerError(f"{jpath}: cannot read tokenizer.json: {exc}") from None
        if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
            raise TokenizerError(f"{jpath}: not a tokenizer.json (no 'model' object)")
        added = spec.get("added_tokens") or []
        spec = dict(spec, added_tokens=[], post_processor=None)
        if not _is_byte_level(spec.get("decoder")):
            raise TokenizerError(f"{jpath}: only byte-level BPE tokenizer.json files are supported (decoder is not ByteLevel)")
        try:
            engine = HFTokenizer.from_str(json.dumps(spec))
        except Exception as exc:  # the Rust parser's message names the field
            raise TokenizerError(f"{jpath}: tokenizers cannot load it: {exc}") from None
        model_vocab = engine.get_vocab(with_added_tokens=False)
        size = max([*model_vocab.values(), *(int(a["id"]) for a in added)], default=-1) + 1
        tokens = [""] * size
        for text, i in model_vocab.items():
            tokens[i] = text
        added_attr: dict[int, int] = {}
        for a in added:
            i = int(a["id"])
            tokens[i] = a["content"]
            added_attr[i] = A_CONTROL if a.get("special") else A_USER_DEFINED
            if a.get("lstrip"):
                added_attr[i] |= A_LSTRIP
            if a.get("rstrip"):
                added_attr[i] |= A_RSTRIP
        missing = [i for i, t in enumerate(tokens) if not t]
        if missing:
            raise TokenizerError(f"{jpath}: token ids {missing[:5]} have no entry")

        if model.get("tokenizer.ggml.model") is not None:
            vocab = GGUFVocab.from_model(model)
            if len(vocab.tokens) != size:
                raise TokenizerError(
                    f"{jpath}: {size} tokens, but {model.path} has a vocabulary of {len(vocab.tokens)}"
                )
            for i, (a, b) in enumerate(zip(vocab.tokens, tokens)):
                if a != b:
                    raise TokenizerError(f"{jpath}: token {i} is {b!r}, but {model.path} has {a!r}")
            attrs, ids, eog = vocab.attrs, vocab.ids, vocab.eog_ids
            add_bos, add_eos, special_ids = vocab.add_bos, vocab.add_eos, vocab.special_ids
            template, ctx = vocab.chat_template, vocab.model_max_context
        else:
            attrs = [added_attr.get(i, A_NORMAL) for i in range(size)]
            eog = frozenset(i for i, t in enumerate(tokens) if t in EOG_TEXTS and i in added_attr)
            ids = {"bos": None, "eos": min(eog) if eog else None}
            add_bos = add_eos = False
            special_ids = sorted(added_attr, key=lambda i: (-len(tokens[i].encode("utf-8")), i))
            template, ctx = None, None
        return Tokenizer(
            kind=self.kind,
            tokens=tokens,
            attrs=attrs,
            pieces=_pieces(tokens, attrs, byte_level=True),
            special_ids=special_ids,
            encode_fragment=_fragment_encoder(engine, BPE_CUT if _cut_safe(spec) else None),
            spm_style=False,
            bos_id=ids["bos"],
            eos_id=ids["eos"],
            eog_ids=eog,
            add_bos=add_bos,
            add_eos=add_eos,
            add_space_prefix=False,
            chat_template=template,
            model_max_context=ctx,
            pre=str(model.get("tokenizer.ggml.pre") or ""),
            source=str(jpath),
        )


def _cut_safe(spec: dict) -> bool:
    """Whether letter|space cuts are safe for a tokenizer.json: no normalizer, and a pre-tokenizer
    that is exactly [Split(tiktoken's o200k regex, isolated), ByteLevel without regex]."""
    from .o200k import O200K_PATTERN

    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if spec.get("normalizer") or not isinstance(steps, list) or len(steps) != 2:
        return False
    split, byte_level = steps
    return (
        split.get("type") == "Split"
        and (split.get("pattern") or {}).get("Regex") == O200K_PATTERN
        and str(split.get("behavior", "")).lower() == "isolated"
        and not split.get("invert")
        and byte_level.get("type") == "ByteLevel"
        and byte_level.get("use_regex") is False
    )


def _is_byte_level(decoder) -> bool:
    if not isinstance(decoder, dict):
        return False
    if decoder.get("type") == "ByteLevel":
        return True
    if decoder.get("type") == "Sequence":
        return any(_is_byte_level(d) for d in decoder.get("decoders", []))
    return False


BUILTIN_BACKENDS = (GGUFBPEBackend(), GGUFSPMBackend(), HFJSONBackend())
