#!/usr/bin/env python3
"""Fuzz the whole model-load path with seeded random mutations of tiny GGUF models.

    uv run --no-sync python scripts/fuzz_gguf.py --count 10000 --seed 1 --out /tmp/fuzz-defects

Each mutation starts from one of the tiny models of tests/support/gguf_builder.py (qwen2, llama,
phi3, gpt-oss, gpt2) and applies one of: byte flips (1-8 bytes, 85% of them inside the header region:
header, metadata and tensor table), a truncation (70% inside the header region), or field rewrites
(1-3 metadata values or tensor-table fields replaced by hostile values: 0, -1, 2^32-1, 2^63, NaN, inf,
wrong types, huge or empty strings, swapped offsets, other GGML types). The file then goes through
what `orcd-worker serve` does: open_gguf, the plugin support check, the architecture config, the
tokenizer and chat template, the reference backend's weight build (`Engine.load`), and a 2-token
chat generation (`--no-generate` skips it).

Outcomes: **clean** (one ModelLoadError subclass whose one-line message names the file), **accepted**
(it loads and generates 2 tokens, or refuses the request cleanly as too long for its context or
invalid), **defect** (anything else: another exception type, a message without the path, a timeout,
running out of the memory limit, a crashed worker). Workers are a process pool; each sets RLIMIT_AS
(its start-up size + --memory-mb) and a per-file CPU-time timer (--timeout); the driver gives up on
a worker that returns nothing for 30 x --timeout + 60 s of wall time. Each defect's file and
traceback are saved to --out. Exit status 1 when there is a defect. Mutation i of
seed s is the same on every run (random.Random(f"{s}:{i}")).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import random
import resource
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))  # gguf_builder

ARCHS = ("qwen2", "llama", "phi3", "gpt-oss", "gpt2")
HOSTILE_INTS = [0, 1, 2, 3, -1, 7, 31, 33, 255, 1 << 15, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 40,
                (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
HOSTILE_FLOATS = [0.0, -0.0, -1.0, 1e-30, 1e30, math.nan, math.inf, -math.inf, 3.4e38]
BYTE_VALUES = [0x00, 0xFF, 0x7F, 0x80, 0x01, 0x20]

_BASE: dict[str, bytes] = {}
_HEAD: dict[str, int] = {}


def _base(arch: str):
    from gguf_builder import tiny_model

    return tiny_model(arch, seed=0)


def _base_bytes(arch: str) -> tuple[bytes, int]:
    if arch not in _BASE:
        b = _base(arch)
        _BASE[arch] = b.to_bytes()
        _HEAD[arch] = len(b.header_bytes())
    return _BASE[arch], _HEAD[arch]


def _position(rng: random.Random, head: int, size: int, header_share: float) -> int:
    return rng.randrange(head) if rng.random() < header_share else rng.randrange(size)


def _rewrite(rng: random.Random, arch: str) -> bytes:
    """1-3 hostile field values written through the builder (so the file stays well-formed around them)."""
    import gguf_builder as gb

    b = _base(arch)
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.7:
            kv = rng.choice(b.kvs)
            kv.raw = None
            choice = rng.random()
            if choice < 0.35:
                v = rng.choice(HOSTILE_INTS)
                if v < 0:
                    kv.vtype = gb.INT32 if v >= -(1 << 31) else gb.INT64
                else:
                    kv.vtype = gb.UINT32 if v < 1 << 32 and rng.random() < 0.5 else gb.UINT64
                kv.etype, kv.value = None, v
            elif choice < 0.55:
                kv.vtype, kv.etype, kv.value = gb.FLOAT32, None, rng.choice(HOSTILE_FLOATS)
            elif choice < 0.7:
                kv.vtype, kv.etype = gb.STRING, None
                kv.value = rng.choice(["", "x" * rng.randint(1, 5000), "\u00ff\u2581", "gpt2", "llama", "yarn"])
            elif choice < 0.8:
                kv.vtype, kv.etype, kv.value = gb.BOOL, None, rng.random() < 0.5
            elif choice < 0.9 and kv.vtype == gb.ARRAY and kv.value:
                items = list(kv.value)
                op = rng.random()
                if op < 0.3:
                    items = items[: rng.randrange(len(items))]
                elif op < 0.6:
                    items.append(items[rng.randrange(len(items))])
                elif kv.etype == gb.STRING:
                    items[rng.randrange(len(items))] = rng.choice(["", "zz qq", "a", "<0xZZ>", "x y z"])
                elif kv.etype in (gb.FLOAT32, gb.FLOAT64):
                    items[rng.randrange(len(items))] = rng.choice(HOSTILE_FLOATS)
                elif kv.etype == gb.BOOL:
                    items[rng.randrange(len(items))] = rng.random() < 0.5
                else:  # every integer element type holds these
                    items[rng.randrange(len(items))] = rng.choice([0, 1, 7, 9, 127])
                kv.value = items
            else:
                kv.vtype, kv.etype = gb.ARRAY, rng.choice([gb.INT32, gb.UINT8, gb.FLOAT32, gb.STRING])
                kv.value = ["a", "b"] if kv.etype == gb.STRING else [1, 2, 3]
        else:
            t = rng.choice(b.tensors)
            op = rng.random()
            if op < 0.3:
                t.ggml_type = rng.choice([0, 1, 2, 8, 12, 14, 30, 39, 40, 99])
            elif op < 0.6:
                i = rng.randrange(len(t.dims)) if t.dims else 0
                dims = list(t.dims)
                if dims:
                    dims[i] = rng.choice([0, 1, dims[i] // 2 or 1, dims[i] * 2, 1 << 40, 1 << 33])
                if rng.random() < 0.2:
                    dims = dims[::-1] if rng.random() < 0.5 else dims + [1]
                t.dims = dims
            elif op < 0.85:
                other = rng.choice(b.layout())
                t.offset = rng.choice([other, other + 1, other + 16, 0, 1 << 24])
            else:
                t.name = rng.choice([b.tensors[0].name, "", "blk.9.attn_q.weight", "x" * 70])
    return b.to_bytes()


def mutate(seed: int, i: int) -> tuple[str, str, bytes]:
    """(arch, kind, file bytes) of mutation `i` of `seed`."""
    rng = random.Random(f"{seed}:{i}")
    arch = rng.choice(ARCHS)
    data, head = _base_bytes(arch)
    r = rng.random()
    if r < 0.45:
        buf = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            pos = _position(rng, head, len(buf), 0.85)
            buf[pos] = rng.choice(BYTE_VALUES) if rng.random() < 0.3 else buf[pos] ^ (1 << rng.randrange(8))
        return arch, "flip", bytes(buf)
    if r < 0.6:
        return arch, "truncate", data[: _position(rng, head, len(data), 0.7)]
    return arch, "rewrite", _rewrite(rng, arch)


# -- the worker ----------------------------------------------------------------------------------


class FileTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise FileTimeout()


def _init_worker(memory_mb: int) -> None:
    import orcd_core.engine  # noqa: F401  (imports and plugins before the memory limit is measured)
    from orcd_core.plugins import default_registry

    default_registry()
    with open("/proc/self/statm") as f:
        vm_bytes = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = vm_bytes + (memory_mb << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    signal.signal(signal.SIGPROF, _on_alarm)


def load_path(path: Path, generate: bool) -> None:
    """What `serve` does with a model file, then a 2-token chat request."""
    from orcd_core.engine import Engine
    from orcd_core.generation import GenerationRequest
    from orcd_core.plugins import default_registry

    engine = Engine.load(path, backend="reference", registry=default_registry())
    try:
        if generate:
            gen = engine.run(engine.prepare(GenerationRequest(prompt="the one", max_tokens=2, chat=True)))
            for _ in gen:
                pass
    finally:
        engine.close()


def run_one(seed: int, i: int, tmpdir: str, timeout_s: float, generate: bool) -> tuple[int, str, str, str]:
    """(i, outcome, kind, detail) with outcome clean / accepted / defect."""
    from orcd_core.errors import ModelLoadError
    from orcd_core.generation import ContextLengthExceeded, InvalidRequest

    arch, kind, data = mutate(seed, i)
    path = Path(tmpdir) / f"m{os.getpid()}-{i}.gguf"
    path.write_bytes(data)
    # a CPU-time budget (ITIMER_PROF: the process's user + system time), so that a busy or niced
    # machine does not turn slow files into timeouts; the driver's wall-clock guard catches a worker
    # that waits without computing
    signal.setitimer(signal.ITIMER_PROF, timeout_s)
    try:
        load_path(path, generate)
        outcome, detail = "accepted", ""
    except (ContextLengthExceeded, InvalidRequest) as exc:  # loaded; the request is refused cleanly (a 4xx)
        outcome, detail = "accepted", type(exc).__name__
    except ModelLoadError as exc:
        message = str(exc)
        if str(path) in message and "\n" not in message:
            outcome, detail = "clean", type(exc).__name__
        else:
            outcome, detail = "defect", f"unclean {type(exc).__name__} message: {message[:500]}"
    except FileTimeout:
        outcome, detail = "defect", f"timeout after {timeout_s} s of CPU time"
    except BaseException as exc:  # noqa: BLE001  (every other exception is the finding)
        outcome, detail = "defect", "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-4000:]
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        path.unlink(missing_ok=True)
    return i, outcome, f"{arch}/{kind}", detail


# -- the driver ----------------------------------------------------------------------------------


def fuzz(count: int, seed: int, workers: int, out: Path | None, timeout_s: float, memory_mb: int,
         generate: bool, start: int = 0, progress=None) -> dict:
    counts = {"clean": 0, "accepted": 0, "defect": 0}
    by_kind: dict[str, dict[str, int]] = {}
    errors: dict[str, int] = {}
    defects: list[dict] = []
    tmpdir = tempfile.mkdtemp(prefix="fuzz-gguf-")
    wall_limit = timeout_s * 30 + 60  # generous: a niced run on a busy machine gets a small CPU share
    t0 = time.perf_counter()

    def record(i: int, outcome: str, kind: str, detail: str) -> None:
        counts[outcome] += 1
        by_kind.setdefault(kind, {"clean": 0, "accepted": 0, "defect": 0})[outcome] += 1
        if outcome == "clean":
            errors[detail] = errors.get(detail, 0) + 1
        if outcome == "defect":
            defects.append({"index": i, "kind": kind, "detail": detail.splitlines()[-1] if detail else ""})
            if out is not None:
                out.mkdir(parents=True, exist_ok=True)
                _, _, data = mutate(seed, i)
                (out / f"defect-s{seed}-{i}.gguf").write_bytes(data)
                (out / f"defect-s{seed}-{i}.txt").write_text(f"{kind}\n{detail}\n")

    def new_pool(n: int) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(n, initializer=_init_worker, initargs=(memory_mb,))

    pending = list(range(start, start + count))[::-1]
    pool = new_pool(workers)
    in_flight: dict[cf.Future, int] = {}
    done_n = 0
    try:
        while pending or in_flight:
            while pending and len(in_flight) < 2 * workers:
                i = pending.pop()
                in_flight[pool.submit(run_one, seed, i, tmpdir, timeout_s, generate)] = i
            finished, _ = cf.wait(in_flight, timeout=wall_limit, return_when=cf.FIRST_COMPLETED)
            if not finished:  # a worker stuck outside Python (the timer could not fire)
                for f, i in in_flight.items():
                    record(i, "defect", "?", f"no result within {wall_limit} s (stuck worker)")
                _kill(pool)
                in_flight.clear()
                pool = new_pool(workers)
                continue
            broken = []
            for f in finished:
                i = in_flight.pop(f)
                try:
                    record(*f.result())
                except cf.process.BrokenProcessPool:
                    broken.append(i)
                done_n += 1
            if broken:  # a worker died (segfault, killed): find the culprit(s) alone
                broken += list(in_flight.values())
                in_flight.clear()
                _kill(pool)
                for i in broken:
                    solo = new_pool(1)
                    try:
                        record(*solo.submit(run_one, seed, i, tmpdir, timeout_s, generate).result(wall_limit))
                    except Exception as exc:  # noqa: BLE001
                        record(i, "defect", "?", f"worker died: {type(exc).__name__}: {exc}")
                    finally:
                        _kill(solo)
                pool = new_pool(workers)
            if progress is not None and done_n % 500 < len(finished):
                progress(done_n, counts)
    finally:
        _kill(pool)
    return {"seed": seed, "start": start, "count": count, "generate": generate, **counts,
            "seconds": round(time.perf_counter() - t0, 1), "by_kind": by_kind, "clean_errors": errors,
            "defects": defects}


def _kill(pool: cf.ProcessPoolExecutor) -> None:
    for p in list(getattr(pool, "_processes", {}).values()):  # a stuck worker does not exit on shutdown
        p.kill()
    pool.shutdown(wait=True, cancel_futures=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=1000, help="mutations to run (default 1000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--start", type=int, default=0, help="first mutation index (to resume or split a run)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--timeout", type=float, default=10.0, help="CPU seconds per file (default 10)")
    ap.add_argument("--memory-mb", type=int, default=1024, help="address space per worker beyond its start-up size")
    ap.add_argument("--no-generate", action="store_true", help="stop after Engine.load (no 2-token generation)")
    ap.add_argument("--out", type=Path, help="directory for each defect's file and traceback")
    ap.add_argument("--json", action="store_true", help="print the full report as JSON")
    args = ap.parse_args(argv)

    def progress(n, counts):
        print(f"{n}/{args.count}: {counts}", file=sys.stderr, flush=True)

    report = fuzz(args.count, args.seed, args.workers, args.out, args.timeout, args.memory_mb,
                  not args.no_generate, args.start, progress)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{report['count']} mutations (seed {args.seed}) in {report['seconds']} s: clean {report['clean']}, "
              f"accepted {report['accepted']}, defect {report['defect']}")
        for d in report["defects"][:20]:
            print(f"  defect #{d['index']} ({d['kind']}): {d['detail']}")
    return 1 if report["defect"] else 0


if __name__ == "__main__":
    sys.exit(main())
