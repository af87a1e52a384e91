"""`orcd-worker generate [MODEL] --prompt P [--chat] [--max-tokens N] [--temperature T] [--seed S]
[--top-k K] [--top-p P] [--min-p P] [--repeat-penalty R] [--stop S ...] [--backend reference|cuda]
[--json]`: generate from one prompt, streaming the text to stdout as it is decoded. With --json,
print one object {"ids": [...], "text": ...} of the generated tokens only (no prompt) instead."""

from __future__ import annotations

import argparse
import json
import sys

from orcd_core.generation import GenerationRequest, SamplingParams

from ._model_args import add_model_args, load_engine


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate text from a prompt", description=__doc__)
    add_model_args(parser)
    parser.add_argument("--prompt", "-p", required=True, help="the prompt text")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--max-tokens", "-n", type=int, default=256, metavar="N", help="at most N new tokens (256)")
    parser.add_argument("--temperature", "-t", type=float, default=0.8, metavar="T", help="0 = greedy (0.8)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (0)")
    parser.add_argument("--top-k", type=int, default=40, metavar="K", help="0 = off (40)")
    parser.add_argument("--top-p", type=float, default=0.95, metavar="P", help="1 = off (0.95)")
    parser.add_argument("--min-p", type=float, default=0.05, metavar="P", help="0 = off (0.05)")
    parser.add_argument("--repeat-penalty", type=float, default=1.0, metavar="R", help="1 = off (1.0)")
    parser.add_argument("--repeat-last-n", type=int, default=64, metavar="N", help="penalty window (64)")
    parser.add_argument("--stop", action="append", default=[], metavar="S", help="stop sequence (repeatable)")
    parser.add_argument("--json", action="store_true", help='print {"ids": [...], "text": ...} instead of streaming')
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                              repetition_penalty=args.repeat_penalty, repetition_window=args.repeat_last_n,
                              seed=args.seed)
    request = GenerationRequest(prompt=args.prompt, chat=args.chat, max_tokens=args.max_tokens,
                                stop=tuple(args.stop), sampling=sampling)
    engine = load_engine(args)
    try:
        prepared = engine.prepare(request)
        gen = engine.run(prepared)
        while True:
            try:
                token = next(gen)
            except StopIteration as done:
                result = done.value
                break
            if not args.json and token.text:
                sys.stdout.write(token.text)
                sys.stdout.flush()
    finally:
        engine.close()
    if args.json:
        print(json.dumps({"ids": result.ids, "text": result.text}, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        print(f"[{result.tokens_in} prompt tokens in {result.prompt_ms:.0f} ms; {result.tokens_out} tokens in "
              f"{result.decode_ms:.0f} ms; finish: {result.finish_reason}]", file=sys.stderr)
    return 0
