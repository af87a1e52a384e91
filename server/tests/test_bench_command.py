"""`orcd-worker bench` on the reference backend (CI has no GPU): the JSON it prints has llama-bench's
shape (load time, pp N and tg N with the median of the timed runs and their spread), every run is
timed, and the rates are the token counts over the measured times. The CUDA numbers come from the
same command on the GPU machine (docs/perf-notes.md)."""

from __future__ import annotations

import json
import statistics

import pytest

from orcd_core import testmodels
from orcd_core.testing import synth
from orcd_server.cli import main


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "llama-tiny.gguf"
    vocab = testmodels.llama_cpp_models_dir() / "ggml-vocab-llama-spm.gguf"
    synth.synthesize("llama", path, size="tiny", layers=1, seed=3, vocab=vocab)
    return path


def test_bench_json_on_the_reference_backend(tiny_model, capsys):
    rc = main(["bench", str(tiny_model), "--backend", "reference", "-p", "8", "-n", "4", "-r", "2", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["backend"] == "reference" and out["architecture"] == "llama" and out["repetitions"] == 2
    assert out["load_s"] > 0
    for key, n in (("pp8", 8), ("tg4", 4)):
        r = out[key]
        assert len(r["runs_s"]) == 2 and all(t > 0 for t in r["runs_s"])
        rates = sorted(n / t for t in r["runs_s"])
        # runs_s are the measured times as they are (JSON keeps a float exactly); the rates are
        # rounded to 2 decimals, so they match to half a unit of that place and no better
        assert abs(r["tok_s"] - statistics.median(rates)) <= 0.005 + 1e-9
        assert abs(r["min"] - rates[0]) <= 0.005 + 1e-9 and abs(r["max"] - rates[-1]) <= 0.005 + 1e-9
        assert r["min"] <= r["tok_s"] <= r["max"]


def test_bench_table_and_skipping_a_test(tiny_model, capsys):
    rc = main(["bench", str(tiny_model), "--backend", "reference", "-p", "0", "-n", "2", "-r", "1"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "tg2" in text and "load" in text and "pp" not in text.split("tok/s")[-1]


def test_bench_missing_file_is_one_line_error(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "nope.gguf"), "--backend", "reference"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.gguf" in err[0]


def test_bench_max_batch_is_the_engines_capacity(tiny_model, capsys):
    """--max-batch sizes the engine as `serve --max-batch` does (its caches and decode graphs),
    B by default; one below B is refused with one line."""
    assert main(["bench", str(tiny_model), "--backend", "reference", "-p", "0", "-n", "2", "-r", "1", "-b", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["batch"] == 2 and out["max_batch"] == 2 and out["decode_gemv"] is None  # (no GPU kernels here)
    assert main(["bench", str(tiny_model), "--backend", "reference", "-p", "0", "-n", "2", "-r", "1",
                 "--max-batch", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["batch"] == 1 and out["max_batch"] == 4 and out["tg2"]["tok_s"] > 0
    with pytest.raises(SystemExit, match="--max-batch must be in 2"):
        main(["bench", str(tiny_model), "--backend", "reference", "-b", "2", "--max-batch", "1"])



def test_bench_max_context_sizes_the_kv_caches_as_a_served_workers(tiny_model, capsys, monkeypatch):
    """--max-context N: the engine's context and every cache the tests make hold N positions (a served
    worker's caches span its whole context); below what the tests need it is refused with one line."""
    from orcd_core.engine import Engine

    sizes = []
    load = Engine.load

    def spy_load(*a, **k):
        eng = load(*a, **k)
        make = eng.model.new_kv_cache
        eng.model.new_kv_cache = lambda n_ctx, *x, **y: (sizes.append(n_ctx), make(n_ctx, *x, **y))[1]
        return eng

    monkeypatch.setattr(Engine, "load", staticmethod(spy_load))
    assert main(["bench", str(tiny_model), "--backend", "reference", "-p", "4", "-n", "2", "-r", "1", "-b", "2",
                 "--max-context", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["max_context"] == 64 and out["pp4"]["tok_s"] > 0 and out["tg2"]["tok_s"] > 0
    assert sizes and set(sizes) == {64}  # pp's caches and each of tg's two sequences' (warm-up and timed runs)
    sizes.clear()
    assert main(["bench", str(tiny_model), "--backend", "reference", "-p", "4", "-n", "2", "-r", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["max_context"] is None and set(sizes) == {4, 3}
    with pytest.raises(SystemExit, match="--max-context 3 is below the 4 positions"):
        main(["bench", str(tiny_model), "--backend", "reference", "-p", "4", "-n", "2", "--max-context", "3"])
