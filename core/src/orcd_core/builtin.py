"""The core's own plugin (entry point `core`): float tensor types and the tokenizer backends.

It is loaded through the same entry-point path as every other plugin.
"""

from __future__ import annotations

from .hookspecs import hookimpl


@hookimpl
def orcd_register_quant_formats(register):
    from .floats import FORMATS

    for fmt in FORMATS:
        register(fmt)


@hookimpl
def orcd_register_tokenizers(register):
    from .tokenizer.backends import BUILTIN_BACKENDS

    for backend in BUILTIN_BACKENDS:
        register(backend)
