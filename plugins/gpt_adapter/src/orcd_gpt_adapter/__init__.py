"""orcd-gpt-adapter: the architectures `gpt-oss` and `gpt2` for orcd-worker.

Registered through the `orcd_register_architectures` hook (entry point `gpt-adapter`). Importing
this package touches no GPU.
"""

from __future__ import annotations

from orcd_core.hookspecs import hookimpl

from .gpt2 import Gpt2, Gpt2Config, Gpt2Model
from .gpt_oss import GptOss, GptOssConfig, GptOssModel

__all__ = ["Gpt2", "Gpt2Config", "Gpt2Model", "GptOss", "GptOssConfig", "GptOssModel"]


@hookimpl
def orcd_register_architectures(register):
    register(GptOss())
    register(Gpt2())
