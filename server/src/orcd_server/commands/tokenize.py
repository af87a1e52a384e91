"""`orcd-worker tokenize MODEL (--text T | --file F) [--special] [--no-bos] [--json]` prints token ids
and their pieces; `orcd-worker tokenize MODEL --decode 1,2,3` prints the text of ids.

Works on vocab-only GGUF files (no tensors), such as llama.cpp's `ggml-vocab-*.gguf`. BOS/EOS are
added only where the file's metadata says so (llama.cpp's `add_special`); `--special` lets control
tokens written in the text (`<|im_start|>`) become those tokens (llama.cpp's `parse_special`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from orcd_core.errors import OrcdError
from orcd_core.gguf_file import check_supported, open_gguf
from orcd_core.plugins import default_registry
from orcd_core.tokenizer import load_tokenizer

from ._model_args import add_model_arg


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "tokenize",
        help="tokenize text (or decode ids) with a model's vocabulary",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arg(parser, "path to a GGUF file (a vocab-only file is enough)", required=True)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="the text to tokenize")
    what.add_argument("--file", type=Path, help="a UTF-8 file whose content is tokenized")
    what.add_argument("--decode", metavar="IDS", help="comma-separated token ids to turn into text")
    parser.add_argument("--special", action="store_true",
                        help="match control-token texts such as <|im_end|> (default: they stay plain text)")
    parser.add_argument("--no-bos", action="store_true", help="do not add BOS/EOS even where the model adds them")
    parser.add_argument("--skip-special", action="store_true", help="with --decode: render control tokens as nothing")
    parser.add_argument("--tokenizer", type=Path, default=None, metavar="PATH",
                        help="use this tokenizer.json instead of the GGUF vocabulary")
    parser.add_argument("--json", action="store_true", help='print {"ids": [...], "pieces": [...]} (or {"text": ...})')
    parser.set_defaults(func=run)


def _ids(raw: str) -> list[int]:
    try:
        return [int(part) for part in raw.replace(" ", "").split(",") if part]
    except ValueError:
        raise OrcdError(f"--decode takes comma-separated integers, got {raw!r}") from None


def run(args: argparse.Namespace) -> int:
    model = open_gguf(args.model)
    registry = default_registry()
    check_supported(model, registry)
    tok = load_tokenizer(model, registry, tokenizer_json=args.tokenizer)
    if args.decode is not None:
        text = tok.decode(_ids(args.decode), skip_special=args.skip_special)
        print(json.dumps({"text": text}, ensure_ascii=False) if args.json else text)
        return 0
    if args.file is not None:
        try:
            text = args.file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise OrcdError(f"{args.file}: cannot read as UTF-8 text: {exc}") from None
    else:
        text = args.text
    ids = tok.encode(text, add_special=not args.no_bos, parse_special=args.special)
    pieces = tok.pieces(ids)
    if args.json:
        print(json.dumps({"ids": ids, "pieces": pieces}, ensure_ascii=False))
    else:
        out = sys.stdout
        for i, piece in zip(ids, pieces):
            out.write(f"{i:>8} {piece!r}\n")
        out.write(f"{len(ids)} tokens ({tok.kind})\n")
    return 0
