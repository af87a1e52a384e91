"""orcd-llama-adapter: the architectures `qwen2`, `llama` and `phi3` for orcd-worker.

Registered through the `orcd_register_architectures` hook (entry point `llama-adapter`). Importing
this package touches no GPU.
"""

from __future__ import annotations

from orcd_core.hookspecs import hookimpl

from .config import DecoderConfig
from .decoder import DecoderModel
from .llama import Llama
from .phi3 import Phi3
from .qwen2 import Qwen2

__all__ = ["DecoderConfig", "DecoderModel", "Llama", "Phi3", "Qwen2"]


@hookimpl
def orcd_register_architectures(register):
    register(Qwen2())
    register(Llama())
    register(Phi3())
