"""Tokenization: GGUF vocabularies (`gguf-bpe`, `gguf-spm`) and `tokenizer.json` (`hf-json`), the
UTF-8-safe streaming detokenizer, and chat templates.

    tok = load_tokenizer(open_gguf(path))
    ids = tok.encode("Hello", add_special=True, parse_special=False)
    text = tok.decode(ids)
    stream = IncrementalDetokenizer(tok); piece = stream.push(token_id)
    prompt = render_chat(tok, [{"role": "user", "content": "Hi"}])

The behaviour is llama.cpp's (src/llama-vocab.cpp) as far as the tests can tell: same ids for
llama.cpp's own vocab test vectors and for 2,000 generated strings per vocabulary.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import GGUFVocabularyError, TokenizerError
from .backends import TokenizerBackend
from .base import IncrementalDetokenizer, Tokenizer
from .chat import CHATML_TEMPLATE, encode_chat, render_chat
from .vocab import TokenAttr

__all__ = [
    "CHATML_TEMPLATE",
    "IncrementalDetokenizer",
    "TokenAttr",
    "Tokenizer",
    "TokenizerBackend",
    "encode_chat",
    "load_tokenizer",
    "render_chat",
    "tokenizer_kind",
]


def load_tokenizer(model, registry=None, tokenizer_json: Path | str | None = None) -> Tokenizer:
    """The tokenizer for an opened `GGUFModel`, built by the registered backend that applies with the
    highest priority. `tokenizer_json` (else a `tokenizer.json` beside the model file, if any) selects
    the `hf-json` backend. Raises `TokenizerError` when no backend applies or the vocabulary is bad."""
    backend, tj = _choose_backend(model, registry, tokenizer_json)
    tokenizer = backend.load(model, tj)
    _check_chat_template(model, tokenizer)
    return tokenizer


def tokenizer_kind(model, registry=None, tokenizer_json: Path | str | None = None) -> str | None:
    """The kind of the backend `load_tokenizer` would use for `model` (None when none applies);
    reads metadata only, builds nothing."""
    try:
        backend, _tj = _choose_backend(model, registry, tokenizer_json)
    except TokenizerError:
        return None
    return backend.kind


def _choose_backend(model, registry, tokenizer_json):
    if registry is None:
        from ..plugins import default_registry

        registry = default_registry()
    if tokenizer_json is None:
        beside = Path(model.path).with_name("tokenizer.json")
        if beside.is_file():
            tokenizer_json = beside
    tj = Path(tokenizer_json) if tokenizer_json is not None else None
    if tj is not None and not tj.is_file():
        raise TokenizerError(f"{tj}: tokenizer.json not found")
    backends = sorted(registry.tokenizers.values(), key=lambda b: (-getattr(b, "priority", 0), b.kind))
    for backend in backends:
        if backend.applies(model, tj):
            return backend, tj
    raise GGUFVocabularyError(
        model.path, f"no tokenizer backend applies (tokenizer.ggml.model = "
        f"{model.get('tokenizer.ggml.model')!r:.60}; installed backends: {', '.join(b.kind for b in backends) or 'none'})"
    )


def _check_chat_template(model, tokenizer: Tokenizer) -> None:
    """The file's chat template must render the simplest chat (one user message): a template that
    cannot (an undefined name, a failing filter) would fail every chat request of a model that
    looks healthy, so it is a load error naming the key."""
    if not getattr(tokenizer, "chat_template", None):  # (a plugin backend may return its own type)
        return
    from ..errors import ChatTemplateError

    try:
        render_chat(tokenizer, [{"role": "user", "content": "Hello"}])
    except ChatTemplateError as exc:
        reason = " ".join(str(exc).split())[:300]
        raise GGUFVocabularyError(
            model.path, f"metadata key 'tokenizer.chat_template' cannot render a one-message chat: {reason}") from None
