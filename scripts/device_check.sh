#!/usr/bin/env bash
# One call on the GPU machine: checks and timings of the CUDA backend, logs under $OUT, a table last.
#   source .device/setup.sh && scripts/device_check.sh [ops] [gemv] [model] [gpu-all] [bench] [ab] [sweep] [llama]
# ops: test_cuda_ops; gemv: the decode GEMVs' and batching's GPU tests (ops -k gemv/linear/fused, batching,
# prefill, the plugins'); ab: `bench` of each full-size model with ORCD_DECODE_GEMV=tc and =ffma (one row
# pp512/tg128, and 8 rows tg128; AB_KINDS="tc" runs one); sweep: profile_step.py --sweep on qwen2 (each
# decode GEMV cold); llama-build: scripts/bench_vs_llama.py's llama.cpp build into /tmp/bench in the
# background, waited for at the end (a next call on the still-warm machine runs bench_vs_llama.py
# --work /tmp/bench without building).
# Needs (carried, git-ignored): .device/ (wheelhouse), .models/cache/ (vocab GGUFs for the synthetic
# models), and for `llama` .vendor/llama.cpp.tgz (a trimmed llama.cpp source tree: scripts/vendor_llama.py).
set -u -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
root=$(pwd)
export PYTHONUNBUFFERED=1 ORCD_CACHE_DIR=$root/.models/cache ORCD_SYNTH_DIR=${ORCD_SYNTH_DIR:-/tmp/synth}
# the working tree's sources first (entry points come from the installed wheels)
export PYTHONPATH=$root/core/src:$root/server/src:$(ls -d $root/plugins/*/src | paste -sd:):${PYTHONPATH:-}
mkdir -p "$ORCD_SYNTH_DIR"
summary=()
note() { summary+=("$1"); echo "== $1"; }
stages=" $* "
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
gpu=$(head -1 "$OUT/gpu.txt")

if [[ $stages == *" llama "* ]]; then  # build llama-bench in the background while the rest runs
  ( mkdir -p /tmp/lcpp && tar xzf .vendor/llama.cpp.tgz -C /tmp/lcpp && cd /tmp/lcpp/llama.cpp &&
    cmake -B build -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
      -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF &&
    cmake --build build --target llama-bench -j 12 ) > "$OUT/llama-build.log" 2>&1 &
  lbuild=$!
fi

if [[ $stages == *" llama-build "* ]]; then
  python3 -c "import sys; sys.path.insert(0, 'scripts'); import bench_vs_llama as b; from pathlib import Path
p, exe = b.start_llama_build('.vendor/llama.cpp.tgz', Path('/tmp/bench')); sys.exit(p.wait() if p else 0)" \
    > "$OUT/llama-build.log" 2>&1 &
  lbuild2=$!
fi

synth() {  # arch size layers -> path
  python3 - "$@" <<'PY'
import os, sys, time
from pathlib import Path
from orcd_core import testmodels
from orcd_core.testing import synth
arch, size, layers = sys.argv[1], sys.argv[2], sys.argv[3]
d = Path(os.environ["ORCD_SYNTH_DIR"]); p = d / f"{arch}-{size}-{layers}.gguf"
if not p.exists():
    t = time.time()
    vocab = testmodels.llama_cpp_models_dir() / "ggml-vocab-llama-spm.gguf" if arch == "llama" else None
    synth.synthesize(arch, p, size=size, layers=None if layers == "all" else int(layers), seed=5, vocab=vocab)
    print(f"synth {p.name}: {p.stat().st_size / 2**20:.0f} MiB in {time.time() - t:.1f} s", file=sys.stderr)
print(p)
PY
}

if [[ $stages == *" ops "* ]]; then
  ORCD_CUDA_CHECK=1 python3 -m pytest -q -p no:cacheprovider core/tests/backends/test_cuda_ops.py 2>&1 | tee "$OUT/ops.log" | tail -30
  note "ops: $(tail -1 "$OUT/ops.log")"
fi
if [[ $stages == *" gemv "* ]]; then
  timeout ${GEMV_TESTS_TIMEOUT:-300} python3 -m pytest -m gpu -q -p no:cacheprovider --timeout 120 \
    core/tests/backends/test_cuda_ops.py -k "gemv or linear or fused" core/tests/backends/test_cuda_batching.py \
    core/tests/backends/test_cuda_prefill.py plugins/quant_mxfp4/tests plugins/quant_q4k/tests plugins/quant_legacy/tests \
    2>&1 | tee "$OUT/gemv.log" | tail -40
  note "gemv tests: $(tail -1 "$OUT/gemv.log")"
fi
if [[ $stages == *" model "* ]]; then
  python3 -m pytest -q -p no:cacheprovider plugins/llama_adapter/tests/test_llama_family_cuda.py 2>&1 | tee "$OUT/model.log" | tail -30
  note "model: $(tail -1 "$OUT/model.log")"
fi
if [[ $stages == *" gpu-all "* ]]; then
  # the server's e2e suite defaults to the real SmolLM2 (a download; no network here): a synthetic
  # llama-architecture file of the same shape stands in for it
  export ORCD_SERVE_E2E_MODEL=${ORCD_SERVE_E2E_MODEL:-$(synth llama full all)}
  timeout ${GPU_TESTS_TIMEOUT:-300} python3 -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu-all.log" | tail -30
  note "pytest -m gpu: $(tail -1 "$OUT/gpu-all.log")"
fi
if [[ $stages == *" bench "* || $stages == *" llama "* || $stages == *" ab "* || $stages == *" sweep "* ]]; then
  qwen=$(synth qwen2 full all); phi=$(synth phi3 full all)
fi
if [[ $stages == *" sweep "* ]]; then
  timeout 240 python3 scripts/profile_step.py "$qwen" --sweep 2>&1 | tee "$OUT/sweep.log" | tail -45
fi
if [[ $stages == *" ab "* ]]; then
  oss=$(synth gpt-oss full all)
  for m in "$qwen" "$phi" "$oss"; do
    for kind in ${AB_KINDS:-tc ffma}; do
      for b in 1 8; do
        args=(-p 512 -n 128); [[ $b == 8 ]] && args=(-p 0 -n 128 -b 8)
        r=$(ORCD_DECODE_GEMV=$kind timeout 180 orcd-worker bench "$m" --backend cuda "${args[@]}" -r 3 --json 2>>"$OUT/ab.err" | tail -1)
        echo "{\"model\": \"$(basename "$m")\", \"kind\": \"$kind\", \"b\": $b, \"res\": ${r:-null}}" >> "$OUT/ab.jsonl"
        note "ab $(basename "$m") $kind x$b: $(echo "$r" | python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); print(" ".join(k + " " + str(v["tok_s"]) for k, v in d.items() if isinstance(v, dict) and "tok_s" in v))' 2>/dev/null || echo FAILED)"
      done
    done
  done
fi
if [[ $stages == *" bench "* ]]; then
  for m in "$qwen" "$phi"; do
    orcd-worker bench "$m" --backend cuda -p 512 -n 128 -r 3 --json 2>>"$OUT/bench.err" | tee -a "$OUT/bench.jsonl"
    note "orcd bench $(basename "$m"): $(tail -1 "$OUT/bench.jsonl" | python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); print("load %.2fs pp512 %s tg128 %s" % (d["load_s"], d["pp512"]["tok_s"], d["tg128"]["tok_s"]))' 2>/dev/null || echo FAILED)"
  done
fi
if [[ $stages == *" llama "* ]]; then
  wait $lbuild; lb=/tmp/lcpp/llama.cpp/build/bin/llama-bench
  if [[ -x $lb ]]; then
    for m in "$qwen" "$phi"; do
      $lb -m "$m" -ngl 99 -fa 1 -p 512 -n 128 -r 3 -o md 2>>"$OUT/llama-bench.err" | tee -a "$OUT/llama-bench.md"
      note "llama-bench $(basename "$m"): $(grep -E 'pp512|tg128' "$OUT/llama-bench.md" | tail -2 | awk -F'|' '{print $(NF-2) $(NF-1)}' | tr -s ' ' | paste -sd';')"
    done
  else
    note "llama-bench build failed: $(tail -3 "$OUT/llama-build.log")"
  fi
fi
if [[ $stages == *" llama-build "* ]]; then
  wait $lbuild2 && note "llama.cpp built: $(ls /tmp/bench/llama.cpp/build/bin/)" || note "llama.cpp build failed: $(tail -3 /tmp/bench/llama-build.log)"
fi
echo; echo "GPU: $gpu"; printf '%s\n' "${summary[@]}"
