"""`Tokenizer`: one object per loaded vocabulary, whatever the backend.

The text -> ids path follows llama.cpp's `llama_vocab::impl::tokenize`:

1. special-token partition (`tokenizer_st_partition`): every control, user-defined and unknown token
   text is searched in the raw text, longest token first; a match becomes that token id and splits
   the text. With `parse_special=False`, control and unknown tokens are *not* searched (a user typing
   `<|im_end|>` gets ordinary tokens), but user-defined tokens still are, exactly as in llama.cpp and
   Hugging Face `tokenizers`. Tokens flagged lstrip/rstrip eat ASCII whitespace beside a match.
2. each remaining text fragment goes to the backend's `tokenizers.Tokenizer` (Rust BPE), after the
   SPM preparation where it applies (a space prefix for the first fragment and after each special
   token when `add_space_prefix`, spaces escaped to U+2581).
3. BOS/EOS are added around it when `add_special` and the vocabulary's `add_bos`/`add_eos` say so.

The ids -> text path follows `token_to_piece`/`llama_detokenize`: each token has a byte piece (GPT-2
byte decoding for byte-level BPE, U+2581 -> space and `<0xNN>` -> one byte for SPM, the raw text for
control/user-defined tokens); control and unknown tokens render as empty text when `skip_special`;
with `add_space_prefix` the first token loses one leading space (except right after a removed BOS).
llama.cpp's optional "clean spaces" passes (` ,` -> `,` etc., on for some BPE vocabularies) are not
applied: they are lossy, and llama.cpp's own server streams `token_to_piece` text without them.
"""

from __future__ import annotations

import bisect
import codecs
import re
from collections.abc import Callable, Iterable, Sequence

from ..errors import TokenizerError
from .vocab import A_CONTROL, A_LSTRIP, A_RSTRIP, A_UNKNOWN, TokenAttr

_C_SPACE = " \t\n\v\f\r"  # C isspace() in the "C" locale, as llama.cpp applies it to strip flags
_HIDDEN_WHEN_SKIPPING = A_CONTROL | A_UNKNOWN


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (byte-level BPE alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}
_TO_LATIN1 = str.maketrans({c: chr(b) for c, b in CHAR_TO_BYTE.items()})
_NOT_BYTE_CHAR = re.compile("[^" + "".join(re.escape(c) for c in CHAR_TO_BYTE) + "]")


def gpt2_piece(text: str) -> bytes:
    """llama.cpp's `llama_decode_text`: byte-level BPE token text -> bytes."""
    if _NOT_BYTE_CHAR.search(text) is None:
        return text.translate(_TO_LATIN1).encode("latin-1")
    out = bytearray()
    for ch in text:
        b = CHAR_TO_BYTE.get(ch)
        if b is not None:
            out.append(b)
        else:  # llama.cpp's marker for a character outside the byte alphabet, verbatim
            out += b"[UNK_BYTE_0x" + ch.encode("utf-8").hex().encode() + text.encode("utf-8") + b"]"
    return bytes(out)


def byte_token_value(text: str) -> int:
    """`<0xNN>` -> NN."""
    try:
        return int(text[3:5], 16)
    except ValueError:
        raise TokenizerError(f"byte token {text!r} is not of the form <0xNN>") from None


class Tokenizer:
    """Encode/decode for one vocabulary. Build through `load_tokenizer`; backends construct it.

    Attributes: `kind` ("gguf-bpe", "gguf-spm", "hf-json"), `vocab_size`, `bos_id`, `eos_id`
    (None when absent), `eog_ids` (frozenset of end-of-generation ids), `model_max_context`
    (None when the file does not say), `chat_template` (str or None), `add_bos`, `add_eos`,
    `add_space_prefix`.
    """

    def __init__(
        self,
        *,
        kind: str,
        tokens: Sequence[str],
        attrs: Sequence[int],
        pieces: Sequence[bytes],
        special_ids: Sequence[int],
        encode_fragment: Callable[[list[str]], list[list[int]]],
        spm_style: bool,
        bos_id: int | None,
        eos_id: int | None,
        eog_ids: Iterable[int],
        add_bos: bool,
        add_eos: bool,
        add_space_prefix: bool,
        chat_template: str | None,
        model_max_context: int | None,
        pre: str = "",
        clean_spaces: bool = False,
        source: str = "",
    ):
        self.kind = kind
        self.vocab_size = len(tokens)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.eog_ids = frozenset(eog_ids)
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.add_space_prefix = add_space_prefix
        self.chat_template = chat_template
        self.model_max_context = model_max_context
        self.pre = pre
        self.clean_spaces = clean_spaces  # llama.cpp's setting, reported only (see module docstring)
        self.source = source
        self._tokens = list(tokens)
        self._attrs = list(attrs)
        self._pieces = list(pieces)
        self._encode_fragments = encode_fragment
        self._spm = spm_style
        self._hidden = frozenset(i for i, a in enumerate(self._attrs) if a & _HIDDEN_WHEN_SKIPPING)
        self._special = [
            (i, self._tokens[i], bool(self._attrs[i] & A_LSTRIP), bool(self._attrs[i] & A_RSTRIP),
             not self._attrs[i] & (A_CONTROL | A_UNKNOWN))  # matched even without parse_special
            for i in special_ids
        ]
        self._index_specials()

    # -- metadata ---------------------------------------------------------------------------------

    def special_token_ids(self) -> list[int]:
        """Ids of the control and user-defined tokens matched in text (see `encode`)."""
        return [entry[0] for entry in self._special]

    def token_text(self, token_id: int) -> str:
        """The vocabulary entry as stored (e.g. `Ġthe`, `▁the`, `<0x0A>`, `<|im_end|>`)."""
        return self._tokens[self._check_id(token_id)]

    def token_attr(self, token_id: int) -> TokenAttr:
        return TokenAttr(self._attrs[self._check_id(token_id)])

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes this token contributes to text (control tokens render as their text)."""
        return self._pieces[self._check_id(token_id)]

    def is_eog(self, token_id: int) -> bool:
        return token_id in self.eog_ids

    def token_id(self, text: str) -> int | None:
        """The id of a vocabulary entry, or None."""
        return self._text_to_id.get(text)

    @property
    def bos_text(self) -> str:
        return self._tokens[self.bos_id] if self.bos_id is not None else ""

    @property
    def eos_text(self) -> str:
        return self._tokens[self.eos_id] if self.eos_id is not None else ""

    def _check_id(self, token_id: int) -> int:
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        return token_id

    # -- encode -----------------------------------------------------------------------------------

    def _index_specials(self) -> None:
        self._text_to_id = {t: i for i, t in enumerate(self._tokens)}
        # candidates are found by their first two characters; then looked up by exact text per length
        self._by_len: dict[bool, dict[int, dict[str, int]]] = {True: {}, False: {}}
        prefixes: dict[bool, set[str]] = {True: set(), False: set()}
        for order, (_, text, _, _, always) in enumerate(self._special):
            for parse_special in (True, False):
                if not parse_special and not always:
                    continue
                self._by_len[parse_special].setdefault(len(text), {})[text] = order
                prefixes[parse_special].add(text[:2])
        self._prefix_re: dict[bool, re.Pattern | None] = {}
        for parse_special, group in prefixes.items():
            if group:
                alt = "|".join(re.escape(p) for p in sorted(group, key=lambda p: (-len(p), p)))
                self._prefix_re[parse_special] = re.compile(f"(?=(?:{alt}))")
            else:
                self._prefix_re[parse_special] = None

    def _partition(
        self, text: str, parse_special: bool, literal_spans: Sequence[tuple[int, int]] = ()
    ) -> list[str | int]:
        """llama.cpp's `tokenizer_st_partition`: raw text -> str fragments and special token ids.
        An occurrence that overlaps one of `literal_spans` ([start, end) character offsets) is not
        matched: that text stays ordinary text."""
        finder = self._prefix_re[parse_special]
        if finder is None:
            return [text]
        by_len = self._by_len[parse_special]
        found: set[int] = set()
        for m in finder.finditer(text):
            pos = m.start()
            for length, table in by_len.items():
                order = table.get(text[pos : pos + length])
                if order is not None:
                    found.add(order)
        if not found:
            return [text]
        spans: list[tuple[int, int]] = []  # sorted, merged: their ends are sorted too
        for a, b in sorted(literal_spans):
            if spans and a <= spans[-1][1]:
                spans[-1] = (spans[-1][0], max(spans[-1][1], b))
            elif a < b:
                spans.append((a, b))
        starts = [a for a, _ in spans]

        def literal(at: int, end: int) -> bool:
            k = bisect.bisect_left(starts, end) - 1  # the last span that starts before `end`
            return k >= 0 and spans[k][1] > at

        fragments: list[tuple[int, int] | int] = [(0, len(text))]
        find = text.find
        for order in sorted(found):  # `_special` is already longest first
            token, tok_text, lstrip, rstrip, _ = self._special[order]
            n = len(tok_text)
            out: list[tuple[int, int] | int] = []
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                    continue
                start, end = frag
                while True:
                    at = find(tok_text, start, end)
                    while at >= 0 and spans and literal(at, at + n):
                        at = find(tok_text, at + 1, end)
                    if at < 0:
                        if start < end:
                            out.append((start, end))
                        break
                    left = at
                    if lstrip:
                        while left > start and text[left - 1] in _C_SPACE:
                            left -= 1
                    if left > start:
                        out.append((start, left))
                    out.append(token)
                    start = at + n
                    if rstrip:
                        while start < end and text[start] in _C_SPACE:
                            start += 1
            fragments = out
        return [f if isinstance(f, int) else text[f[0] : f[1]] for f in fragments]

    def encode(
        self,
        text: str,
        add_special: bool = True,
        parse_special: bool = False,
        *,
        literal_spans: Sequence[tuple[int, int]] = (),
    ) -> list[int]:
        """Text -> token ids, as llama.cpp's `llama_tokenize(text, add_special, parse_special)`.
        `literal_spans`: character ranges where special-token texts stay ordinary text even with
        `parse_special` (message contents inside a rendered chat template; see `encode_chat`)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes str, not {type(text).__name__}")
        fragments = self._partition(text, parse_special, literal_spans) if text else []
        # the texts handed to the Rust BPE, and where each result goes
        texts: list[str] = []
        prev_special = True
        for frag in fragments:
            if isinstance(frag, str):
                if self._spm:
                    if self.add_space_prefix and prev_special:
                        frag = " " + frag
                    frag = frag.replace(" ", "\u2581")
                texts.append(frag)
                prev_special = False
            else:
                prev_special = True
        encoded = iter(self._encode_fragments(texts) if texts else ())
        out: list[int] = []
        if add_special and self.add_bos:
            out.append(self.bos_id)  # type: ignore[arg-type]  # checked at load
        for frag in fragments:
            if isinstance(frag, str):
                out.extend(next(encoded))
            else:
                out.append(frag)
        if add_special and self.add_eos:
            out.append(self.eos_id)  # type: ignore[arg-type]
        return out

    # -- decode -----------------------------------------------------------------------------------

    def decode_bytes(self, ids: Sequence[int], skip_special: bool = False) -> bytes:
        """Token ids -> bytes, as llama.cpp's `llama_detokenize(remove_special=skip_special,
        unparse_special=not skip_special)` without its clean-up passes."""
        ids = list(ids)
        remove_space = self.add_space_prefix
        if skip_special and self.add_bos and ids and ids[0] == self.bos_id:
            remove_space = False
            ids = ids[1:]
        if skip_special and self.add_eos and ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        pieces = self._pieces
        n = self.vocab_size
        hidden = self._hidden if skip_special else frozenset()
        parts = []
        for i, t in enumerate(ids):
            if not 0 <= t < n:
                self._check_id(t)
            if t in hidden:
                piece = b""
            else:
                piece = pieces[t]
                if i == 0 and remove_space and piece[:1] == b" ":
                    piece = piece[1:]
            parts.append(piece)
        return b"".join(parts)

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Token ids -> text (UTF-8; an invalid byte sequence, which only an unusual id sequence can
        produce, becomes U+FFFD)."""
        return self.decode_bytes(ids, skip_special).decode("utf-8", "replace")

    def pieces(self, ids: Sequence[int]) -> list[str]:
        """Each token's own text (for display; a partial UTF-8 sequence shows as U+FFFD)."""
        return [self.token_bytes(t).decode("utf-8", "replace") for t in ids]


class IncrementalDetokenizer:
    """Streaming detokenizer: `push(id)` returns only complete UTF-8 text, holding the bytes of a code
    point split across tokens until it completes; `flush()` returns what is left at the end.

    The concatenation of every `push` and the final `flush` equals `tokenizer.decode(all_ids,
    skip_special)`, including llama.cpp's SPM rule (the first token loses one leading space, unless it
    follows a BOS removed by `skip_special`). Cost: one list lookup and one incremental UTF-8 decode.
    """

    __slots__ = ("_pieces", "_hidden", "_decoder", "_decode", "_first", "_strip", "_bos", "_eos", "_held_eos", "_n")

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._pieces = tokenizer._pieces
        self._n = tokenizer.vocab_size
        self._hidden = tokenizer._hidden if skip_special else frozenset()
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._decode = self._decoder.decode
        self._first = True
        self._strip = tokenizer.add_space_prefix
        self._bos = tokenizer.bos_id if (skip_special and tokenizer.add_bos) else None
        # with skip_special, decode() drops a final EOS (when the vocabulary adds EOS): hold it
        self._eos = tokenizer.eos_id if (skip_special and tokenizer.add_eos) else None
        self._held_eos = b""

    def push(self, token_id: int) -> str:
        if not 0 <= token_id < self._n:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (0..{self._n - 1})")
        piece = b"" if token_id in self._hidden else self._pieces[token_id]
        if self._first:
            self._first = False
            if token_id == self._bos:
                return ""  # removed; and no leading-space strip for what follows
            if self._strip and piece[:1] == b" ":
                piece = piece[1:]
        if token_id == self._eos and token_id not in self._hidden:
            piece, self._held_eos = self._held_eos, piece
        elif self._held_eos:
            piece = self._held_eos + piece
            self._held_eos = b""
        return self._decode(piece) if piece else ""

    def flush(self) -> str:
        self._held_eos = b""
        return self._decode(b"", True)

    @property
    def holding(self) -> bool:
        """True while the bytes of a split code point wait for the next token (`flush` would
        release them as U+FFFD); a held final EOS does not count (flush drops it)."""
        return bool(self._decoder.getstate()[0])
