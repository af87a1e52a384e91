"""orcd-worker plugin: the MXFP4 format (gpt-oss's MoE expert weights).

Entry point `quant-mxfp4` in the group `orcd_worker`. Importing this package imports NumPy only.
"""

from __future__ import annotations

from orcd_core.hookspecs import hookimpl

from .formats import FORMATS, MXFP4

__all__ = ["FORMATS", "MXFP4", "orcd_register_quant_formats"]


@hookimpl
def orcd_register_quant_formats(register):
    for fmt in FORMATS:
        register(fmt)
