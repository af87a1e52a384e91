"""`orcd-worker synth --recipe` takes any installed tensor type, a third-party plugin's included, so a
plugin author can write a test model in a new format: here IQ4_NL from examples/orcd-quant-example
(imported from its source tree, registered next to the installed plugins). The file it writes holds
IQ4_NL tensors that gguf-py dequantizes exactly as the plugin does, and the engine loads and runs it on
the reference backend."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, LlamaFileType
from gguf.quants import dequantize as gguf_dequantize
from gguf_builder import tiny_model

from orcd_core import plugins
from orcd_core.engine import Engine
from orcd_core.generation import GenerationRequest, SamplingParams
from orcd_core.gguf_file import check_supported, open_gguf
from orcd_core.testing import synth
from orcd_server.cli import main
from test_example_plugin import EXAMPLE


@pytest.fixture
def registry(monkeypatch):
    """The installed plugins plus the example, as the process-wide registry the CLI uses."""
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    import orcd_quant_example

    installed = plugins.load_plugins()
    reg = installed if installed.quant_format_by_name("IQ4_NL") else plugins.load_plugins(extra_modules=[orcd_quant_example])
    assert reg.failed == [] and reg.quant_format_by_name("IQ4_NL") is not None
    monkeypatch.setattr(plugins, "default_registry", lambda: reg)
    return reg


@pytest.fixture
def vocab(tmp_path):
    """A small byte-level BPE vocabulary GGUF (the tiny llama model's tokenizer.* entries)."""
    path = tmp_path / "vocab.gguf"
    path.write_bytes(tiny_model("llama").to_bytes())
    return path


def test_recipes_are_the_mixtures_and_the_installed_types(registry):
    core_only = plugins.load_plugins(allow=["core"])
    assert synth.recipes(core_only) == ("Q4_K_M", "MXFP4_MOE", "F32", "F16", "BF16")
    assert "IQ4_NL" in synth.recipes(registry) and "Q4_K" in synth.recipes(registry)


def test_synth_writes_a_plugin_format_that_dequantizes_and_runs(registry, vocab, tmp_path, capsys):
    out = tmp_path / "iq4.gguf"
    assert main(["synth", "llama", str(out), "--layers", "2", "--seed", "3", "--recipe", "IQ4_NL", "--vocab", str(vocab)]) == 0
    assert "IQ4_NL" in capsys.readouterr().out

    model = open_gguf(out)
    mix = model.quant_mix()
    # the tied embedding/output gets llama-quantize's Q6_K, which falls back to Q8_0 at the tiny width (not a multiple of 256)
    assert set(mix) == {"F32", "IQ4_NL", "Q8_0"}, mix
    assert model.metadata["general.file_type"] == int(LlamaFileType.MOSTLY_IQ4_NL)
    assert check_supported(model, registry).name == "llama"

    fmt = registry.quant_format_by_name("IQ4_NL")
    iq4 = [t for t in model.tensors.values() if t.type_name == "IQ4_NL"]
    assert len(iq4) == 2 * 7  # q, k, v, o, gate, up, down in each layer
    for t in iq4:
        ours = fmt.dequantize(t.data, t.np_shape)
        ref = gguf_dequantize(t.data.reshape(t.np_shape[0], -1), GGMLQuantizationType.IQ4_NL).reshape(t.np_shape)
        np.testing.assert_array_equal(ours, ref)
        assert np.isfinite(ours).all() and ours.std() > 0

    engine = Engine.load(out, backend="reference", registry=registry, max_context=64)
    try:
        prepared = engine.prepare(GenerationRequest(prompt_ids=(1, 2, 3), max_tokens=4, sampling=SamplingParams(temperature=0)))
        gen = engine.run(prepared)
        while True:
            try:
                next(gen)
            except StopIteration as done:
                result = done.value
                break
    finally:
        engine.close()
    assert result.tokens_out == 4 and len(result.ids) == 4


def test_recipe_errors_name_what_is_installed(registry, vocab, tmp_path, capsys):
    assert main(["synth", "llama", str(tmp_path / "x.gguf"), "--recipe", "Q9_X", "--vocab", str(vocab)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown recipe 'Q9_X'" in err and "IQ4_NL" in err
    # a GGML type that gguf knows but no installed plugin provides
    assert main(["synth", "llama", str(tmp_path / "x.gguf"), "--recipe", "IQ4_XS", "--vocab", str(vocab)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no installed plugin provides the tensor type IQ4_XS" in err
    assert not (tmp_path / "x.gguf").exists()
