"""`orcd-worker generate [MODEL | -m MODEL] --prompt P [--chat] [--max-tokens N] [--temperature T]
[--seed S] [--top-k K] [--top-p P] [--min-p P] [--repetition-penalty R] [--stop S ...]
[--backend cuda|reference] [--json]`: generate from one prompt, streaming the text to stdout as it is
decoded. The sampling defaults are the HTTP API's (orcd_core.generation.SamplingParams). With
--json, print one object {"ids": [...], "text": ...} of the generated tokens only (no prompt)."""

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
    d = SamplingParams()  # one set of defaults: the HTTP API (POST /execute, /v1) uses the same
    parser.add_argument("--max-tokens", "-n", type=int, default=256, metavar="N", help="at most N new tokens (256)")
    parser.add_argument("--temperature", "-t", type=float, default=d.temperature, metavar="T",
                        help=f"0 = greedy ({d.temperature:g})")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (0)")
    parser.add_argument("--top-k", type=int, default=d.top_k, metavar="K", help=f"0 = off ({d.top_k})")
    parser.add_argument("--top-p", type=float, default=d.top_p, metavar="P", help=f"1 = off ({d.top_p:g})")
    parser.add_argument("--min-p", type=float, default=d.min_p, metavar="P", help=f"0 = off ({d.min_p:g})")
    parser.add_argument("--repetition-penalty", "--repeat-penalty", dest="repetition_penalty", type=float,
                        default=d.repetition_penalty, metavar="R",
                        help=f"as the HTTP field repetition_penalty; 1 = off ({d.repetition_penalty:g})")
    parser.add_argument("--presence-penalty", type=float, default=d.presence_penalty, metavar="P",
                        help=f"as the HTTP field presence_penalty; 0 = off ({d.presence_penalty:g})")
    parser.add_argument("--frequency-penalty", type=float, default=d.frequency_penalty, metavar="F",
                        help=f"as the HTTP field frequency_penalty; 0 = off ({d.frequency_penalty:g})")
    parser.add_argument("--repeat-last-n", type=int, default=d.repetition_window, metavar="N",
                        help=f"penalty window ({d.repetition_window})")
    parser.add_argument("--stop", action="append", default=[], metavar="S", help="stop sequence (repeatable)")
    parser.add_argument("--json", action="store_true", help='print {"ids": [...], "text": ...} instead of streaming')
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                              repetition_penalty=args.repetition_penalty, repetition_window=args.repeat_last_n,
                              presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
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
