"""`orcd-worker logits [MODEL] --ids 1,2,3 [--top K] [--json]`: evaluate exactly these token ids
from position 0 (no BOS is added) and print each position's top-K ids and logits (llama.cpp's
eval-callback, for debugging). JSON: {"positions": [{"pos": 0, "top": [[id, logit], ...]}, ...]}."""

from __future__ import annotations

import argparse
import json

import numpy as np

from orcd_core.generation import InvalidRequest

from ._model_args import add_model_args, load_engine


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("logits", help="print the top logits at each position of given ids",
                                   description=__doc__)
    add_model_args(parser)
    parser.add_argument("--ids", required=True, help="comma-separated token ids, e.g. 1,2,3")
    parser.add_argument("--top", type=int, default=5, metavar="K", help="how many ids per position (5)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=run)


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise InvalidRequest(f"--ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise InvalidRequest("--ids is empty")
    return ids


def top_k(logits: np.ndarray, k: int) -> list[list]:
    """The k largest (id, logit) of one position, by logit descending, lowest id first on ties."""
    k = min(k, logits.size)
    cand = np.argpartition(-logits, k - 1)[:k] if k < logits.size else np.arange(logits.size)
    cand = cand[np.lexsort((cand, -logits[cand]))]
    return [[int(i), float(logits[i])] for i in cand]


def run(args: argparse.Namespace) -> int:
    ids = parse_ids(args.ids)
    if args.top < 1:
        raise InvalidRequest(f"--top must be >= 1, got {args.top}")
    engine = load_engine(args)
    try:
        logits = engine.logits(ids)
        positions = [{"pos": p, "top": top_k(logits[p], args.top)} for p in range(len(ids))]
        if args.json:
            print(json.dumps({"positions": positions}))
        else:
            for p, entry in zip(ids, positions):
                tops = "  ".join(f"{i}:{v:.4f}({engine.tokenizer.decode([i])!r})" for i, v in entry["top"])
                print(f"{entry['pos']:5d} id {p:6d}  {tops}")
    finally:
        engine.close()
    return 0
