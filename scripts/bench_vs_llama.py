#!/usr/bin/env python3
"""orcd-worker against llama.cpp on the same GPU, the same files, in one run: one table with ratios.

On a GPU machine, from the project root (the project installed, e.g. `source .device/setup.sh`):

    python3 scripts/bench_vs_llama.py [--llama-src .vendor/llama.cpp.tgz | DIR] [--models qwen2,phi3,gpt-oss]
                                      [--work /tmp/bench] [--json OUT.json]

1. builds llama-bench from the vendored llama.cpp (CUDA, sm_90) unless `--llama-bench PATH` names one
   or `WORK/llama.cpp/build/bin/llama-bench` exists (the build runs while the models are written);
   llama-server too where the tree has it (`scripts/vendor_llama.py` writes the vendored tarball;
   `scripts/bench_serve.py --llama-server` compares the served paths);
2. writes the synthetic full-size models (`orcd-worker synth ARCH --size full --seed 7`) unless present;
3. runs, per model, `orcd-worker bench --backend cuda -r R` and `llama-bench -ngl 99 -fa 1 -r R` for
   pp512, pp2048, tg128, and tg128 at depth 4096 (llama-bench `-d 4096`); and B sequences decoding
   together (`--batch B`, default 8; 0 skips it): `orcd-worker bench -p 0 -n 128 -b B` against
   `llama-batched-bench -npp 32 -ntg 128 -npl B` (its S_TG: tokens of all sequences over the TG time);
4. prints one table: tok/s of both and the ratio, with the GPU, driver and both builds' settings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

TESTS = [("pp512", dict(p=512, n=0, d=0)), ("pp2048", dict(p=2048, n=0, d=0)),
         ("tg128", dict(p=0, n=128, d=0)), ("tg128@d4096", dict(p=0, n=128, d=4096))]
LLAMA_CMAKE = ["-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=90", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
               "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_APP=OFF", "-DCMAKE_BUILD_TYPE=Release"]
# llama-server without its web UI (no assets offline, none needed by a benchmark)
LLAMA_SERVER_CMAKE = ["-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF"]


def sh(cmd, **kw) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def start_llama_build(src: str, work: Path) -> tuple[subprocess.Popen | None, Path]:
    tree = work / "llama.cpp"
    exe = tree / "build" / "bin" / "llama-bench"
    if exe.exists():
        return None, exe
    if not tree.exists():
        if Path(src).is_dir():
            tree = Path(src)
            exe = tree / "build" / "bin" / "llama-bench"
        else:
            with tarfile.open(src) as tf:
                tf.extractall(work)
    log = open(work / "llama-build.log", "w")
    jobs = str(max(1, (os.cpu_count() or 4) - 2))
    server = (tree / "tools" / "server" / "CMakeLists.txt").exists()
    flags = LLAMA_CMAKE + (LLAMA_SERVER_CMAKE if server else ["-DLLAMA_BUILD_SERVER=OFF"])
    cmd = (f"cmake -B build -G Ninja {' '.join(flags)} && "
           f"cmake --build build --target llama-bench llama-batched-bench{' llama-server' if server else ''} -j {jobs}")
    return subprocess.Popen(cmd, shell=True, cwd=tree, stdout=log, stderr=subprocess.STDOUT), exe


def synth(arch: str, work: Path) -> Path:
    path = work / f"{arch}-full-seed7.gguf"
    if not path.exists():
        t = time.time()
        sh(["orcd-worker", "synth", arch, str(path), "--size", "full", "--seed", "7"])
        print(f"synth {arch}: {path.stat().st_size / 2**30:.2f} GiB in {time.time() - t:.0f} s", file=sys.stderr)
    return path


def ours(model: Path, reps: int, batch: int = 0) -> dict[str, float]:
    out = {}
    if batch:
        cmd = ["orcd-worker", "bench", str(model), "--backend", "cuda", "-p", "0", "-n", "128", "-b", str(batch),
               "-r", str(reps), "--json"]
        out[f"tg128x{batch}"] = json.loads(sh(cmd).strip().splitlines()[-1])["tg128"]["tok_s"]
    for name, t in TESTS:
        cmd = ["orcd-worker", "bench", str(model), "--backend", "cuda", "-p", str(t["p"]), "-n", str(t["n"]),
               "-d", str(t["d"]), "-r", str(reps), "--json"]
        res = json.loads(sh(cmd).strip().splitlines()[-1])
        key = f"pp{t['p']}" if t["p"] else f"tg{t['n']}"
        out[name] = res[key]["tok_s"]
        out["gpu"] = res.get("gpu")
    return out


def parse_batched_bench(text: str) -> dict[int, float]:
    """{sequences: S_TG tok/s} from `llama-batched-bench --output-format jsonl` output (one JSON object
    per line among its log lines)."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and '"speed_tg"' in line:
            row = json.loads(line)
            out[int(row["pl"])] = float(row["speed_tg"])
    return out


def llama_batched(exe: Path, model: Path, batch: int) -> dict[str, float]:
    tool = exe.parent / "llama-batched-bench"
    if not tool.exists():  # a build of llama-bench alone (an older WORK): the column stays empty
        print(f"{tool} is missing: no llama.cpp figure for {batch} sequences", file=sys.stderr)
        return {}
    cmd = [str(tool), "-m", str(model), "-ngl", "99", "-fa", "on", "-c", "4096",
           "-npp", "32", "-ntg", "128", "-npl", str(batch), "--output-format", "jsonl"]
    r = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return {f"tg128x{batch}": parse_batched_bench(r.stdout + "\n" + r.stderr)[batch]}


def llama(exe: Path, model: Path, reps: int, batch: int = 0) -> dict[str, float]:
    out = llama_batched(exe, model, batch) if batch else {}
    runs = [["-p", "512,2048", "-n", "128", "-d", "0"], ["-p", "0", "-n", "128", "-d", "4096"]]
    for extra in runs:
        cmd = [str(exe), "-m", str(model), "-ngl", "99", "-fa", "1", "-r", str(reps), "-o", "json", *extra]
        for row in json.loads(sh(cmd)):
            p, n, d = int(row["n_prompt"]), int(row["n_gen"]), int(row.get("n_depth", 0))
            name = f"pp{p}" if p else (f"tg{n}" if d == 0 else f"tg{n}@d{d}")
            out[name] = float(row["avg_ts"])
            out["build"] = f"{row.get('build_commit', '?')} ({row.get('backends', '')})"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-src", default=".vendor/llama.cpp.tgz", help="llama.cpp source: a .tgz or a folder")
    ap.add_argument("--llama-bench", default=None, help="an already built llama-bench (skips the build)")
    ap.add_argument("--models", default="qwen2,phi3,gpt-oss")
    ap.add_argument("--work", default="/tmp/bench", help="where models and the build go")
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="sequences decoding together (0: skip that column)")
    ap.add_argument("--json", default=None, help="also write every figure here")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    build, exe = (None, Path(args.llama_bench)) if args.llama_bench else start_llama_build(args.llama_src, work)
    models = {a: synth(a, work) for a in args.models.split(",")}
    if build is not None and build.wait() != 0:
        print(f"llama-bench build failed: see {work / 'llama-build.log'}", file=sys.stderr)
        return 1
    gpu = sh(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]).strip()
    results = {}
    for arch, path in models.items():
        results[arch] = {"orcd": ours(path, args.repetitions, args.batch),
                         "llama": llama(exe, path, args.repetitions, args.batch)}
        print(f"{arch}: done {json.dumps(results[arch])}", file=sys.stderr)  # (kept if a later model fails)
    print(f"\nGPU: {gpu}; orcd-worker bench --backend cuda -r {args.repetitions} (median; one sequence: an "
          f"engine of max batch 1; B sequences: max batch B; both on the int8-activation GEMVs); "
          f"llama-bench -ngl 99 -fa 1 -r {args.repetitions} (mean), build "
          f"{next(iter(results.values()))['llama'].get('build', '?')}, {' '.join(LLAMA_CMAKE[:2])}"
          + (f"; tg128x{args.batch}: {args.batch} sequences together (orcd bench -b {args.batch}; "
             f"llama-batched-bench -npp 32 -ntg 128 -npl {args.batch}, S_TG)" if args.batch else ""))
    names = [name for name, _ in TESTS] + ([f"tg128x{args.batch}"] if args.batch else [])
    print(f"{'model':<9}" + "".join(f"{name:>28}" for name in names))
    print(f"{'':<9}" + "".join(f"{'orcd / llama.cpp (ratio)':>28}" for _ in names))
    for arch, r in results.items():
        cells = []
        for name in names:
            a, b = r["orcd"].get(name), r["llama"].get(name)
            cells.append(f"{a:,.0f} / {b:,.0f} ({a / b:.2f}x)" if a and b else "-")
        print(f"{arch:<9}" + "".join(f"{c:>28}" for c in cells))
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": gpu, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
