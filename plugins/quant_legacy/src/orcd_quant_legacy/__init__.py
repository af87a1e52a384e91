"""orcd-worker plugin: the legacy 32-weight block formats Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Entry point `quant-legacy` in the group `orcd_worker`. Importing this package imports NumPy only.
"""

from __future__ import annotations

from orcd_core.hookspecs import hookimpl

from .formats import FORMATS, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0

__all__ = ["FORMATS", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "orcd_register_quant_formats"]


@hookimpl
def orcd_register_quant_formats(register):
    for fmt in FORMATS:
        register(fmt)
