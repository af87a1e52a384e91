"""The short soak of CI (issue 16): scripts/soak.py with 60 requests, 10 of them cut short (5 by
POST /cancel, 5 by the client hanging up), on the reference backend with a tiny synthetic model:
RssAnon grows by less than 50 MiB, threads and open descriptors not at all, every request ends as
it should. The on-demand run is `scripts/soak.py --requests 10000 --cancels 1000` (docs/reliability.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_short_soak():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "soak.py"), "--requests", "60", "--cancels", "10",
                           "--warmup", "20", "--json", "--max-seconds", "120"], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"] and result["counts"]["completed"] == 50
    assert result["counts"]["cancelled"] + result["counts"]["disconnected"] == 10
    assert result["rss_anon_growth_mib"] < 50 and result["thread_growth"] <= 0 and result["fd_growth"] <= 0


@pytest.mark.gpu
def test_short_soak_on_cuda():
    """The same soak on the CUDA backend (a synthetic Qwen2.5-0.5B-shaped file when ORCD_SOAK_MODEL is
    not set): 400 requests, 100 cut short; VRAM back to its baseline within 1 MiB, by our counters and
    by the driver's per-process figure (nvidia-smi), besides the RSS, thread and descriptor checks."""
    from orcd_core.testing.cuda import require_cuda_gpu

    require_cuda_gpu()
    model = os.environ.get("ORCD_SOAK_MODEL")
    if not model:
        from orcd_core.testing import synth

        model = str(Path(os.environ.get("ORCD_SYNTH_DIR", "/tmp")) / "soak-qwen2-full.gguf")
        if not Path(model).exists():
            synth.synthesize("qwen2", Path(model), size="full", seed=5)
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "soak.py"), "--backend", "cuda", "--model", model,
                           "--requests", "400", "--cancels", "100", "--max-tokens", "8", "--json", "--max-seconds", "200"],
                          capture_output=True, text=True, timeout=400, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"] and result["counts"]["completed"] == 300, result
    assert abs(result["vram_growth_bytes"]) <= 1 << 20, result
    assert result["rss_anon_growth_mib"] < 50 and result["thread_growth"] <= 0 and result["fd_growth"] <= 0, result
