"""A GGUF vocabulary as llama.cpp reads it (src/llama-vocab.cpp, `llama_vocab::impl::load`).

`GGUFVocab.from_model(model)` reads `tokenizer.ggml.*` and derives what llama.cpp derives from it:
per-token attributes (from `token_type`, plus llama.cpp's corrections by token text), the special
token ids with their per-model defaults, add-BOS/EOS, the end-of-generation set, the list of
special tokens matched in text (longest first) and the per-token lstrip/rstrip flags.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import IntFlag
from typing import Any

from ..errors import GGUFVocabularyError


class TokenAttr(IntFlag):
    """llama.cpp's `llama_token_attr` bits."""

    UNDEFINED = 0
    UNKNOWN = 1 << 0
    UNUSED = 1 << 1
    NORMAL = 1 << 2
    CONTROL = 1 << 3
    USER_DEFINED = 1 << 4
    BYTE = 1 << 5
    NORMALIZED = 1 << 6
    LSTRIP = 1 << 7
    RSTRIP = 1 << 8
    SINGLE_WORD = 1 << 9


# plain ints for the per-token tables (IntFlag arithmetic costs microseconds per token at load)
A_UNKNOWN, A_UNUSED, A_NORMAL, A_CONTROL = 1 << 0, 1 << 1, 1 << 2, 1 << 3
A_USER_DEFINED, A_BYTE, A_LSTRIP, A_RSTRIP = 1 << 4, 1 << 5, 1 << 7, 1 << 8
A_SPECIAL = A_CONTROL | A_USER_DEFINED | A_UNKNOWN  # matched in text by the special-token partition

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")

# GGUF `tokenizer.ggml.token_type` values -> attribute
TOKEN_TYPE_ATTR = {0: 0, 1: A_NORMAL, 2: A_UNKNOWN, 3: A_CONTROL, 4: A_USER_DEFINED, 5: A_UNUSED, 6: A_BYTE}

# texts llama.cpp recognises (its "auto-detect special tokens by text" workaround)
EOT_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
    "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>",
)
EOM_TEXTS = ("<|eom_id|>",)
FIM_TEXTS = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
EOG_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
))
# gpt-oss: llama.cpp always renders these (user-defined, not control)
ALWAYS_RENDERED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")

_ID_KEYS = {  # our name -> GGUF key (llama.cpp spells "seperator")
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "eot": "tokenizer.ggml.eot_token_id",
    "eom": "tokenizer.ggml.eom_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "sep": "tokenizer.ggml.seperator_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
    "mask": "tokenizer.ggml.mask_token_id",
    "fim_pre": "tokenizer.ggml.fim_pre_token_id",
    "fim_suf": "tokenizer.ggml.fim_suf_token_id",
    "fim_mid": "tokenizer.ggml.fim_mid_token_id",
    "fim_pad": "tokenizer.ggml.fim_pad_token_id",
    "fim_rep": "tokenizer.ggml.fim_rep_token_id",
    "fim_sep": "tokenizer.ggml.fim_sep_token_id",
}
_DEPRECATED_ID_KEYS = {
    "fim_pre": "tokenizer.ggml.prefix_token_id",
    "fim_suf": "tokenizer.ggml.suffix_token_id",
    "fim_mid": "tokenizer.ggml.middle_token_id",
}


@dataclass
class GGUFVocab:
    """Everything a tokenizer backend needs from the file, already interpreted as llama.cpp does."""

    path: str
    model: str  # tokenizer.ggml.model: "gpt2" or "llama"
    pre: str  # tokenizer.ggml.pre ("" when absent)
    tokens: list[str]
    attrs: list[int]  # TokenAttr bits
    scores: list[float] | None
    merges: list[str] | None
    ids: dict[str, int | None]  # bos, eos, eot, eom, unk, sep, pad, mask, fim_*
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    eog_ids: frozenset[int]
    special_ids: list[int]  # control / user-defined / unknown tokens, longest text (bytes) first
    chat_template: str | None
    model_max_context: int | None
    metadata: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def token_to_id(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def from_model(cls, model, *, pre_add_bos: bool = False, pre_no_bos: bool = False) -> "GGUFVocab":
        """Read the vocabulary of an opened `GGUFModel`. `pre_add_bos`/`pre_no_bos` are the defaults that
        llama.cpp ties to the pre-tokenizer name (the BPE backend passes them)."""
        md = model.metadata
        path = str(model.path)

        def fail(what: str) -> GGUFVocabularyError:
            return GGUFVocabularyError(path, what)

        kind = md.get("tokenizer.ggml.model")
        if not isinstance(kind, str):
            raise fail("metadata key 'tokenizer.ggml.model' is missing: the file has no vocabulary")
        tokens = md.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens or not isinstance(tokens[0], str):
            raise fail("metadata key 'tokenizer.ggml.tokens' is missing or not a list of strings")
        n = len(tokens)
        tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]

        # every array is checked against the token list where it is read: one entry per token
        token_types = md.get("tokenizer.ggml.token_type")
        if token_types is not None:
            if not isinstance(token_types, list) or len(token_types) != n:
                raise fail(f"metadata key 'tokenizer.ggml.token_type' has {_length(token_types)}, expected {n} entries "
                           "(one per token)")
            try:
                attrs = [TOKEN_TYPE_ATTR[t] for t in token_types]
            except (KeyError, TypeError):
                i, bad = next((i, t) for i, t in enumerate(token_types) if t not in TOKEN_TYPE_ATTR)
                raise fail(f"metadata key 'tokenizer.ggml.token_type' entry {i} is {bad!r:.40}, expected a token "
                           f"type in 0..{max(TOKEN_TYPE_ATTR)}") from None
        else:
            attrs = [A_NORMAL] * n
        for i, a in enumerate(attrs):
            if a & A_BYTE and not _BYTE_TOKEN.fullmatch(tokens[i]):
                raise fail(f"token {i} ({tokens[i]!r:.40}) has type byte (6) in 'tokenizer.ggml.token_type' but is "
                           "not of the form <0xNN>")

        scores = md.get("tokenizer.ggml.scores")
        if scores is not None:
            if not isinstance(scores, list) or len(scores) != n:
                raise fail(f"metadata key 'tokenizer.ggml.scores' has {_length(scores)}, expected {n} entries (one per token)")
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in scores):
                raise fail("metadata key 'tokenizer.ggml.scores' holds non-numbers, expected one float per token")
            scores = [float(s) for s in scores]
        merges = md.get("tokenizer.ggml.merges")
        if merges is not None and (not isinstance(merges, list) or not all(isinstance(m, str) for m in merges)):
            raise fail(f"metadata key 'tokenizer.ggml.merges' is {_describe(merges)}, expected an array of strings "
                       "('left right')")

        token_to_id: dict[str, int] = {}
        for i, t in enumerate(tokens):
            if t in token_to_id:
                raise fail(f"token {t!r} appears twice in the vocabulary (ids {token_to_id[t]} and {i})")
            token_to_id[t] = i

        # per-model defaults, then the file's values
        if kind == "llama":
            ids: dict[str, int | None] = {"bos": 1, "eos": 2, "unk": 0}
            add_bos, add_eos, add_space_prefix = True, False, True
        elif kind == "gpt2":
            ids = {"bos": 11, "eos": 11, "unk": None}
            add_bos, add_eos, add_space_prefix = pre_add_bos, False, False
            if pre_no_bos:
                ids["bos"] = None
        else:
            raise fail(f"tokenizer model {kind!r} is not supported (supported: 'gpt2', 'llama')")
        for name in _ID_KEYS:
            ids.setdefault(name, None)
        for name in list(ids):
            if ids[name] is not None and ids[name] >= n:
                ids[name] = None
        for name, key in list(_ID_KEYS.items()) + list(_DEPRECATED_ID_KEYS.items()):
            if key not in md:
                continue
            value = md[key]
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
                raise fail(f"metadata key {key!r} is {value!r:.40}, expected a token id in 0..{n - 1}")
            ids[name] = value
        if isinstance(md.get("tokenizer.ggml.add_bos_token"), bool):
            add_bos = md["tokenizer.ggml.add_bos_token"]
        if isinstance(md.get("tokenizer.ggml.add_eos_token"), bool):
            add_eos = md["tokenizer.ggml.add_eos_token"]
        if isinstance(md.get("tokenizer.ggml.add_space_prefix"), bool):
            add_space_prefix = md["tokenizer.ggml.add_space_prefix"]
        if add_bos and ids["bos"] is None:
            raise fail("add_bos_token is set but the vocabulary has no BOS token")
        if add_eos and ids["eos"] is None:
            raise fail("add_eos_token is set but the vocabulary has no EOS token")

        def force_control(i: int) -> None:
            attrs[i] |= A_CONTROL

        # EOT / EOM / FIM by text when the file does not name them (llama.cpp takes the first hit of
        # its hash-map walk; we take the lowest id, which is the same whenever a vocabulary has one)
        def detect(name: str, texts) -> None:
            if ids[name] is not None:
                return
            hits = sorted(token_to_id[t] for t in texts if t in token_to_id)
            if hits:
                ids[name] = hits[0]
                force_control(hits[0])

        detect("eot", EOT_TEXTS)
        detect("eom", EOM_TEXTS)
        for name, texts in FIM_TEXTS.items():
            detect(name, texts)

        for i, t in enumerate(tokens):
            if attrs[i] & A_CONTROL and "unused" in t:
                attrs[i] |= A_UNUSED

        eog: set[int] = {ids[k] for k in ("fim_pad", "fim_rep", "fim_sep") if ids[k] is not None}
        for t in EOG_TEXTS:
            i = token_to_id.get(t)
            if i is not None:
                eog.add(i)
                force_control(i)
        for t in ALWAYS_RENDERED:
            i = token_to_id.get(t)
            if i is not None:
                attrs[i] = A_USER_DEFINED
        for k in ("eos", "eot", "eom"):
            if ids[k] is not None:
                eog.add(ids[k])
        texts = {tokens[i]: i for i in eog}
        # o200k_harmony (and solar-open): "<|end|>" ends a message, not the generation
        has_call = "<|call|>" in texts or "<|calls|>" in texts
        if "<|end|>" in texts and has_call and ("<|return|>" in texts or "<|flush|>" in texts):
            end_id = texts["<|end|>"]
            eog.discard(end_id)
            attrs[end_id] = A_USER_DEFINED
        if "</s>" in texts and ("<|tool_response>" in texts or "<|plamo:eos|>" in texts):
            eog.discard(texts["</s>"])
            attrs[texts["</s>"]] = A_NORMAL

        special_ids = [
            i for i in range(n) if attrs[i] & A_SPECIAL
        ]
        special_ids.sort(key=lambda i: (-len(tokens[i].encode("utf-8")), i))

        # per-token strip flags llama.cpp sets by model name
        name = str(md.get("general.name", "")).lower()
        arch = str(md.get("general.architecture", ""))
        pre = kind_pre(md)
        if any(s in pre for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or any(
            s in arch for s in ("nomic-bert-moe", "jina-bert-v3")
        ):
            if "<mask>" in token_to_id:
                attrs[token_to_id["<mask>"]] |= A_LSTRIP
        elif "phi-3" in name or "phi3" in name:
            for i in special_ids:
                attrs[i] |= A_RSTRIP
            if "</s>" in token_to_id:
                attrs[token_to_id["</s>"]] |= A_RSTRIP
            for t in ("<unk>", "<s>", "<|endoftext|>"):
                if t in token_to_id:
                    attrs[token_to_id[t]] &= ~A_RSTRIP
        elif "modern-bert" in name and "[MASK]" in token_to_id:
            attrs[token_to_id["[MASK]"]] |= A_LSTRIP

        arch_ctx = md.get(f"{arch}.context_length")
        template = md.get("tokenizer.chat_template")
        if template is not None and not isinstance(template, str):
            raise fail(f"metadata key 'tokenizer.chat_template' is {_describe(template)}, expected a string")
        if template is not None:
            from .chat import template_error

            reason = template_error(template)
            if reason is not None:
                raise fail(f"metadata key 'tokenizer.chat_template' does not compile: {reason}")
        return cls(
            path=path,
            model=kind,
            pre=pre,
            tokens=tokens,
            attrs=attrs,
            scores=scores,
            merges=merges if isinstance(merges, list) else None,
            ids=ids,
            add_bos=bool(add_bos),
            add_eos=bool(add_eos),
            add_space_prefix=bool(add_space_prefix),
            eog_ids=frozenset(eog),
            special_ids=special_ids,
            chat_template=template,
            model_max_context=int(arch_ctx) if isinstance(arch_ctx, int) and not isinstance(arch_ctx, bool) else None,
            metadata=md,
        )


def _length(value) -> str:
    return f"{len(value)} entries" if isinstance(value, list) else f"a {type(value).__name__}"


def _describe(value) -> str:
    if isinstance(value, list):
        kinds = sorted({type(v).__name__ for v in value})
        return f"an array of {'/'.join(kinds) or 'nothing'}"
    return f"a {type(value).__name__}"


def kind_pre(md: dict) -> str:
    pre = md.get("tokenizer.ggml.pre")
    return pre if isinstance(pre, str) else ""
