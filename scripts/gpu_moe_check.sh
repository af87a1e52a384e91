#!/usr/bin/env bash
# One call on the GPU machine for gpt-oss on CUDA (issue 6): MXFP4 + MoE op tests, the 2-layer
# full-width gpt-oss cut against the reference, then the full-size file (tests + bench). Logs under
# $OUT, a summary last. Stages stop at their own timeouts so the later ones still report.
#   source .device/setup.sh && scripts/gpu_moe_check.sh [ops] [cut] [full] [profile] [llama]
# Needs (carried, git-ignored): .device/ (wheelhouse) and .moecache/o200k/ (the cached o200k_harmony
# vocabulary GGUF + tokenizer.json, so the synthetic gpt-oss files need no vocabulary build there).
set -u -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
root=$(pwd)
export PYTHONUNBUFFERED=1 ORCD_CACHE_DIR=$root/.moecache ORCD_SYNTH_DIR=${ORCD_SYNTH_DIR:-/tmp/synth}
export PYTHONPATH=$root/core/src:$root/server/src:$(ls -d $root/plugins/*/src | paste -sd:):${PYTHONPATH:-}
mkdir -p "$ORCD_SYNTH_DIR"
summary=()
note() { summary+=("$1"); echo "== $1"; }
stages=" ${*:-ops cut full} "
t0=$(date +%s)
if [[ $stages == *" llama "* ]]; then  # llama-bench builds in the background while the GPU-only stages run
  ( mkdir -p /tmp/lcpp && tar xzf .vendor/llama.cpp.tgz -C /tmp/lcpp && cd /tmp/lcpp/llama.cpp &&
    cmake -B build -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
      -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF &&
    cmake --build build --target llama-bench -j 14 ) > "$OUT/llama-build.log" 2>&1 &
  lbuild=$!
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

if [[ $stages == *" ops "* ]]; then
  ORCD_CUDA_CHECK=1 timeout ${OPS_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider -rfE \
    core/tests/backends/test_cuda_moe.py plugins/quant_mxfp4/tests/test_mxfp4_cuda.py 2>&1 | tee "$OUT/ops.log" | tail -25
  note "moe+mxfp4 ops: $(tail -1 "$OUT/ops.log") ($(( $(date +%s) - t0 )) s)"
  ORCD_CUDA_CHECK=1 timeout 60 python3 -m pytest -q -p no:cacheprovider -rfE core/tests/backends/test_cuda_ops.py \
    -k MXFP4 2>&1 | tee "$OUT/ops-core.log" | tail -8
  note "core ops -k MXFP4: $(tail -1 "$OUT/ops-core.log") ($(( $(date +%s) - t0 )) s)"
fi
if [[ $stages == *" cut "* ]]; then
  timeout ${CUT_TIMEOUT:-300} python3 -m pytest -q -s -p no:cacheprovider -rfE plugins/gpt_adapter/tests/test_gpt_oss_cuda.py \
    -k "not full" 2>&1 | tee "$OUT/cut.log" | tail -25
  note "gpt-oss 2-layer cut: $(tail -1 "$OUT/cut.log") ($(( $(date +%s) - t0 )) s)"
  grep -h "relative L2" "$OUT/cut.log" | head -3 | while read -r l; do note "  $l"; done
fi
full=$ORCD_SYNTH_DIR/gpt-oss-full-all.gguf
if [[ $stages == *" full "* || $stages == *" profile "* || $stages == *" llama "* ]]; then
  timeout ${SYNTH_TIMEOUT:-150} python3 - "$full" <<'PY' 2>&1 | tee "$OUT/synth.log"
import sys, time
from pathlib import Path
from orcd_core.testing import synth
p = Path(sys.argv[1])
if not p.exists():
    t = time.time()
    synth.synthesize("gpt-oss", p, size="full", layers=None, seed=5)
    print(f"synth {p.name}: {p.stat().st_size / 2**20:.0f} MiB in {time.time() - t:.1f} s")
PY
  note "synth: $(tail -1 "$OUT/synth.log")"
fi
if [[ $stages == *" profile "* && -f $full ]]; then  # kernel times by CUDA events: CPU load does not skew them
  timeout ${PROFILE_TIMEOUT:-200} python3 scripts/profile_step.py "$full" -p 512 --ctx 640 2>&1 | tee "$OUT/profile.log" | grep -v "^  sweep" | head -60
  note "profile: $(grep -E "^(prefill T|decode step at|decode step graph)" "$OUT/profile.log" | paste -sd';')"
fi
if [[ -n ${lbuild:-} ]]; then wait $lbuild; fi  # benches run on a quiet machine
if [[ $stages == *" full "* ]]; then
  if [[ -f $full ]]; then
    timeout ${BENCH_TIMEOUT:-150} orcd-worker bench "$full" --backend cuda -p 512 -n 128 -r 3 --json \
      2>"$OUT/bench.err" | tee "$OUT/bench.jsonl"
    note "orcd bench gpt-oss full: $(tail -1 "$OUT/bench.jsonl" | python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); print("load %.2fs pp512 %s tg128 %s" % (d["load_s"], d["pp512"]["tok_s"], d["tg128"]["tok_s"]))' 2>/dev/null || (echo FAILED; tail -3 "$OUT/bench.err"))"
    ORCD_GPT_OSS_FULL=1 timeout ${FULL_TIMEOUT:-150} python3 -m pytest -q -s -p no:cacheprovider -rfE \
      plugins/gpt_adapter/tests/test_gpt_oss_cuda.py -k full 2>&1 | tee "$OUT/full.log" | tail -15
    note "gpt-oss full-size tests: $(tail -1 "$OUT/full.log") ($(( $(date +%s) - t0 )) s)"
    grep -h "vram_bytes_used" "$OUT/full.log" | head -1 | while read -r l; do note "  $l"; done
  fi
fi
if [[ $stages == *" llama "* ]]; then
  lb=/tmp/lcpp/llama.cpp/build/bin/llama-bench
  if [[ -x $lb && -f $full ]]; then
    timeout ${LLAMA_TIMEOUT:-200} $lb -m "$full" -ngl 99 -fa 1 -p 512 -n 128 -r 3 -o md 2>"$OUT/llama-bench.err" | tee "$OUT/llama-bench.md"
    note "llama-bench gpt-oss full: $(grep -E 'pp512|tg128' "$OUT/llama-bench.md" | awk -F'|' '{print $(NF-2) $(NF-1)}' | tr -s ' ' | paste -sd';')"
  else
    note "llama-bench build failed: $(tail -3 "$OUT/llama-build.log")"
  fi
fi
echo; echo "GPU: $(head -1 "$OUT/gpu.txt")"; printf '%s\n' "${summary[@]}"
