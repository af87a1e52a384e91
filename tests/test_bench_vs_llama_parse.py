"""scripts/bench_vs_llama.py reads llama-batched-bench's JSON lines (the format its source prints,
tools/batched-bench/batched-bench.cpp) among its log lines: S_TG per number of sequences."""

from __future__ import annotations

from repo_scripts import load_script


def _script():
    return load_script("bench_vs_llama")


def test_parse_batched_bench_takes_speed_tg_per_sequence_count():
    row = ('{{"n_kv_max": 4096, "n_batch": 2048, "n_ubatch": 512, "flash_attn": 1, "is_pp_shared": 0, '
           '"n_gpu_layers": 99, "n_threads": 8, "n_threads_batch": 8, "pp": 32, "tg": 128, "pl": {pl}, '
           '"n_kv": {kv}, "t_pp": 0.010000, "speed_pp": {spp}, "t_tg": {ttg}, "speed_tg": {stg}, "t": 0.3, "speed": 1.0}}')
    text = "\n".join([
        "main: n_kv_max = 4096, n_batch = 2048, n_ubatch = 512, flash_attn = 1, is_pp_shared = 0",
        row.format(pl=1, kv=160, spp=3200.0, ttg=0.148, stg=864.864865),
        "llama_perf_context_print: load time = 1.0 ms",
        row.format(pl=8, kv=1280, spp=25600.0, ttg=0.2436, stg=4203.612479),
    ])
    got = _script().parse_batched_bench(text)
    assert got == {1: 864.864865, 8: 4203.612479}


def test_parse_batched_bench_ignores_the_markdown_table():
    md = "|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |\n"
    assert _script().parse_batched_bench(md) == {}
