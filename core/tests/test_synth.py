"""orcd_core.testing.synth: every synthetic architecture (tiny, 2 layers, 2 seeds) is a valid GGUF for our loader,
deterministic by seed, with finite weights of the planned magnitude, and llama.cpp loads it and computes
finite logits."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest

from orcd_core import testmodels
from orcd_core.testing import synth
from orcd_core.gguf_file import check_supported, open_gguf
from orcd_core.plugins import default_registry

SEEDS = (1, 2)


def _vocab(arch: str) -> Path | None:
    """The arch's default vocabulary; for gpt-oss, o200k when the tokenizer package provides it, else
    GPT-2's BPE vocabulary (the structure under test does not depend on which BPE vocabulary it is)."""
    if arch != "gpt-oss":
        return None
    try:
        return synth.default_vocab("gpt-oss")
    except synth.SynthError:
        return testmodels.llama_cpp_models_dir() / "ggml-vocab-gpt-2.gguf"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[tuple[str, int], Path]:
    """Each arch written at seeds 1 and 2, and seed 1 a second time (with another thread count)."""
    d = tmp_path_factory.mktemp("synth")
    out = {}
    for arch in synth.archs():
        plan = synth.build_plan(arch, "tiny", layers=2, vocab=_vocab(arch), seed=1)
        for seed in SEEDS:
            plan_s = plan if seed == 1 else synth.build_plan(arch, "tiny", layers=2, vocab=_vocab(arch), seed=seed)
            out[arch, seed] = synth.write_plan(plan_s, d / f"{arch}-{seed}.gguf", seed=seed, threads=2).path
        out[arch, -1] = synth.write_plan(plan, d / f"{arch}-1-again.gguf", seed=1, threads=1).path
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("arch", synth.archs())
def test_opens_and_is_supported(files, arch):
    registry = default_registry()
    for seed in SEEDS:
        model = open_gguf(files[arch, seed])
        check_supported(model, registry)
        assert model.architecture == arch
        assert model.metadata[f"{arch}.block_count"] == 2
        n_vocab = len(model.metadata["tokenizer.ggml.tokens"])
        assert model.tensors["token_embd.weight"].shape[1] == n_vocab
        if "output.weight" in model.tensors:
            assert model.tensors["output.weight"].shape[1] == n_vocab


@pytest.mark.parametrize("arch", synth.archs())
def test_deterministic_by_seed(files, arch):
    assert _sha(files[arch, 1]) == _sha(files[arch, -1])  # same seed, other thread count: same bytes
    a, b = open_gguf(files[arch, 1]), open_gguf(files[arch, 2])
    assert list(a.tensors) == list(b.tensors)
    differing = [n for n in a.tensors if not np.array_equal(a.tensors[n].data, b.tensors[n].data)]
    assert len(differing) == len(a.tensors), "every tensor must depend on the seed"


@pytest.mark.parametrize("arch", synth.archs())
def test_weights_finite_and_scaled(files, arch):
    """Dequantized, every weight is finite; matrices have RMS within a factor 4 of 1/sqrt(fan_in)
    (so activations stay bounded), norm gains are near 1."""
    registry = default_registry()
    model = open_gguf(files[arch, 1])
    for t in model.tensors.values():
        fmt = registry.quant_format(t.ggml_type)
        rows = t.n_elements // t.shape[0]
        take = min(rows, max(1, 65536 // t.shape[0]))  # a sample of whole rows
        raw = np.asarray(t.data).reshape(rows, -1)[:take]
        x = fmt.dequantize(raw, (take, t.shape[0]))
        assert np.isfinite(x).all(), t.name
        rms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))
        if t.name.endswith("norm.weight"):
            assert abs(float(x.mean()) - 1.0) < 0.1, t.name
        elif len(t.shape) >= 2 and t.name.endswith(".weight") and t.name != "position_embd.weight":
            target = 1 / math.sqrt(t.shape[0])
            assert target / 4 < rms < 4 * target, (t.name, rms, target)


def test_tiny_keeps_the_structure():
    """The scaled-down models keep GQA ratio, head size, rope dim, experts, window and YaRN."""
    for arch in synth.archs():
        full, tiny = synth.spec_of(arch).sizes["full"], synth.spec_of(arch).sizes["tiny"]
        assert full.n_head // full.n_head_kv == tiny.n_head // tiny.n_head_kv, arch
        assert full.head_dim == tiny.head_dim or arch == "qwen2", arch
        assert (full.n_expert, full.n_expert_used, full.rope_dim) == (tiny.n_expert, tiny.n_expert_used, tiny.rope_dim)
        # same divisibility by 256 as the real width, so the same K-quant fall-backs happen
        assert (full.n_embd % 256 == 0) == (tiny.n_embd % 256 == 0), arch
    gv = testmodels.llama_cpp_models_dir() / "ggml-vocab-gpt-2.gguf"
    full_mix = set(synth.build_plan("gpt-oss", "full", vocab=gv).type_counts())
    tiny_mix = set(synth.build_plan("gpt-oss", "tiny", vocab=gv).type_counts())
    assert full_mix == tiny_mix == {"MXFP4", "Q8_0", "F32"}
    for arch, mix in (("qwen2", {"Q4_K", "Q5_0", "Q6_K", "Q8_0", "F32"}), ("phi3", {"Q4_K", "Q5_K", "Q6_K", "F32"})):
        assert set(synth.build_plan(arch, "tiny", layers=4).type_counts()) == mix, arch
        assert set(synth.build_plan(arch, "full").type_counts()) == mix, arch


def test_full_size_shapes():
    """Parameter counts of the full-size plans match the real models' published sizes."""
    vocab = {"gpt-oss": testmodels.llama_cpp_models_dir() / "ggml-vocab-gpt-2.gguf"}
    counts = {a: sum(t.n_elements for t in synth.build_plan(a, "full", vocab=vocab.get(a)).tensors) for a in synth.archs()}
    assert 493e6 < counts["qwen2"] < 495e6  # Qwen2.5-0.5B: 494M
    assert 134e6 < counts["llama"] < 135e6  # SmolLM2-135M
    assert 3.82e9 < counts["phi3"] < 3.83e9  # Phi-3-mini: 3.82B
    assert 124e6 < counts["gpt2"] < 125e6  # GPT-2 small: 124M
    # gpt-oss-20b: 20.91B with o200k (201,088 ids); here GPT-2's 50,257 ids: 2 * 2880 * 150,831 fewer
    assert abs(counts["gpt-oss"] + 2 * 2880 * (201088 - 50257) - 20.91e9) < 0.01e9


def test_unknown_inputs_are_clear_errors(tmp_path):
    with pytest.raises(synth.SynthError, match="unknown architecture"):
        synth.build_plan("mamba")
    with pytest.raises(synth.SynthError, match="unknown recipe"):
        synth.build_plan("gpt2", recipe="Q9_X")
    with pytest.raises(synth.SynthError, match="does not exist"):
        synth.build_plan("gpt2", vocab=tmp_path / "nope.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\xff" * 40)
    with pytest.raises(synth.SynthError, match="bad.gguf"):
        synth.build_plan("gpt2", vocab=tmp_path / "bad.gguf")


def test_missing_quant_type_is_named(tmp_path):
    """A recipe needing a type no plugin registers fails naming the tensor and the type."""
    from orcd_core.plugins import load_plugins

    core_only = load_plugins(allow=["core"])
    plan = synth.build_plan("gpt2", layers=1)
    with pytest.raises(synth.SynthError, match=r"needs type Q\d_K"):
        synth.write_plan(plan, tmp_path / "x.gguf", registry=core_only)
    f16 = synth.build_plan("gpt2", layers=1, recipe="F16")
    synth.write_plan(f16, tmp_path / "x.gguf", registry=core_only)  # float recipes need only the core
    assert set(open_gguf(tmp_path / "x.gguf").quant_mix()) == {"F16", "F32"}


# -- llama.cpp loads what we write ---------------------------------------------------------------------


@pytest.mark.oracle
@pytest.mark.parametrize("arch", synth.archs())
def test_llama_cpp_loads_and_computes_finite_logits(files, arch):
    llama_cpp = pytest.importorskip("llama_cpp")
    logits = []
    for seed in SEEDS:
        llm = llama_cpp.Llama(str(files[arch, seed]), n_ctx=64, logits_all=True, verbose=False)
        try:
            n_vocab = llm.n_vocab()
            assert n_vocab == len(open_gguf(files[arch, seed]).metadata["tokenizer.ggml.tokens"])
            tokens = [1, 17, 300, 4000, n_vocab - 1]
            llm.eval(tokens)
            row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            assert row.shape == (n_vocab,)
            assert np.isfinite(row).all(), f"{arch} seed {seed}: non-finite logits"
            assert row.std() > 0, f"{arch} seed {seed}: constant logits"
            # weights ~1/sqrt(fan_in) keep logits O(1) (measured: |logit| <= 4, also at full depth)
            assert np.abs(row).max() < 100, f"{arch} seed {seed}: logits blow up"
            logits.append(row)
        finally:
            llm.close()
    assert not np.array_equal(logits[0], logits[1]), "different seeds must give different models"


def test_format_refusal_names_the_tensor(tmp_path):
    """A format that cannot produce the planned magnitude fails with a SynthError naming the tensor."""
    plan = synth.build_plan("gpt2", layers=1)
    t = next(t for t in plan.tensors if t.type_name == "Q4_K")
    plan.tensors[plan.tensors.index(t)] = synth.TensorPlan(t.name, t.shape, t.type_name, t.role, 1e30)
    with pytest.raises(synth.SynthError, match=t.name.replace(".", r"\.")):
        synth.write_plan(plan, tmp_path / "x.gguf", threads=1)
    assert not list(tmp_path.iterdir())


def test_only_adapters_with_a_synth_spec_are_synthesizable():
    """`Architecture.synth_spec()` is optional: the base returns None and such an architecture is
    not offered; the built-in adapters provide the five architectures' specs."""
    from orcd_core.architecture import Architecture
    from orcd_core.plugins import Registry

    class NoSynth(Architecture):
        name = "nosynth"

    installed = default_registry()
    assert set(synth.archs(installed)) == {"qwen2", "llama", "phi3", "gpt-oss", "gpt2"}
    registry = Registry()
    registry.architectures = {"nosynth": NoSynth(), "gpt2": installed.architecture("gpt2")}
    assert synth.archs(registry) == ("gpt2",)
    with pytest.raises(synth.SynthError, match=r"unknown architecture 'nosynth' \(known: gpt2\)"):
        synth.spec_of("nosynth", registry)
    for arch in synth.archs(installed):
        spec = synth.spec_of(arch, installed)
        assert set(spec.sizes) == set(synth.SIZES) and spec.recipe in synth.recipes(installed)
