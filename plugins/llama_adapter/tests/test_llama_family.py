"""qwen2 / llama / phi3 on the reference device against an independent float64 transcription of
llama.cpp's graphs (src/models/{qwen2,llama,phi3}.cpp), on small random GGUF files written here with
gguf-py; plus strict loading, fusion and the rope-factor choice. Parity with llama.cpp itself is in
test_parity_llama_cpp.py."""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import pytest

from orcd_core.backends.reference import ReferenceDevice
from orcd_core.device import Step
from orcd_core.errors import GGUFMetadataError, GGUFTensorError
from orcd_core.gguf_file import check_supported, open_gguf
from orcd_core.plugins import load_plugins

D, F, H, HKV, HD, V, NL = 64, 96, 4, 2, 16, 80, 2


@pytest.fixture(scope="module")
def registry():
    return load_plugins(allow=["core", "llama-adapter"])


def make_tensors(arch: str, rng, *, n_rot: int = HD, mixed_types: bool = False, rope: str | None = None):
    """Random weights of one file, NumPy shapes (rows, cols); float32 unless `mixed_types`."""
    s = 1 / math.sqrt(D)
    t: dict[str, np.ndarray] = {
        "token_embd.weight": rng.standard_normal((V, D)),
        "output_norm.weight": 1 + 0.1 * rng.standard_normal(D),
    }
    if arch != "qwen2":
        t["output.weight"] = rng.standard_normal((V, D)) * s
    for i in range(NL):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = 1 + 0.1 * rng.standard_normal(D)
        t[p + "ffn_norm.weight"] = 1 + 0.1 * rng.standard_normal(D)
        t[p + "attn_output.weight"] = rng.standard_normal((D, H * HD)) * s
        t[p + "ffn_down.weight"] = rng.standard_normal((D, F)) / math.sqrt(F)
        if arch == "phi3":
            t[p + "attn_qkv.weight"] = rng.standard_normal((H * HD + 2 * HKV * HD, D)) * s
            t[p + "ffn_up.weight"] = rng.standard_normal((2 * F, D)) * s
        else:
            t[p + "attn_q.weight"] = rng.standard_normal((H * HD, D)) * s
            t[p + "attn_k.weight"] = rng.standard_normal((HKV * HD, D)) * s
            t[p + "attn_v.weight"] = rng.standard_normal((HKV * HD, D)) * s
            t[p + "ffn_gate.weight"] = rng.standard_normal((F, D)) * s
            t[p + "ffn_up.weight"] = rng.standard_normal((F, D)) * s
        if arch == "qwen2":
            for n, r in (("q", H * HD), ("k", HKV * HD), ("v", HKV * HD)):
                t[p + f"attn_{n}.bias"] = 0.1 * rng.standard_normal(r)
    if rope == "freqs":
        t["rope_freqs.weight"] = rng.uniform(1, 8, n_rot // 2)
    if rope == "longrope":
        t["rope_factors_long.weight"] = rng.uniform(1, 8, n_rot // 2)
        t["rope_factors_short.weight"] = rng.uniform(1, 1.5, n_rot // 2)
    out = {k: v.astype(np.float32) for k, v in t.items()}
    if mixed_types:  # q in F16 (k, v F32): not fusable; gate and up both F16: fusable
        for i in range(NL):
            for n in ("attn_q", "ffn_gate", "ffn_up"):
                out[f"blk.{i}.{n}.weight"] = out[f"blk.{i}.{n}.weight"].astype(np.float16)
    return out


def write_gguf(path: Path, arch: str, tensors: dict, *, n_rot: int = HD, extra_kv: dict | None = None,
               drop_kv: tuple[str, ...] = ()) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    kv = {
        "block_count": NL, "embedding_length": D, "feed_forward_length": F, "attention.head_count": H,
        "attention.head_count_kv": HKV, "attention.layer_norm_rms_epsilon": 1e-5, "context_length": 512,
        "rope.freq_base": 10000.0 if arch != "qwen2" else 1e6, "rope.dimension_count": n_rot,
    }
    kv.update(extra_kv or {})
    for k, v in kv.items():
        if k in drop_kv:
            continue
        key = f"{arch}.{k}"
        if isinstance(v, str):
            w.add_string(key, v)
        elif isinstance(v, float):
            w.add_float32(key, v)
        else:
            w.add_uint32(key, v)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# -- the oracle: llama.cpp's graph, float64, K/V rounded to fp16 like its cache ------------------------


def oracle_logits(arch: str, t: dict, ids: list[int], *, n_rot: int = HD, base: float, freq_factors=None,
                  freq_scale: float = 1.0, attn_factor: float = 1.0) -> np.ndarray:
    f = {k: v.astype(np.float64) for k, v in t.items()}
    T = len(ids)

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * w

    def rope(x):  # x [T, h, HD]
        out = x.copy()
        for p in range(T):
            for i in range(n_rot // 2):
                theta = p * base ** (-2 * i / n_rot)
                if freq_factors is not None:
                    theta /= freq_factors[i]
                theta *= freq_scale
                c, s = math.cos(theta) * attn_factor, math.sin(theta) * attn_factor
                a, b = (i, i + n_rot // 2) if arch != "llama" else (2 * i, 2 * i + 1)
                x0, x1 = x[p, :, a], x[p, :, b]
                out[p, :, a], out[p, :, b] = x0 * c - x1 * s, x0 * s + x1 * c
        return out

    x = f["token_embd.weight"][ids]
    for i in range(NL):
        p = f"blk.{i}."
        h = rms(x, f[p + "attn_norm.weight"])
        if arch == "phi3":
            qkv = h @ f[p + "attn_qkv.weight"].T
            q, k, v = np.split(qkv, [H * HD, H * HD + HKV * HD], axis=1)
        else:
            q, k, v = (h @ f[p + f"attn_{n}.weight"].T + f.get(p + f"attn_{n}.bias", 0) for n in "qkv")
        q, k = rope(q.reshape(T, H, HD)), rope(k.reshape(T, HKV, HD))
        k = k.astype(np.float16).astype(np.float64)
        v = v.reshape(T, HKV, HD).astype(np.float16).astype(np.float64)
        o = np.zeros((T, H, HD))
        for hh in range(H):
            kv = hh // (H // HKV)
            sc = q[:, hh] @ k[:, kv].T / math.sqrt(HD) + np.triu(np.full((T, T), -np.inf), 1)
            e = np.exp(sc - sc.max(-1, keepdims=True))
            o[:, hh] = (e / e.sum(-1, keepdims=True)) @ v[:, kv]
        x = x + o.reshape(T, H * HD) @ f[p + "attn_output.weight"].T
        h = rms(x, f[p + "ffn_norm.weight"])
        if arch == "phi3":
            g, u = np.split(h @ f[p + "ffn_up.weight"].T, 2, axis=1)
        else:
            g, u = h @ f[p + "ffn_gate.weight"].T, h @ f[p + "ffn_up.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ f[p + "ffn_down.weight"].T
    out = f.get("output.weight", f["token_embd.weight"])
    return rms(x, f["output_norm.weight"]) @ out.T


def run_logits(model, dev, ids, *, n_ctx: int = 256, chunks=None):
    cache = model.new_kv_cache(n_ctx)
    chunks = chunks or [len(ids)]
    out, n = [], 0
    for c in chunks:
        step = Step(c, dev.to_device(ids[n : n + c]), dev.to_device(list(range(n, n + c))), dev.to_device([n]))
        out.append(model.forward(step, cache, all_logits=True))
        n += c
    return np.concatenate(out)


def rel_l2(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


CASES = {
    "qwen2": dict(arch="qwen2", base=1e6),
    "llama": dict(arch="llama", base=10000.0),
    "phi3": dict(arch="phi3", base=10000.0),
    "phi3-partial-rotary": dict(arch="phi3", base=10000.0, n_rot=8),
    "llama-rope-freqs": dict(arch="llama", base=10000.0, rope="freqs"),
    "llama-linear-scaling": dict(arch="llama", base=10000.0, kv={"rope.scaling.type": "linear", "rope.scaling.factor": 4.0}),
    "phi3-longrope-short": dict(arch="phi3", base=10000.0, rope="longrope", kv={"rope.scaling.attn_factor": 1.19}),
    "llama-mixed-types": dict(arch="llama", base=10000.0, mixed=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_llama_cpp_graph_transcription(tmp_path, registry, case):
    c = CASES[case]
    arch, n_rot = c["arch"], c.get("n_rot", HD)
    rng = np.random.default_rng(sorted(CASES).index(case))
    tensors = make_tensors(arch, rng, n_rot=n_rot, mixed_types=c.get("mixed", False), rope=c.get("rope"))
    path = write_gguf(tmp_path / f"{case}.gguf", arch, tensors, n_rot=n_rot, extra_kv=c.get("kv"))
    model_file = open_gguf(path)
    adapter = check_supported(model_file, registry)
    dev = ReferenceDevice()
    model = adapter.build(model_file, dev, registry)
    ids = [int(i) for i in rng.integers(0, V, 12)]
    kv = c.get("kv", {})
    ff = None
    if c.get("rope") == "freqs":
        ff = tensors["rope_freqs.weight"].astype(np.float64)
    if c.get("rope") == "longrope":  # n_ctx 256 <= context_length 512: the short factors
        ff = tensors["rope_factors_short.weight"].astype(np.float64)
    ref = oracle_logits(arch, tensors, ids, n_rot=n_rot, base=c["base"], freq_factors=ff,
                        freq_scale=1 / kv.get("rope.scaling.factor", 1.0), attn_factor=kv.get("rope.scaling.attn_factor", 1.0))
    got = run_logits(model, dev, ids)
    assert got.shape == (12, V)
    assert rel_l2(got, ref) < 1e-4, case
    # chunked prefill and one-token decode steps give the same logits
    got2 = run_logits(model, dev, ids, chunks=[5, 1, 1, 4, 1])
    assert rel_l2(got2, got) < 1e-5
    if c.get("mixed"):
        assert not model.blocks[0].qkv.fused and model.blocks[0].gate_up.fused
    elif arch != "phi3":
        assert model.blocks[0].qkv.fused and model.blocks[0].gate_up.fused


def test_phi3_long_factors_beyond_the_original_context(tmp_path, registry):
    rng = np.random.default_rng(7)
    tensors = make_tensors("phi3", rng, rope="longrope")
    path = write_gguf(tmp_path / "long.gguf", "phi3", tensors,
                      extra_kv={"rope.scaling.original_context_length": 128, "rope.scaling.attn_factor": 1.2})
    m = open_gguf(path)
    dev = ReferenceDevice()
    model = check_supported(m, registry).build(m, dev, registry)
    assert model.rope_spec(128).freq_factors is model.rope_factors.short
    assert model.rope_spec(129).freq_factors is model.rope_factors.long
    ids = [int(i) for i in rng.integers(0, V, 6)]
    ref = oracle_logits("phi3", tensors, ids, base=10000.0, freq_factors=tensors["rope_factors_long.weight"], attn_factor=1.2)
    assert rel_l2(run_logits(model, dev, ids, n_ctx=256), ref) < 1e-4


def test_config_from_metadata(tmp_path, registry):
    path = write_gguf(tmp_path / "c.gguf", "qwen2", make_tensors("qwen2", np.random.default_rng(0)),
                      drop_kv=("context_length", "attention.head_count_kv", "rope.dimension_count"))
    m = open_gguf(path)
    cfg = check_supported(m, registry).config(m)
    assert cfg.context_length is None and cfg.n_head_kv == H and cfg.rope.n_rot == HD and cfg.rope.neox
    assert cfg.n_vocab == V and cfg.head_dim == HD and cfg.rope.base == 1e6


def test_llama_requires_full_rotary(tmp_path, registry):
    path = write_gguf(tmp_path / "r.gguf", "llama", make_tensors("llama", np.random.default_rng(0)), n_rot=8)
    m = open_gguf(path)
    with pytest.raises(GGUFMetadataError, match="rope.dimension_count"):
        check_supported(m, registry).config(m)


def test_missing_required_metadata(tmp_path, registry):
    path = write_gguf(tmp_path / "m.gguf", "llama", make_tensors("llama", np.random.default_rng(0)),
                      drop_kv=("attention.layer_norm_rms_epsilon",))
    with pytest.raises(GGUFMetadataError, match="layer_norm_rms_epsilon"):
        check_supported(open_gguf(path), registry)


@pytest.mark.parametrize("fault", ["missing", "extra", "shape"])
def test_strict_loading(tmp_path, registry, fault):
    t = make_tensors("llama", np.random.default_rng(1))
    if fault == "missing":
        del t["blk.1.ffn_down.weight"]
    elif fault == "extra":
        t["blk.0.attn_q_norm.weight"] = np.ones(HD, np.float32)
    else:
        t["blk.1.ffn_gate.weight"] = np.ones((F + 32, D), np.float32)
    m = open_gguf(write_gguf(tmp_path / f"{fault}.gguf", "llama", t))
    message = {"missing": "blk.1.ffn_down.weight' is missing", "extra": "unexpected tensors 'blk.0.attn_q_norm.weight'",
               "shape": "blk.1.ffn_gate.weight' has shape"}[fault]
    with pytest.raises(GGUFTensorError, match=message):
        check_supported(m, registry).build(m, ReferenceDevice(), registry)
