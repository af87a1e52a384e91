"""orcd-quant-example: an out-of-tree orcd-worker plugin that adds the IQ4_NL tensor type.

orcd-worker finds this module through the entry point `quant-example` of the group `orcd_worker`
(see pyproject.toml) and calls the hook below once at start-up. Importing this module must stay cheap:
no CuPy, no GPU, no file or network access.
"""

from __future__ import annotations

from orcd_core.hookspecs import hookimpl

from .iq4_nl import IQ4_NL

__all__ = ["IQ4_NL", "orcd_register_quant_formats"]


@hookimpl
def orcd_register_quant_formats(register):
    """Hand one format object per GGML type to the core."""
    register(IQ4_NL())
