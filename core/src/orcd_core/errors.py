"""Errors that the worker reports to users. Every message names what is wrong and what was expected."""

from __future__ import annotations


class OrcdError(Exception):
    """Base of every error orcd-worker raises on purpose."""


class PluginError(OrcdError):
    """A plugin could not be imported, or registered something inconsistent."""


class ModelLoadError(OrcdError):
    """A model file cannot be loaded. Subclasses say why; the message names the file and the field
    or tensor at fault."""

    def __init__(self, path: object, what: str):
        self.path = str(path)
        self.what = what
        super().__init__(f"{self.path}: {what}")


class ModelFileNotFound(ModelLoadError):
    """The path does not exist or cannot be read."""


class GGUFFormatError(ModelLoadError):
    """The file is not a well-formed GGUF file (magic, version, counts, truncated sections)."""


class GGUFMetadataError(ModelLoadError):
    """A metadata key that the architecture needs is missing or has the wrong type or value."""


class GGUFTensorError(ModelLoadError):
    """A tensor's table entry is inconsistent: offset or size outside the file, bad dims, misaligned."""


class UnsupportedArchitecture(ModelLoadError):
    """No installed plugin provides the file's `general.architecture`."""


class UnsupportedTensorType(ModelLoadError):
    """No installed plugin provides a tensor's GGML type."""


class InsufficientVram(ModelLoadError):
    """The model (weights + KV cache + workspace) needs more VRAM than the GPU has free. The message
    names the bytes required and available, the device id and the model path."""


class TokenizerError(OrcdError):
    """The model's vocabulary cannot be turned into a tokenizer (unknown model or pre-tokenizer, ...)."""


class GGUFVocabularyError(GGUFMetadataError, TokenizerError):
    """The file's `tokenizer.*` metadata is inconsistent (array lengths, token types, special token
    ids, merges, chat template type). A load error naming the file and the key, and a TokenizerError
    for code that only tokenizes."""


class ChatTemplateError(OrcdError):
    """A chat template failed to render (syntax, sandbox violation, time or size limit)."""
