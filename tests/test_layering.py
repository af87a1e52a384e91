"""The layering rule (docs/architecture.md): the core and the server never import or name a plugin,
and plugins import only `orcd_core` (never the server, never each other).

Checked on the sources' syntax trees: every import, and every string constant of the code (docstrings
and comments are prose and may name examples). Architecture names count as naming a plugin; the
tokenizer package is exempt from that part because "gpt2", "llama" and "qwen2" are also the names of
vocabulary types and pre-tokenizers (`tokenizer.ggml.model`, `tokenizer.ggml.pre`), which the core owns.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

from orcd_core.plugins import default_registry

ROOT = Path(__file__).resolve().parents[1]
CORE_AND_SERVER = [ROOT / "core/src/orcd_core", ROOT / "server/src/orcd_server"]
VOCABULARY_PACKAGE = ROOT / "core/src/orcd_core/tokenizer"


def _plugin_packages() -> dict[str, Path]:
    """Import name -> source folder of every plugin in the repository (built-in and the example)."""
    out = {}
    for src in [*ROOT.glob("plugins/*/src"), *ROOT.glob("examples/*/src")]:
        for pkg in src.iterdir():
            if (pkg / "__init__.py").is_file():
                out[pkg.name] = pkg
    return out


def _distribution_names() -> set[str]:
    names = set()
    for pyproject in [*ROOT.glob("plugins/*/pyproject.toml"), *ROOT.glob("examples/*/pyproject.toml")]:
        names.add(tomllib.loads(pyproject.read_text())["project"]["name"])
    return names


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def _code_strings(tree: ast.AST) -> list[tuple[int, str]]:
    """String constants that are not docstrings."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def _sources(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def test_the_rule_sees_every_plugin_and_architecture():
    assert {"orcd_llama_adapter", "orcd_gpt_adapter", "orcd_quant_q4k", "orcd_quant_mxfp4",
            "orcd_quant_legacy"} <= set(_plugin_packages())
    assert {"qwen2", "llama", "phi3", "gpt-oss", "gpt2"} <= set(default_registry().architectures)


@pytest.mark.parametrize("folder", CORE_AND_SERVER, ids=lambda p: p.name)
def test_core_and_server_never_import_or_name_a_plugin(folder):
    plugins = set(_plugin_packages())
    names = plugins | _distribution_names()
    archs = set(default_registry().architectures)
    found = []
    for path in _sources(folder):
        tree = ast.parse(path.read_text(), str(path))
        rel = path.relative_to(ROOT)
        for line, module in _imports(tree):
            if module.split(".")[0] in plugins:
                found.append(f"{rel}:{line}: imports {module}")
        for line, text in _code_strings(tree):
            if any(name in text for name in names):
                found.append(f"{rel}:{line}: names a plugin in {text!r:.80}")
            if text in archs and VOCABULARY_PACKAGE not in path.parents:
                found.append(f"{rel}:{line}: names the architecture {text!r}")
    assert not found, "the core and the server must not know their plugins:\n" + "\n".join(found)


@pytest.mark.parametrize("package", sorted(_plugin_packages()))
def test_plugins_import_only_orcd_core(package):
    own = _plugin_packages()[package]
    forbidden = (set(_plugin_packages()) - {package}) | {"orcd_server", "orcd_worker"}
    found = []
    for path in _sources(own):
        for line, module in _imports(ast.parse(path.read_text(), str(path))):
            if module.split(".")[0] in forbidden:
                found.append(f"{path.relative_to(ROOT)}:{line}: imports {module}")
    assert not found, "plugins import only orcd_core:\n" + "\n".join(found)


def test_the_check_catches_a_violation(tmp_path):
    """The scanners see an import, a from-import and a string constant, and skip docstrings."""
    tree = ast.parse('"""orcd_llama_adapter in a docstring"""\nimport orcd_quant_q4k.formats\n'
                     'from orcd_gpt_adapter import GptOss\nNAME = "gpt-oss"\n')
    assert [m for _l, m in _imports(tree)] == ["orcd_quant_q4k.formats", "orcd_gpt_adapter"]
    assert [s for _l, s in _code_strings(tree)] == ["gpt-oss"]
