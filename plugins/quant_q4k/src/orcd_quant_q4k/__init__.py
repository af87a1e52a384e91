"""orcd-worker plugin: the k-quant formats Q4_K, Q5_K, Q6_K (the Q4_K_M recipe's weight types).

Entry point `quant-q4k` in the group `orcd_worker`. Importing this package imports NumPy only.
"""

from __future__ import annotations

from orcd_core.hookspecs import hookimpl

from .formats import FORMATS, Q4_K, Q5_K, Q6_K

__all__ = ["FORMATS", "Q4_K", "Q5_K", "Q6_K", "orcd_register_quant_formats"]


@hookimpl
def orcd_register_quant_formats(register):
    for fmt in FORMATS:
        register(fmt)
