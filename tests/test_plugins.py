"""The plugin framework: every hook, the registries, failure reporting, ORCD_LOAD_PLUGINS, no CuPy.

In-process plugins are passed to `load_plugins(extra_modules=...)`; entry-point behaviour (broken
plugins, the allowlist, imports) is tested in subprocesses with temporary `*.dist-info` folders on
`sys.path`, so this process's registry and imports stay untouched.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from orcd_core import hookspecs
from orcd_core.architecture import Architecture
from orcd_core.errors import GGUFMetadataError, PluginError, UnsupportedArchitecture, UnsupportedTensorType
from orcd_core.gguf_file import check_supported, open_gguf
from orcd_core.hookspecs import hookimpl
from orcd_core.plugins import CORE_PLUGIN, ENV_ALLOWLIST, HOOK_NAMES, load_plugins
from orcd_core.quant import QuantFormat

BUILTIN_ENTRY_POINTS = {"core", "llama-adapter", "gpt-adapter", "quant-q4k", "quant-mxfp4", "quant-legacy"}


# -- in-process test plugins -----------------------------------------------------------------------


class FakeIQ4NL(QuantFormat):
    """A format object for a GGML type no built-in plugin provides (geometry as in gguf-py)."""

    ggml_type = 20
    name = "IQ4_NL"
    block_size = 32
    type_size = 18

    def dequantize_blocks(self, blocks):
        return np.zeros((blocks.shape[0], 32), dtype=np.float32)

    def random_blocks(self, rng, n_blocks, scale=1.0):
        return rng.integers(0, 256, (n_blocks, 18), dtype=np.uint8)


class FakeArch(Architecture):
    name = "orcd-test-arch"
    required_metadata = {"block_count": int, "embedding_length": int}


class FakeTokenizer:
    kind = "orcd-test-tokenizer"
    priority = 0

    def applies(self, model, tokenizer_json):
        return model.get("tokenizer.ggml.model") == "orcd-test"

    def load(self, model, tokenizer_json):
        return ("tokenizer for", model.path.name)


class Plugin:
    """A plugin object whose hooks register the given objects (or raise)."""

    def __init__(self, name, quant=(), arch=(), tok=(), raise_in=None):
        self.__name__ = name
        self.quant, self.arch, self.tok, self.raise_in = quant, arch, tok, raise_in

    def _run(self, hook, register, objs):
        for obj in objs:
            register(obj)
        if self.raise_in == hook:
            raise RuntimeError(f"{self.__name__} fails in {hook}")

    @hookimpl
    def orcd_register_quant_formats(self, register):
        self._run("orcd_register_quant_formats", register, self.quant)

    @hookimpl
    def orcd_register_architectures(self, register):
        self._run("orcd_register_architectures", register, self.arch)

    @hookimpl
    def orcd_register_tokenizers(self, register):
        self._run("orcd_register_tokenizers", register, self.tok)


def load_with(*plugins, allow=()):
    """Only the given in-process plugins plus the core (no other entry point)."""
    return load_plugins(allow=allow, extra_modules=plugins)


def failure_of(registry, name):
    matches = [f for f in registry.failed if f.name == name]
    assert matches, f"{name} did not fail; failed: {registry.failed}"
    return matches[0].error


# -- the hooks ---------------------------------------------------------------------------------------


def test_orcd_register_quant_formats_registers_and_looks_up():
    fmt = FakeIQ4NL()
    reg = load_with(Plugin("p-quant", quant=[fmt]))
    assert reg.failed == []
    assert reg.quant_format(20) is fmt
    assert reg.quant_format_by_name("IQ4_NL") is fmt
    assert reg.owner("quant", 20) == "p-quant"
    info = next(p for p in reg.plugins if p.name == "p-quant")
    assert info.quant_types == ["IQ4_NL"] and info.architectures == [] and info.tokenizers == []


def test_orcd_register_quant_formats_is_validated():
    class UnknownId(FakeIQ4NL):
        ggml_type = 250  # not a GGML type gguf-py knows

    class WrongGeometry(FakeIQ4NL):
        type_size = 17

    class WrongName(FakeIQ4NL):
        name = "IQ4_XX"

    reg = load_with(
        Plugin("p-unknown", quant=[UnknownId()]),
        Plugin("p-geometry", quant=[WrongGeometry()]),
        Plugin("p-name", quant=[WrongName()]),
        Plugin("p-not-a-format", quant=[object()]),
    )
    assert "250" in failure_of(reg, "p-unknown") and "gguf-py does not know" in failure_of(reg, "p-unknown")
    assert "'IQ4_NL', 32, 17" in failure_of(reg, "p-geometry") and "'IQ4_NL', 32, 18" in failure_of(reg, "p-geometry")
    assert "IQ4_XX" in failure_of(reg, "p-name")
    assert "lacks 'ggml_type'" in failure_of(reg, "p-not-a-format")
    assert reg.quant_format(20) is None and reg.quant_format(250) is None
    assert {p.name for p in reg.plugins} == {CORE_PLUGIN}


def test_orcd_register_quant_formats_duplicate_is_an_error():
    class MyF32(QuantFormat):
        ggml_type, name, block_size, type_size = 0, "F32", 1, 4

    reg = load_with(Plugin("p-dup", quant=[MyF32()]), Plugin("p-twice", quant=[FakeIQ4NL(), FakeIQ4NL()]))
    err = failure_of(reg, "p-dup")
    assert err.startswith("PluginError") and "'F32'" in err and "'core' already registered" in err
    assert "twice" in failure_of(reg, "p-twice")
    assert type(reg.quant_format(0)).__module__ == "orcd_core.floats"  # the first registration stands
    assert reg.quant_format(20) is None


def test_orcd_register_architectures_registers_and_checks_required_metadata(tmp_path):
    from gguf import GGUFWriter

    arch = FakeArch()
    reg = load_with(Plugin("p-arch", arch=[arch]))
    assert reg.failed == []
    assert reg.architecture("orcd-test-arch") is arch and reg.owner("arch", "orcd-test-arch") == "p-arch"

    def write(path, with_embedding):
        w = GGUFWriter(str(path), "orcd-test-arch")
        w.add_block_count(2)
        if with_embedding:
            w.add_embedding_length(64)
        w.add_tensor("w", np.arange(64, dtype=np.float32).reshape(2, 32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    write(tmp_path / "ok.gguf", True)
    assert check_supported(open_gguf(tmp_path / "ok.gguf"), reg) is arch
    write(tmp_path / "missing.gguf", False)
    with pytest.raises(GGUFMetadataError, match=r"missing\.gguf: metadata key 'orcd-test-arch\.embedding_length' is missing"):
        check_supported(open_gguf(tmp_path / "missing.gguf"), reg)
    # without the plugin the architecture is unsupported, and the error names the installed plugins
    with pytest.raises(UnsupportedArchitecture, match=r"'orcd-test-arch'.*installed: orcd-core 0\.1\.0"):
        check_supported(open_gguf(tmp_path / "ok.gguf"), load_with())


def test_orcd_register_architectures_is_validated_and_unique():
    class NoName(Architecture):
        pass

    class BadRequired(FakeArch):
        name = "other"
        required_metadata = ["block_count"]

    reg = load_with(
        Plugin("p-first", arch=[FakeArch()]),
        Plugin("p-second", arch=[FakeArch()]),
        Plugin("p-noname", arch=[NoName()]),
        Plugin("p-required", arch=[BadRequired()]),
    )
    assert "'p-first' already registered" in failure_of(reg, "p-second")
    assert "has no name" in failure_of(reg, "p-noname")
    assert "required_metadata must be a dict" in failure_of(reg, "p-required")
    assert sorted(reg.architectures) == ["orcd-test-arch"] and reg.owner("arch", "orcd-test-arch") == "p-first"


def test_orcd_register_tokenizers_registers_and_is_unique():
    tok = FakeTokenizer()
    nameless = type("Nameless", (), {"kind": ""})()
    no_load = type("NoLoad", (), {"kind": "x", "applies": lambda self, m, t: True})()
    reg = load_with(
        Plugin("p-tok", tok=[tok]),
        Plugin("p-tok2", tok=[FakeTokenizer()]),
        Plugin("p-tok3", tok=[nameless]),
        Plugin("p-tok4", tok=[no_load]),
    )
    assert reg.tokenizer("orcd-test-tokenizer") is tok and reg.owner("tokenizer", "orcd-test-tokenizer") == "p-tok"
    assert next(p for p in reg.plugins if p.name == "p-tok").tokenizers == ["orcd-test-tokenizer"]
    assert "'p-tok' already registered" in failure_of(reg, "p-tok2")
    assert "has no kind" in failure_of(reg, "p-tok3")
    assert "lacks the method 'load'" in failure_of(reg, "p-tok4")


def test_orcd_register_tokenizers_backend_is_chosen_by_load_tokenizer(tmp_path):
    from gguf import GGUFWriter

    from orcd_core.tokenizer import load_tokenizer

    path = tmp_path / "tok.gguf"
    w = GGUFWriter(str(path), "orcd-test-arch")
    w.add_tokenizer_model("orcd-test")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    reg = load_with(Plugin("p-tok", tok=[FakeTokenizer()]))
    assert load_tokenizer(open_gguf(path), reg) == ("tokenizer for", "tok.gguf")


@pytest.mark.parametrize("hook", HOOK_NAMES)
def test_a_plugin_failing_in_any_hook_keeps_nothing(hook):
    reg = load_with(Plugin("p-half", quant=[FakeIQ4NL()], arch=[FakeArch()], tok=[FakeTokenizer()], raise_in=hook))
    assert f"fails in {hook}" in failure_of(reg, "p-half")
    core_only = load_with()
    assert reg.quant_format(20) is None and reg.architectures == {}
    assert set(reg.tokenizers) == set(core_only.tokenizers) and "orcd-test-tokenizer" not in reg.tokenizers
    assert [p.name for p in reg.plugins] == [CORE_PLUGIN]
    assert not reg.pm.has_plugin("p-half")


def test_a_misspelled_hookimpl_is_an_error():
    class Typo:
        __name__ = "p-typo"

        @hookimpl
        def orcd_register_quant_format(self, register):  # missing "s"
            register(FakeIQ4NL())

    reg = load_with(Typo())
    assert "orcd_register_quant_format, which is not a hook" in failure_of(reg, "p-typo")


def test_raise_for_failures_names_every_failure():
    reg = load_with(Plugin("p-a", raise_in="orcd_register_tokenizers"), Plugin("p-b", tok=[object()]))
    with pytest.raises(PluginError, match=r"2 plugin\(s\) failed to load: p-a .*; p-b "):
        reg.raise_for_failures()
    load_with().raise_for_failures()  # nothing failed: no error


def test_check_supported_names_tensor_type_and_plugins(tmp_path):
    from gguf import GGMLQuantizationType, GGUFWriter

    path = tmp_path / "iq4.gguf"
    w = GGUFWriter(str(path), "orcd-test-arch")
    w.add_block_count(1)
    w.add_embedding_length(32)
    raw = np.random.default_rng(0).integers(0, 256, (2, 18), dtype=np.uint8)
    w.add_tensor("blk.0.w", raw, raw_shape=(2, 18), raw_dtype=GGMLQuantizationType.IQ4_NL)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    model = open_gguf(path)
    with pytest.raises(UnsupportedTensorType, match=r"tensor 'blk\.0\.w' has type IQ4_NL \(id 20\).*installed: orcd-core"):
        check_supported(model, load_with(Plugin("p-arch", arch=[FakeArch()])))
    assert check_supported(model, load_with(Plugin("p-both", quant=[FakeIQ4NL()], arch=[FakeArch()]))).name == "orcd-test-arch"


# -- the installed (built-in) plugins -------------------------------------------------------------


def test_builtin_plugins_load_through_entry_points(monkeypatch):
    monkeypatch.delenv(ENV_ALLOWLIST, raising=False)
    reg = load_plugins()
    assert reg.failed == [], reg.describe_installed()
    assert {p.name for p in reg.plugins} >= BUILTIN_ENTRY_POINTS
    core = next(p for p in reg.plugins if p.name == CORE_PLUGIN)
    assert core.distribution == "orcd-core" and core.quant_types == ["F32", "F16", "BF16"]
    for p in reg.plugins:
        assert p.version, p


# -- entry points, in subprocesses ------------------------------------------------------------------


def make_dist(root: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> Path:
    """A minimal installed distribution: `<dist>-0.1.dist-info` with entry points, plus modules."""
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    eps = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[orcd_worker]\n{eps}\n")
    for name, src in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(src))
    return root


def run_python(code: str, path: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != ENV_ALLOWLIST}
    if path is not None:
        full_env["PYTHONPATH"] = os.pathsep.join([str(path), full_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env, timeout=120)


LIST_LOADED = """
    import json, sys
    import structlog
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    from orcd_core.plugins import load_plugins
    reg = load_plugins()
    print(json.dumps({"loaded": sorted(p.name for p in reg.plugins), "failed": [f.as_json() for f in reg.failed]}))
"""


ALLOWLIST_CASES = {
    "quant-legacy": {"core", "quant-legacy"},
    "orcd_quant_legacy, ORCD-LLAMA-ADAPTER": {"core", "quant-legacy", "llama-adapter"},  # dist names, normalized
    "": {"core"},  # set but empty: only the core
    "quant-legacy,no-such-plugin": {"core", "quant-legacy"},  # plus a reported failure
}


def test_orcd_load_plugins_restricts_loading():
    """One subprocess runs load_plugins() under each value of ORCD_LOAD_PLUGINS."""
    code = f"""
        import json, os, sys
        import structlog
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
        from orcd_core.plugins import load_plugins
        out = {{}}
        for value in {sorted(ALLOWLIST_CASES)!r}:
            os.environ["{ENV_ALLOWLIST}"] = value
            reg = load_plugins()
            out[value] = {{"loaded": sorted(p.name for p in reg.plugins), "failed": [f.as_json() for f in reg.failed]}}
        print(json.dumps(out))
    """
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for value, expected in ALLOWLIST_CASES.items():
        assert set(out[value]["loaded"]) == expected, value
        if "no-such-plugin" in value:
            assert [f["name"] for f in out[value]["failed"]] == ["no-such-plugin"]
            assert "no installed entry point or distribution" in out[value]["failed"][0]["error"]
        else:
            assert out[value]["failed"] == [], value
    assert "plugin_not_found" in proc.stderr


def test_plugin_that_fails_to_import_is_reported_loudly(tmp_path):
    make_dist(
        tmp_path,
        "orcd-broken",
        {"broken": "orcd_broken_mod", "missing": "orcd_no_such_module"},
        {"orcd_broken_mod": "raise ImportError('needs libfoo 2.0')\n"},
    )
    proc = run_python(LIST_LOADED, path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    failed = {f["entry_point"]: f for f in out["failed"]}
    assert set(failed) == {"broken", "missing"}
    assert failed["broken"]["error"] == "ImportError: needs libfoo 2.0"
    assert failed["broken"]["name"] == "orcd-broken" and failed["broken"]["version"] == "0.1"
    assert failed["missing"]["error"].startswith("ModuleNotFoundError")
    assert set(out["loaded"]) >= BUILTIN_ENTRY_POINTS  # the others still load
    # logged at error level, on stderr
    assert "plugin_import_failed" in proc.stderr and "needs libfoo 2.0" in proc.stderr


def test_orcd_trace_plugins_logs_every_hook_call():
    proc = run_python(LIST_LOADED, env={ENV_ALLOWLIST: "quant-legacy", "ORCD_TRACE_PLUGINS": "1"})
    assert proc.returncode == 0, proc.stderr
    calls = [line for line in proc.stderr.splitlines() if "plugin_hook_call" in line]
    # 3 hooks for each of the 2 plugins, each call reaching only that plugin
    assert len(calls) == 3 * 2, proc.stderr
    for hook in HOOK_NAMES:
        assert sum(hook in line for line in calls) == 2
    assert any("quant-legacy" in line for line in calls) and any("'core'" in line for line in calls)


def test_two_distributions_with_one_entry_point_name_are_reported(tmp_path):
    make_dist(tmp_path / "a", "orcd-clash-a", {"clash": "orcd_clash_a"}, {"orcd_clash_a": ""})
    make_dist(tmp_path / "b", "orcd-clash-b", {"clash": "orcd_clash_b"}, {"orcd_clash_b": ""})
    proc = run_python(LIST_LOADED, path=Path(f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}"))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert "clash" in out["loaded"]
    (failed,) = out["failed"]
    assert failed["name"] == "orcd-clash-b" and failed["module"] == "orcd_clash_b"
    assert "also used by orcd-clash-a (orcd_clash_a), which was loaded instead" in failed["error"]


def test_third_party_entry_point_registers_through_hooks(tmp_path):
    make_dist(
        tmp_path,
        "orcd-tiny",
        {"tiny": "orcd_tiny"},
        {
            "orcd_tiny": """
            from orcd_core.hookspecs import hookimpl

            class Tok:
                kind = "tiny-kind"

                def applies(self, model, tokenizer_json):
                    return False

                def load(self, model, tokenizer_json):
                    raise NotImplementedError

            @hookimpl
            def orcd_register_tokenizers(register):
                register(Tok())
            """
        },
    )
    code = textwrap.dedent(LIST_LOADED) + "print(reg.owner('tokenizer', 'tiny-kind'), [p.version for p in reg.plugins if p.name == 'tiny'])\n"
    proc = run_python(code, path=tmp_path, env={ENV_ALLOWLIST: "orcd-tiny"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert json.loads(lines[0]) == {"loaded": ["core", "tiny"], "failed": []}
    assert lines[1] == "tiny ['0.1']"


def test_importing_plugins_does_not_import_cupy(tmp_path):
    """Import every entry-point module and run every hook; CuPy must not be imported. Where CuPy is
    not installed a stand-in `cupy` package is put on the path, so an `import cupy` still shows."""
    import importlib.util

    path = None
    if importlib.util.find_spec("cupy") is None:
        for name in ("cupy", "cupyx", "cupy_backends"):
            (tmp_path / name).mkdir()
            (tmp_path / name / "__init__.py").write_text("")
        path = tmp_path
    code = """
        import sys, json
        from importlib import metadata
        for ep in metadata.entry_points(group="orcd_worker"):
            ep.load()
        from orcd_core.plugins import load_plugins
        reg = load_plugins()
        assert not reg.failed, reg.failed
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("cupy", "cupyx", "cupy_backends"))
        print(json.dumps({"plugins": len(reg.plugins), "cupy_modules": bad}))
    """
    proc = run_python(code, path=path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["plugins"] >= len(BUILTIN_ENTRY_POINTS)
    assert out["cupy_modules"] == []
    # the stand-in is really importable there (else the check above could not fail)
    if path is not None:
        assert run_python("import cupy", path=path).returncode == 0


# -- meta: every hook has a test --------------------------------------------------------------------


def test_every_hook_has_a_test_with_an_assertion():
    tree = ast.parse(inspect.getsource(sys.modules[__name__]))
    tests = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
    specs = {n for n, fn in vars(hookspecs).items() if hasattr(fn, f"{hookspecs.PROJECT_NAME}_spec")}
    assert specs == set(HOOK_NAMES)
    for hook in specs:
        covering = [t for t in tests if t.name.startswith(f"test_{hook}_")]
        assert covering, f"hook {hook} has no test named test_{hook}_*"
        for t in covering:
            asserts = [n for n in ast.walk(t) if isinstance(n, ast.Assert) or (isinstance(n, ast.With) and "raises" in ast.unparse(n))]
            assert asserts, f"{t.name} asserts nothing"
