"""`orcd-worker bench MODEL [--backend cuda] [-p 512] [-n 128] [-r 3] [--json]`: llama-bench's two tests.
(`--max-context N` sizes every KV cache as a served worker's is: see its help.)

- load: wall time of `Engine.load` (open + validate, tokenizer, weights uploaded to the device).
- pp N: prompt processing. N random token ids (seeded) prefilled from position 0 into a fresh KV
  cache; tok/s = N / time of the prefill (the last chunk's logits included, synchronized).
- tg N: text generation. One random token prefilled, then N decode steps, each feeding the previous
  step's token (greedy, chosen on the device; the CUDA backend replays one CUDA graph per step);
  tok/s = N / time of the N steps. With `-b B`, B sequences decode together (one batched step gives
  a token to each): tok/s = B * N / time.
Each test runs once as a warm-up (kernel compilation, workspace sizing, graph capture stay out of
the numbers), then `-r` times; the median is reported with the spread (min..max).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from orcd_core.device import MAX_BATCH
from orcd_core.generation import SamplingParams

from ._model_args import BACKEND_HELP, add_model_arg


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="measure load time, prompt processing and generation speed",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arg(parser, "path to a GGUF file", required=True)
    parser.add_argument("--backend", choices=("reference", "cuda"), default=None, help=BACKEND_HELP)
    parser.add_argument("--gpu-device", type=int, default=0, metavar="N", help="CUDA device index (default 0)")
    parser.add_argument("-p", "--n-prompt", type=int, default=512, metavar="N", help="prompt tokens for pp (512; 0 = skip)")
    parser.add_argument("-n", "--n-gen", type=int, default=128, metavar="N", help="generated tokens for tg (128; 0 = skip)")
    parser.add_argument("-d", "--depth", type=int, default=0, metavar="D",
                        help="tokens already in the KV cache before each test (0), as llama-bench -d")
    parser.add_argument("-r", "--repetitions", type=int, default=3, metavar="R", help="timed runs per test (3)")
    parser.add_argument("-b", "--batch", type=int, default=1, metavar="B",
                        help=f"sequences decoded together in tg (1..{MAX_BATCH}; tok/s counts all of them)")
    parser.add_argument("--max-batch", type=int, default=None, metavar="M",
                        help="sequences the engine can decode together, as `serve --max-batch` (default: B): "
                             "its caches and decode graphs, so that `-b 1 --max-batch 8` measures a lone "
                             "stream of a served worker")
    parser.add_argument("--max-context", type=int, default=None, metavar="N",
                        help="KV caches of N positions, as a served worker's (`serve --max-context`, else the "
                             "model's context); default: the positions the test needs. The decode attention's "
                             "splits cover a cache's whole context, so this measures a served step in process")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the random prompt ids (1234)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.set_defaults(func=run)


def _sync(dev, x) -> None:
    dev.to_host(x.reshape(-1)[:1])  # a 4-byte copy: waits for everything queued before it


def bench_pp(engine, n: int, reps: int, rng, depth: int = 0, ctx: int | None = None) -> list[float]:
    dev, model = engine.device, engine.model
    vocab = int(engine.config.n_vocab)
    times = []
    for r in range(reps + 1):
        ids = rng.integers(0, vocab, n).tolist()
        cache = model.new_kv_cache(ctx or depth + n)
        try:
            if depth:
                engine.prefill(rng.integers(0, vocab, depth).tolist(), cache)
            _sync(dev, dev.to_device([0]))
            t0 = time.perf_counter()
            logits = engine.prefill(ids, cache, start_pos=depth)
            _sync(dev, logits)
            dt = time.perf_counter() - t0
        finally:
            dev.free_kv_cache(cache)
        if r:
            times.append(dt)
    return times


def bench_tg(engine, n: int, reps: int, rng, depth: int = 0, batch: int = 1, ctx: int | None = None) -> list[float]:
    """`batch` sequences decoding together (continuous batching's step): each step yields one token
    per sequence, so the rate is batch * n / time."""
    from orcd_core.device import DecodeRow

    dev, model = engine.device, engine.model
    vocab = int(engine.config.n_vocab)
    greedy = SamplingParams(temperature=0.0, repetition_window=0)
    times = []
    decoder = dev.batch_decoder(engine.decode_forward, max_rows=batch)  # kept across runs, as the server's
    try:
        for r in range(reps + 1):
            caches, rows = [], []
            try:
                for _ in range(batch):
                    caches.append(model.new_kv_cache(ctx or depth + n + 1))
                    engine.prefill(rng.integers(0, vocab, depth + 1).tolist(), caches[-1])
                    rows.append(DecodeRow(cache=caches[-1], id=int(rng.integers(0, vocab)), position=depth + 1,
                                          step_index=1, params=greedy, recent=[], budget=n))
                    decoder.join(rows[-1])
                _sync(dev, dev.to_device([0]))
                t0 = time.perf_counter()
                for _ in range(n):
                    decoder.step()
                dt = time.perf_counter() - t0
            finally:
                for row in rows:
                    decoder.leave(row)
                decoder.step()  # (no rows: waits for a step still in flight before the caches go)
                for cache in caches:
                    dev.free_kv_cache(cache)
            if r:
                times.append(dt)
    finally:
        decoder.close()
    return times


def run(args: argparse.Namespace) -> int:
    from orcd_core.engine import Engine

    from ._model_args import backend

    rng = np.random.default_rng(args.seed)
    reps = max(1, args.repetitions)
    be = backend(args)
    t0 = time.perf_counter()
    if not 1 <= args.batch <= MAX_BATCH:
        raise SystemExit(f"orcd-worker bench: --batch must be in 1..{MAX_BATCH}, got {args.batch}")
    max_batch = args.batch if args.max_batch is None else args.max_batch
    if not args.batch <= max_batch <= MAX_BATCH:
        raise SystemExit(f"orcd-worker bench: --max-batch must be in {args.batch}..{MAX_BATCH} (--batch {args.batch}), "
                         f"got {max_batch}")
    need = args.depth + max(args.n_prompt, args.n_gen + 1, 1)
    if args.max_context is not None and args.max_context < need:
        raise SystemExit(f"orcd-worker bench: --max-context {args.max_context} is below the {need} positions "
                         f"the tests need (-d + max(-p, -n + 1))")
    ctx = args.max_context
    engine = Engine.load(args.model, backend=be, gpu_device=args.gpu_device, max_batch=max_batch,
                         max_context=ctx or need)
    load_s = time.perf_counter() - t0
    results = {"model": str(args.model), "architecture": engine.architecture, "backend": be,
               "gpu": getattr(engine.device, "gpu_name", None), "load_s": round(load_s, 3),
               "file_bytes": engine.gguf.file_size, "repetitions": reps, "depth": args.depth, "batch": args.batch,
               "max_batch": max_batch, "decode_gemv": getattr(engine.device, "decode_gemv", None),
               "max_context": ctx}
    try:
        for test, n, fn in (("pp", args.n_prompt, bench_pp), ("tg", args.n_gen, bench_tg)):
            if n <= 0:
                continue
            k = args.batch if test == "tg" else 1
            times = fn(engine, n, reps, rng, args.depth, ctx=ctx, **({"batch": k} if test == "tg" else {}))
            rates = sorted(k * n / t for t in times)
            results[f"{test}{n}"] = {"tok_s": round(statistics.median(rates), 2), "min": round(rates[0], 2),
                                     "max": round(rates[-1], 2), "runs_s": times}  # runs_s unrounded: the rates follow exactly
    finally:
        engine.close()
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"model: {results['model']} ({results['architecture']}, {results['file_bytes'] / 2**20:.0f} MiB)  "
          f"backend: {be}{' on ' + results['gpu'] if results['gpu'] else ''}"
          + (f"  decode GEMV: {results['decode_gemv']} (max batch {max_batch})" if results["decode_gemv"] else ""))
    print(f"{'test':>8} {'tok/s (median)':>16} {'min..max':>20}")
    print(f"{'load':>8} {results['load_s']:>14.3f} s")
    for key, val in results.items():
        if isinstance(val, dict):
            print(f"{key:>8} {val['tok_s']:>16.2f} {val['min']:>9.2f}..{val['max']:<9.2f}")
    return 0
