"""Per-kernel GPU time of one prefill step and one decode step on the CUDA backend.

    python3 scripts/profile_step.py MODEL [-p 512] [--ctx 640] [--batch 8] [--max-batch M]

Every launch (and cuBLAS GEMM) of one step is recorded, then each is captured 20 times into a CUDA
graph whose replay is timed between two CUDA events: its device time without launch gaps (weights that fit in L2 stay there, so
small GEMVs read as faster than cold); the table lists kernels by total time per step. Also prints the wall time of issuing a decode step from Python and of a
replayed graph step, and first the wall time of the prefill chunk as the engine runs it (a replayed
prefill graph, backends/cuda/prefill.py); the prefill's launches are then recorded with the graphs off.
Numbers go to docs/perf-notes.md by hand.
"""

from __future__ import annotations

import argparse
import collections
import time

import cupy
import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=640)
    ap.add_argument("--pyprof", action="store_true", help="cProfile of 10 eager decode steps")
    ap.add_argument("--sweep", action="store_true", help="time every decode GEMV (one row and the batched step's) cold at each split it can take")
    ap.add_argument("--batch", type=int, default=8, help="also profile a batched decode step of this many rows (8)")
    ap.add_argument("--max-batch", type=int, default=None,
                    help="the engine's capacity, as `serve --max-batch` (default: --batch)")
    args = ap.parse_args()

    from orcd_core.backends.cuda import kernels as K
    from orcd_core.backends.cuda import device as D
    from orcd_core.device import Step
    from orcd_core.engine import Engine
    from orcd_core.device import DecodeRow
    from orcd_core.generation import SamplingParams

    eng = Engine.load(args.model, backend="cuda", max_context=args.ctx, max_batch=args.max_batch or max(1, args.batch))
    print(f"decode GEMV: {eng.device.decode_gemv} (engine max batch {eng.max_batch})")
    dev, model = eng.device, eng.model
    names: dict[int, str] = {}
    orig_fn = K.KernelSet.fn

    owners: dict[int, object] = {}

    def fn(self, name, *a, **k):
        f = orig_fn(self, name, *a, **k)
        names[id(f)] = name
        owners[id(f)] = self
        return f

    K.KernelSet.fn = fn
    stats = collections.defaultdict(lambda: [0, 0.0])
    timing = {"on": False}
    orig_launch = K.launch

    recorded = []

    gemvs = {}

    def timed_launch(f, grid, block, args, shared_mem=0, pdl=False):
        orig_launch(f, grid, block, args, shared_mem, pdl)
        if timing["on"]:
            key = f"{names.get(id(f), '?')} grid={grid[0] if len(grid) == 1 else grid}"
            recorded.append((key, lambda: orig_launch(f, grid, block, args, shared_mem, pdl)))
            name = names.get(id(f), "")
            if name.startswith("gemv_q8_"):  # (W, rb, xq, y, bias, N, K, T, R, res)
                gemvs.setdefault((name, int(args[5]), int(args[6]), int(args[7])), (f, block, args, shared_mem))
            elif name.startswith("gemv_"):  # (W, rb, x, xst, y, bias, N, K, T, R, aux, ast, res, eps, mode)
                gemvs.setdefault((name, int(args[6]), int(args[7]), int(args[8])), (f, block, args, shared_mem))

    for mod in (K, D):
        mod.launch = timed_launch
    import orcd_core.backends.cuda.sampler as S
    import orcd_core.backends.cuda.graph as G
    import orcd_core.backends.cuda.moe as M

    S.launch = G.launch = M.launch = timed_launch
    gemm = D.cublas.gemmEx

    def timed_gemm(*a):
        gemm(*a)
        if timing["on"]:
            recorded.append((f"cublas gemmEx m={a[3]} n={a[4]} k={a[5]}", lambda: gemm(*a)))

    D.cublas.gemmEx = timed_gemm

    def replay_all():
        dev.stream.synchronize()
        for key, again in recorded:
            e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
            again()
            if key.startswith("cublas"):  # CuPy refuses cuBLAS calls during capture: back to back
                e0.record(dev.stream)
                for _ in range(20):
                    again()
                e1.record(dev.stream)
            else:
                dev.stream.begin_capture()
                for _ in range(20):
                    again()
                graph = dev.stream.end_capture()
                graph.launch(dev.stream)
                e0.record(dev.stream)
                graph.launch(dev.stream)
                e1.record(dev.stream)
            e1.synchronize()
            st = stats[key]
            st[0] += 1
            st[1] += cupy.cuda.get_elapsed_time(e0, e1) * 1e3 / 20
        recorded.clear()

    rng = np.random.default_rng(0)
    V = int(eng.config.n_vocab)

    def report(title):
        total = sum(v[1] for v in stats.values())
        print(f"\n{title}: {total:.1f} us in {sum(v[0] for v in stats.values())} launches (each replayed 20x)")
        for k, (n, us) in sorted(stats.items(), key=lambda kv: -kv[1][1])[:18]:
            print(f"  {us:9.1f} us {n:5d}x  {k}")
        stats.clear()

    cache = model.new_kv_cache(args.ctx)
    ids = rng.integers(0, V, args.p).tolist()
    graphs = dev.prefill_graphs
    for _ in range(3):  # the chunk as a replayed graph (backends/cuda/prefill.py): what a request gets
        eng.prefill(ids, cache)
    dev.stream.synchronize()
    t0 = time.perf_counter()
    eng.prefill(ids, cache)
    dev.stream.synchronize()
    print(f"prefill T={args.p} as a graph replay, wall: {(time.perf_counter() - t0) * 1e3:.2f} ms "
          f"({graphs.replays} replays, failed buckets: {sorted(graphs.failed)})")
    graphs.off = True  # op by op from here: every launch recorded and timed alone
    eng.prefill(ids, cache)  # warm-up
    dev.stream.synchronize()
    timing["on"] = True
    eng.prefill(ids, cache)
    dev.stream.synchronize()
    timing["on"] = False
    replay_all()
    report(f"prefill T={args.p}")
    t0 = time.perf_counter()
    eng.prefill(ids, cache)
    dev.stream.synchronize()
    print(f"prefill wall op by op (not isolated): {(time.perf_counter() - t0) * 1e3:.2f} ms")
    import cProfile
    import pstats

    if args.pyprof:  # where a prefill's host time goes (it is Python bound when wall >> device time)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(3):
            eng.prefill(ids, cache)
        prof.disable()
        dev.stream.synchronize()
        print(f"prefill T={args.p} under cProfile, 3 runs:")
        pstats.Stats(prof).sort_stats("tottime").print_stats(22)

    step = Step(1, dev.to_device([1]), dev.to_device([args.p]), dev.to_device([args.p]))
    greedy = SamplingParams(temperature=0.0, repetition_window=0)
    step_index = dev.to_device([0])
    dev.begin_step()
    out = dev.logits_last(model.forward(step, cache))
    dev.stream.synchronize()
    timing["on"] = True
    dev.begin_step()
    out = dev.logits_last(model.forward(step, cache))
    dev.sample(out, greedy, None, step_index)
    timing["on"] = False
    replay_all()
    report(f"decode step at position {args.p}")
    dev.stream.synchronize()
    prof = cProfile.Profile()
    if args.pyprof:  # (cProfile multiplies the host time: the issue figure below is without it)
        prof.enable()
    t0 = time.perf_counter()
    for _ in range(10):
        dev.begin_step()
        dev.sample(dev.logits_last(model.forward(step, cache)), greedy, None, step_index)
    t1 = time.perf_counter()
    prof.disable()
    if args.pyprof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(14)
    dev.stream.synchronize()
    t2 = time.perf_counter()
    print(f"decode step eager: issue {(t1 - t0) * 1e5:.0f} us/step, issue+run {(t2 - t0) * 1e5:.0f} us/step")
    for B in sorted({1, args.batch}):  # the batched decode step of B rows (one per sequence): its kernels, its replay
        caches = [cache] + [model.new_kv_cache(args.ctx) for _ in range(B - 1)]
        for c in caches[1:]:
            eng.prefill(ids, c)
        dec = dev.batch_decoder(eng.decode_forward, max_rows=B)
        rows = [DecodeRow(cache=c, id=1 + b, position=args.p, step_index=1, params=greedy, recent=[]) for b, c in enumerate(caches)]
        for row in rows:
            dec.join(row)
        dev.stream.synchronize()
        timing["on"] = True
        dec.step()  # the first step of B rows runs op by op: recorded
        timing["on"] = False
        replay_all()
        report(f"batched decode step, {B} rows at position {args.p}")
        for _ in range(3):
            dec.step()
        t0 = time.perf_counter()
        for _ in range(50):
            dec.step()
        print(f"batched decode step of {B} rows, graph replay: {(time.perf_counter() - t0) * 1e6 / 50:.0f} us/step "
              f"(graph nodes: {getattr(next((g for k, g in dec.graphs.items() if k[0] == B), None), 'num_nodes', '?')})")
        for row in rows:
            dec.leave(row)
        dec.step()
        dec.close()
        for c in caches[1:]:
            dev.free_kv_cache(c)
    if not args.sweep:
        return
    # every distinct decode GEMV of the step at each split it can take, timed cold: a graph of 20 x (write
    # 256 MB, launch) minus one of 20 x (write 256 MB), so the weights come from DRAM as in a whole step
    # (replayed alone, a weight that fits in L2 stays there). FMA kernels: R rows per warp 1, 2, 4;
    # int8 kernels: R 1, 2, 4, 8 (the batched ones: groups of Q8_T8_ROWS rows); tensor-core kernels: K split KS 1, 2, 4, 8 (the launcher's pick marked *).
    from orcd_core.kernels.constants import Q8_T8_ROWS

    flush = cupy.empty((256 << 20) // 4, dtype=np.float32)

    def graph_us(body) -> float:
        dev.stream.begin_capture()
        for _ in range(20):
            body()
        graph = dev.stream.end_capture()
        graph.launch(dev.stream)
        e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
        e0.record(dev.stream)
        graph.launch(dev.stream)
        e1.record(dev.stream)
        e1.synchronize()
        return cupy.cuda.get_elapsed_time(e0, e1) * 1e3 / 20

    flush_us = graph_us(lambda: flush.fill(0))
    print(f"\ndecode GEMVs cold (L2 flushed before each launch, {flush_us:.1f} us of flush subtracted): us (GB/s of weights)")
    for (name, N, Kd, _), (f, block, args, smem) in sorted(gemvs.items()):
        nbytes = N * int(args[1])
        tc, q8 = name.startswith("gemv_tc_"), name.startswith("gemv_q8_")
        cells = []
        for R in ((1, 2, 4, 8) if tc or q8 else (1, 2, 4)):
            if q8:
                a2, r_at = args[:8] + (np.int32(R),) + args[9:], 8
            else:
                a2, r_at = args[:9] + (np.int32(R),) + args[10:], 9
            per = 16 * (block[0] // 32 // R) if tc else block[0] // 32 * R * (Q8_T8_ROWS if "_t8_" in name and q8 else 1)
            grid = ((N + per - 1) // per,)
            us = graph_us(lambda: (flush.fill(0), orig_launch(f, grid, block, a2, smem))) - flush_us
            mark = "*" if R == int(args[r_at]) else " "
            cells.append(f"{'KS' if tc else 'R'}={R}{mark} {us:6.1f} ({nbytes / us / 1e3:5.0f})")
        what = f"T={int(args[7])}" if q8 else f"T={int(args[8])} mode={int(args[14])}"
        print(f"  {name} N={N} K={Kd} {what}: " + "  ".join(cells))
    dev.free_kv_cache(cache)
    eng.close()


if __name__ == "__main__":
    main()
