"""`orcd-worker inspect MODEL [--json] [--context N]`: what a GGUF file holds, read from its header,
metadata and tensor table only (no tensor data is read, nothing touches a GPU).

Reports the architecture, parameter count, layer count, quant mix (GGML type -> tensor count and
bytes; the bytes add up to the file's tensor data), tokenizer kind, context length (null when the
file does not say), vocabulary size, whether the installed plugins support the file (plugins,
architecture config and tokenizer, as `serve` checks them before loading), and an estimate
of the VRAM the CUDA backend needs for the weights (each tensor in a 256-byte-aligned arena) plus an
fp16 KV cache at `--context` tokens (default: the model's context length, else 4096), counted as the
worker allocates it (`orcd_core.shape.kv_bytes`: sliding-window layers hold their window only; null
when no installed plugin runs the file). Activations and workspaces are not included. A malformed
file prints one line and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from orcd_core.errors import GGUFMetadataError, ModelLoadError
from orcd_core.gguf_file import DEFAULT_MAX_TENSORS, MAX_CONTEXT_LENGTH, GGUFModel, check_supported, open_gguf
from orcd_core.plugins import load_plugins
from orcd_core.shape import DEFAULT_CONTEXT, align, kv_bytes
from orcd_core.tokenizer import load_tokenizer, tokenizer_kind

from ._model_args import add_model_arg



def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="show a GGUF model's architecture, quant mix, tokenizer and VRAM estimate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arg(parser, "path to a GGUF file", required=True)
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--context", type=int, metavar="N", help="context length for the KV-cache estimate")
    parser.set_defaults(func=run)


def _int(model: GGUFModel, key: str, lo: int = 1, hi: int | None = None) -> int | None:
    """An integer metadata value in lo..hi, None when absent; a value of another type is an error."""
    return model.int_value(key, None, lo=lo, hi=hi)


def _block_count(model: GGUFModel) -> int | None:
    """`{arch}.block_count`, at most the tensor count (every block has a tensor); a vocabulary-only
    file has no tensors and gets the tensor-table limit instead."""
    return _int(model, f"{model.architecture}.block_count", hi=len(model.tensors) or DEFAULT_MAX_TENSORS)


def kv_cache_bytes(model: GGUFModel, n_ctx: int, registry) -> tuple[int | None, str | None]:
    """The KV cache at `n_ctx` tokens as the worker would allocate it (`orcd_core.shape.kv_bytes` of
    the architecture's `ModelShape`: sliding windows and per-layer KV heads counted), and why the
    file cannot be loaded (None when it can). Unknown (None) when no plugin runs the architecture or
    its config rejects the metadata."""
    try:
        arch = check_supported(model, registry)
        if arch is None:  # a vocabulary-only file
            return None, None
        return kv_bytes(arch.config(model).shape(), n_ctx), None
    except ModelLoadError as exc:
        return None, exc.what


def inspect_model(path: str, context: int | None = None) -> dict[str, Any]:
    model = open_gguf(path)
    arch = model.architecture
    context_length = _int(model, f"{arch}.context_length", hi=MAX_CONTEXT_LENGTH)
    tokens = model.get("tokenizer.ggml.tokens")
    vocab_size = len(tokens) if isinstance(tokens, list) else _int(model, f"{arch}.vocab_size")
    if vocab_size is None and "token_embd.weight" in model.tensors:
        vocab_size = model.tensors["token_embd.weight"].shape[-1]
    tok_model = model.get("tokenizer.ggml.model")
    n_ctx = context if context is not None else (context_length or DEFAULT_CONTEXT)
    if n_ctx <= 0:
        raise GGUFMetadataError(model.path, f"context {n_ctx} for the KV-cache estimate, expected a positive number")
    weights = sum(align(t.nbytes) for t in model.tensors.values())
    registry = load_plugins()
    kv, reason = kv_cache_bytes(model, n_ctx, registry)
    if reason is None and model.get("tokenizer.ggml.model") is not None:
        try:  # what `serve` checks before it touches a device: plugins, the architecture config, the tokenizer
            load_tokenizer(model, registry)
        except ModelLoadError as exc:
            reason = exc.what
    supported = reason is None

    return {
        "path": str(model.path),
        "file_size": model.file_size,
        "gguf_version": model.version,
        "name": model.get("general.name"),
        "architecture": arch,
        "parameters": sum(t.n_elements for t in model.tensors.values()),
        "block_count": _block_count(model),
        "embedding_length": _int(model, f"{arch}.embedding_length"),
        "context_length": context_length,
        "vocab_size": vocab_size,
        "tokenizer_model": tok_model if isinstance(tok_model, str) else None,
        "tokenizer_kind": tokenizer_kind(model, registry),
        "tensor_count": len(model.tensors),
        "tensor_data_bytes": model.tensor_data_bytes,
        "quant_mix": model.quant_mix(),
        "vram_estimate": {
            "context": n_ctx,
            "weights_bytes": weights,
            "kv_cache_bytes": kv,
            "total_bytes": weights + (kv or 0),
        },
        "supported": supported,
        "unsupported_reason": reason,
    }


def _mib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**20:,.1f} MiB"


def format_text(info: dict[str, Any]) -> str:
    vram = info["vram_estimate"]
    lines = [
        f"file:           {info['path']} ({info['file_size']:,} bytes, GGUF v{info['gguf_version']})",
        f"name:           {info['name'] or '-'}",
        f"architecture:   {info['architecture']}",
        f"parameters:     {info['parameters']:,}",
        f"layers:         {info['block_count'] if info['block_count'] is not None else '-'}",
        f"context length: {info['context_length'] if info['context_length'] is not None else 'not set in the file'}",
        f"vocabulary:     {info['vocab_size'] if info['vocab_size'] is not None else '-'} tokens, "
        f"tokenizer {info['tokenizer_kind'] or '-'} (tokenizer.ggml.model = {info['tokenizer_model']!r})",
        f"tensors:        {info['tensor_count']}, {info['tensor_data_bytes']:,} bytes of data",
        "quant mix:",
    ]
    for name, entry in info["quant_mix"].items():
        share = entry["bytes"] / info["tensor_data_bytes"] * 100 if info["tensor_data_bytes"] else 0.0
        lines.append(f"  {name:<8} {entry['tensors']:>5} tensors {entry['bytes']:>15,} bytes ({share:5.1f}%)")
    lines.append(
        f"VRAM estimate:  {_mib(vram['total_bytes'])} at context {vram['context']} "
        f"(weights {_mib(vram['weights_bytes'])}, fp16 KV cache {_mib(vram['kv_cache_bytes'])})"
    )
    lines.append("supported:      yes" if info["supported"] else f"supported:      no: {info['unsupported_reason']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    info = inspect_model(args.model, args.context)
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_text(info))
    return 0
