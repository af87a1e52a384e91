"""`orcd-worker synth ARCH OUT.gguf [--layers N] [--size full|tiny] [--seed S] [--vocab VOCAB.gguf] [--recipe R]`:
write a synthetic GGUF with the tensor names, shapes, types and metadata of a real model of ARCH,
filled with random valid blocks (deterministic from the seed)."""

from __future__ import annotations

import argparse
import sys

from orcd_core.testing import synth


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="write a synthetic GGUF model (real tensor layout, random weights)",
        description=__doc__,
    )
    parser.add_argument("arch", help="GGUF architecture (one whose installed adapter can be synthesized)")
    parser.add_argument("out", help="output .gguf path (written atomically)")
    parser.add_argument("--size", choices=synth.SIZES, default="tiny", help="full-size dims or scaled down (default: tiny)")
    parser.add_argument("--layers", type=int, default=None, help="override the layer count")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--vocab", default=None, help="vocabulary GGUF whose tokenizer.* metadata to copy (default: the arch's real one)"
    )
    parser.add_argument(
        "--recipe",
        default=None,
        help=f"type recipe: a llama.cpp mixture ({', '.join(synth.MIXTURES)}) or the name of any installed tensor "
             "type, a third-party plugin's included (`orcd-worker plugins` lists them; default: the real model's)",
    )
    parser.add_argument(
        "--untied", action="store_true", help="write a separate output.weight where the real model ties it to token_embd"
    )
    parser.add_argument("--threads", type=int, default=None, help="generator threads (default: all cores)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    def progress(msg: str) -> None:
        print(msg, file=sys.stderr)

    plan = synth.build_plan(
        args.arch,
        args.size,
        args.layers,
        args.recipe,
        args.vocab,
        tied=False if args.untied else None,
        seed=args.seed,
        progress=progress,
    )
    stats = synth.write_plan(plan, args.out, seed=args.seed, threads=args.threads)
    mix = ", ".join(f"{k} {v}" for k, v in sorted(plan.type_counts().items()))
    print(
        f"{stats.path}: {plan.arch} {plan.size}, {plan.dims.n_layer} layers, {stats.tensors} tensors ({mix}), "
        f"{stats.bytes:,} bytes in {stats.seconds:.2f} s ({stats.mb_per_s:.0f} MB/s, {stats.threads} threads)"
    )
    return 0
