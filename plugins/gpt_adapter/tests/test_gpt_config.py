"""Config from metadata and strict loading of the gpt-oss and gpt2 adapters (no llama.cpp needed).

The expected values are llama.cpp's, read from its source: load_swa_pattern(ml, 2) and
set_swa_pattern in src/llama-hparams.cpp; the YaRN parameters of llama_context's constructor
(src/llama-context.cpp); create_tensor flags in src/models/{openai-moe,gpt2}.cpp.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gpt_tiny_gguf import write_gpt2, write_gpt_oss

from orcd_core.device import Step
from orcd_core.backends import create_device
from orcd_core.errors import GGUFTensorError
from orcd_core.gguf_file import GGUFModel, check_supported, open_gguf
from orcd_core.plugins import load_plugins
from orcd_gpt_adapter.gpt_oss import rope_specs, swa_pattern


@pytest.fixture(scope="module")
def registry():
    return load_plugins()


def _meta(**kv):
    md = {"general.architecture": "gpt-oss", **{f"gpt-oss.{k}": v for k, v in kv.items()}}
    return GGUFModel(Path("x.gguf"), 3, 0, 32, 0, md, {})


def test_swa_pattern_like_llama_cpp():
    # default n_pattern 2, dense_first false: il % 2 < 1 -> layers 0, 2, 4, ... slide
    assert swa_pattern(_meta(), 5) == (True, False, True, False, True)
    assert swa_pattern(_meta(**{"attention.sliding_window_pattern": 3}), 6) == (True, True, False) * 2
    assert swa_pattern(_meta(**{"attention.sliding_window_pattern": 0}), 3) == (True, True, True)
    explicit = [False, True, True, False]
    assert swa_pattern(_meta(**{"attention.sliding_window_pattern": explicit}), 4) == tuple(explicit)


def test_yarn_parameters_like_llama_cpp():
    # the real gpt-oss-20b: yarn, factor 32, original context 4096, base 150000
    m = _meta(**{"rope.freq_base": 150000.0, "rope.scaling.type": "yarn", "rope.scaling.factor": 32.0,
                 "rope.scaling.original_context_length": 4096, "context_length": 131072})
    rope = rope_specs(m, 64)["rope"]
    assert rope.neox and rope.n_rot == 64 and rope.base == 150000.0
    assert rope.freq_scale == pytest.approx(1 / 32) and rope.ext_factor == 1.0
    # get_mscale(32, 1) / (1 + 0.1 ln 32) cancels: ggml's rope applies 1 + 0.1 ln 32 itself
    assert rope.attn_factor == pytest.approx(1.0)
    assert (rope.beta_fast, rope.beta_slow, rope.n_ctx_orig) == (32.0, 1.0, 4096)
    # scaling.attn_factor multiplies; freq_base_swa only changes the SWA layers
    m.metadata["gpt-oss.rope.scaling.attn_factor"] = 0.5
    m.metadata["gpt-oss.rope.freq_base_swa"] = 10000.0
    specs = rope_specs(m, 64)
    assert specs["rope"].attn_factor == pytest.approx(0.5)
    assert specs["rope_swa"].base == 10000.0 and specs["rope"].base == 150000.0
    # no scaling keys: plain RoPE, n_ctx_orig falls back to context_length
    plain = rope_specs(_meta(**{"context_length": 2048}), 64)["rope"]
    assert (plain.freq_scale, plain.ext_factor, plain.attn_factor, plain.n_ctx_orig) == (1.0, 0.0, 1.0, 2048)


def test_gpt_oss_config_from_file(tmp_path: Path, registry):
    model = open_gguf(write_gpt_oss(tmp_path / "oss.gguf", seed=1, n_layer=3))
    arch = check_supported(model, registry)
    c = arch.config(model)
    assert (c.n_layer, c.n_embd, c.n_head, c.n_head_kv, c.head_dim) == (3, 128, 8, 2, 32)
    assert (c.n_expert, c.n_expert_used, c.n_ff_exp, c.sliding_window) == (8, 4, 64, 8)
    assert c.swa_layers == (True, False, True)
    assert c.rope.freq_scale == pytest.approx(1 / 32) and c.rope.n_ctx_orig == 256
    built = arch.build(model, create_device("reference"), registry)
    assert built.kv_windows() == [8, 0, 8]
    layer = built.blocks[0]
    assert [w.shape for w, _ in layer.qkv.weights] == [(8 * 32 + 2 * 2 * 32, 128)]  # q|k|v fused (all Q8_0)
    assert layer.gate_up.shape == (8, 2 * 64, 128)  # gate|up experts fused: [E, 2F, D]
    gate = registry.quant_format(39).dequantize(model.tensors["blk.0.ffn_gate_exps.weight"].data, (8, 64, 128))
    up = registry.quant_format(39).dequantize(model.tensors["blk.0.ffn_up_exps.weight"].data, (8, 64, 128))
    np.testing.assert_array_equal(layer.gate_up.data[:, :64], gate)
    np.testing.assert_array_equal(layer.gate_up.data[:, 64:], up)


def test_gate_up_of_different_types_fuse_through_f16(tmp_path: Path, registry):
    """MXFP4 gate and F16 up experts cannot be concatenated as one type: the adapter dequantizes
    both and uploads one F16 [E, 2F, D] stack (values equal up to fp16 rounding)."""
    from gguf import GGMLQuantizationType as T

    model = open_gguf(write_gpt_oss(tmp_path / "oss.gguf", seed=5, n_layer=1, up_exps_type=T.F16))
    built = check_supported(model, registry).build(model, create_device("reference"), registry)
    gate_up = built.blocks[0].gate_up
    assert gate_up.shape == (8, 128, 128) and gate_up.fmt.name == "F16"
    gate = registry.quant_format(39).dequantize(model.tensors["blk.0.ffn_gate_exps.weight"].data, (8, 64, 128))
    up = registry.quant_format(1).dequantize(model.tensors["blk.0.ffn_up_exps.weight"].data, (8, 64, 128))
    np.testing.assert_array_equal(gate_up.data[:, :64], gate.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(gate_up.data[:, 64:], up)


def test_gpt2_tied_output(tmp_path: Path, registry):
    model = open_gguf(write_gpt2(tmp_path / "g2.gguf", seed=2, tied=True))
    built = check_supported(model, registry).build(model, create_device("reference"), registry)
    assert built.output is built.tok_embd
    assert built.config.context_length == built.config.n_positions == 128 and built.config.head_dim == 32


def test_gpt2_per_layer_counts_as_llama_cpp_reads_them(tmp_path: Path, registry):
    """Head counts and the FFN width may be per-layer arrays (llama.cpp's get_key_or_arr), all equal."""
    from orcd_core.errors import GGUFMetadataError

    model = open_gguf(write_gpt2(tmp_path / "g2.gguf", seed=2))
    arch = check_supported(model, registry)
    model.metadata.update({"gpt2.attention.head_count": [4, 4], "gpt2.attention.head_count_kv": [2, 2],
                           "gpt2.feed_forward_length": [512, 512]})
    c = arch.config(model)
    assert (c.n_head, c.n_head_kv, c.n_ff) == (4, 2, 512)
    model.metadata["gpt2.attention.head_count"] = [4, 2]
    with pytest.raises(GGUFMetadataError, match="head_count varies per layer"):
        arch.config(model)


def test_context_length_may_be_absent(tmp_path: Path, registry):
    """Without `{arch}.context_length` the config says None (issue 2); gpt2 then takes its bound from
    position_embd's rows and refuses a longer cache with one clear error."""
    from orcd_core.generation import InvalidRequest

    for arch, write in (("gpt-oss", write_gpt_oss), ("gpt2", write_gpt2)):
        path = write(tmp_path / f"{arch}.gguf", seed=6)
        data = path.read_bytes()
        key = f"{arch}.context_length".encode()
        assert data.count(key) == 1
        path.write_bytes(data.replace(key, key[:-1] + b"X"))  # same length: the file stays valid
        model = open_gguf(path)
        arch_obj = check_supported(model, registry)
        assert arch_obj.config(model).context_length is None
        built = arch_obj.build(model, create_device("reference"), registry)
        if arch == "gpt2":
            assert built.config.n_positions == 128
            built.new_kv_cache(128)
            with pytest.raises(InvalidRequest, match="128 learned positions"):
                built.new_kv_cache(129)


def test_prefill_equals_decode(tmp_path: Path, registry):
    """The same 24 tokens as one prefill and as 24 decode steps give the same logits (window 8 < 24:
    the ring-buffered SWA layers and the sinks are exercised on both paths). Float32 sums in another order
differ by ~1e-4 of the logits' spread; a wrong window, mask or cache slot costs more than 1e-1."""
    ids = np.random.default_rng(3).integers(0, 380, 24)
    for path in (write_gpt_oss(tmp_path / "oss.gguf", seed=3), write_gpt2(tmp_path / "g2.gguf", seed=3)):
        model = open_gguf(path)
        dev = create_device("reference")
        built = check_supported(model, registry).build(model, dev, registry)
        T = len(ids)
        full = built.forward(Step(T, dev.to_device(ids), dev.to_device(np.arange(T)), dev.to_device([0])),
                             built.new_kv_cache(32), all_logits=True)
        cache = built.new_kv_cache(32)
        steps = [built.forward(Step(1, dev.to_device([t]), dev.to_device([i]), dev.to_device([i])), cache)[0]
                 for i, t in enumerate(ids)]
        err = np.abs(full - np.array(steps)).max() / full.std()
        assert err < 1e-3, f"{path.name}: prefill vs decode max |diff|/std {err:.2e}"


def test_strict_loading(tmp_path: Path, registry):
    import gguf

    path = write_gpt2(tmp_path / "g2.gguf", seed=4)
    # an extra tensor the adapter does not know fails the load, naming it
    reader = gguf.GGUFReader(path)
    extra = tmp_path / "extra.gguf"
    w = gguf.GGUFWriter(extra, "gpt2")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        w.add_key_value(field.name, field.contents(), field.types[0],
                        field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.add_tensor("blk.0.attn_q_norm.weight", np.ones(128, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    model = open_gguf(extra)
    with pytest.raises(GGUFTensorError, match="attn_q_norm"):
        check_supported(model, registry).build(model, create_device("reference"), registry)
    # a wrong head count makes the qkv shape disagree: the message names the tensor and both shapes
    model = open_gguf(path)
    model.metadata["gpt2.embedding_length"] = 96
    with pytest.raises(GGUFTensorError, match=r"token_embd.weight.*\[384, 128\].*\[384, 96\]"):
        check_supported(model, registry).build(model, create_device("reference"), registry)


def test_rope_is_the_core_function_with_gpt_oss_overrides():
    """gpt-oss reads the shared `rope_spec_from_metadata`, minus the keys llama.cpp does not read for
    it: yarn betas, ext/attn factor overrides and rope.scale_linear leave its spec unchanged."""
    from orcd_core.errors import GGUFMetadataError
    from orcd_core.rope import rope_spec_from_metadata

    base = {"rope.freq_base": 150000.0, "rope.scaling.type": "yarn", "rope.scaling.factor": 32.0,
            "rope.scaling.original_context_length": 4096}
    odd = {"rope.scaling.yarn_beta_fast": 16.0, "rope.scaling.yarn_beta_slow": 2.0,
           "rope.scaling.yarn_ext_factor": 0.5, "rope.scaling.yarn_attn_factor": 3.0}
    assert rope_specs(_meta(**base, **odd), 64)["rope"] == rope_specs(_meta(**base), 64)["rope"]
    shared = rope_spec_from_metadata(_meta(**base, **odd), n_rot=64, neox=True, arch="gpt-oss")
    assert (shared.beta_fast, shared.beta_slow, shared.ext_factor) == (16.0, 2.0, 0.5)  # others read them
    with pytest.raises(GGUFMetadataError, match="longrope"):
        rope_specs(_meta(**{"rope.scaling.type": "longrope"}), 64)


def test_per_layer_counts_must_agree():
    from orcd_core.errors import GGUFMetadataError
    from orcd_core.hparams import uniform_per_layer

    m = _meta(**{"expert_used_count": [4, 4, 4], "bad": [4, 2], "zero": 0})
    assert uniform_per_layer(m, "gpt-oss.expert_used_count") == 4
    assert uniform_per_layer(m, "gpt-oss.absent", 7) == 7
    with pytest.raises(GGUFMetadataError, match="varies per layer"):
        uniform_per_layer(m, "gpt-oss.bad")
    with pytest.raises(GGUFMetadataError, match="expected a positive int"):
        uniform_per_layer(m, "gpt-oss.zero")
    with pytest.raises(GGUFMetadataError, match="missing"):
        uniform_per_layer(m, "gpt-oss.absent")
    assert uniform_per_layer(m, "gpt-oss.expert_used_count", hi=4) == 4
    with pytest.raises(GGUFMetadataError, match=r"expert_used_count.*expected an integer in 1\.\.3"):
        uniform_per_layer(m, "gpt-oss.expert_used_count", hi=3)
