"""Hook specifications of orcd-worker: the contract between the core and its plugins.

Specs only. The full contract of each hook (when it is called, its arguments, what it returns, an
example) is in docs/plugin_hooks.md; tests/test_plugin_docs.py keeps the two in step.

Every hook receives one `register` callback, so the core owns the registries (as in `llm`). Hooks
are called once, when the plugin manager loads, never on the per-token path.
"""

from __future__ import annotations

from typing import Callable

import pluggy

PROJECT_NAME = "orcd_worker"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def orcd_register_quant_formats(register: Callable[[object], None]) -> None:
    """Register one `orcd_core.quant.QuantFormat` per GGML tensor type the plugin implements."""


@hookspec
def orcd_register_architectures(register: Callable[[object], None]) -> None:
    """Register one `orcd_core.architecture.Architecture` per GGUF `general.architecture` value."""


@hookspec
def orcd_register_tokenizers(register: Callable[[object], None]) -> None:
    """Register one `orcd_core.tokenizer.TokenizerBackend` per tokenizer kind (e.g. `gguf-bpe`)."""
