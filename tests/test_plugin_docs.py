"""docs/plugin_hooks.md documents every hook of orcd_core.hookspecs, with its exact signature."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from orcd_core import hookspecs
from orcd_core.plugins import HOOK_NAMES

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugin_hooks.md"


def hookspec_functions() -> dict[str, object]:
    marker = f"{hookspecs.PROJECT_NAME}_spec"
    return {name: fn for name, fn in vars(hookspecs).items() if callable(fn) and hasattr(fn, marker)}


def documented_sections() -> dict[str, tuple[str, str]]:
    """Hook name -> (signature as written in the heading, section body)."""
    text = DOC.read_text(encoding="utf-8")
    sections = {}
    parts = re.split(r"^## ", text, flags=re.M)
    for part in parts[1:]:
        heading, _, body = part.partition("\n")
        m = re.fullmatch(r"`(\w+)(\(.*\))`", heading.strip())
        if m:
            sections[m.group(1)] = (m.group(2), body)
    return sections


def test_hookspecs_are_found():
    # guards the two tests below against passing vacuously
    assert set(hookspec_functions()) == set(HOOK_NAMES)
    assert len(HOOK_NAMES) == 3


@pytest.mark.parametrize("name", sorted(hookspec_functions()))
def test_hook_is_documented_with_its_signature(name):
    sections = documented_sections()
    assert name in sections, f"docs/plugin_hooks.md has no '## `{name}(...)`' section"
    documented_sig, body = sections[name]
    spec = hookspec_functions()[name]
    params = ", ".join(inspect.signature(spec).parameters)
    assert documented_sig == f"({params})", f"{name}: documented as {documented_sig}, spec is ({params})"
    for label in ("**Called:**", "**Argument:**", "**Returns:**"):
        assert label in body, f"{name}: section lacks {label}"
    example = re.search(r"```python\n(.*?)```", body, flags=re.S)
    assert example, f"{name}: section has no Python example"
    assert f"def {name}(" in example.group(1), f"{name}: example does not implement the hook"
    compile(example.group(1), f"<docs example of {name}>", "exec")  # the example is valid Python


def test_no_documented_hook_is_missing_from_the_specs():
    stale = set(documented_sections()) - set(hookspec_functions())
    assert not stale, f"docs/plugin_hooks.md documents hooks that do not exist: {sorted(stale)}"


@pytest.mark.parametrize("name", sorted(hookspec_functions()))
def test_hookspec_has_a_one_line_docstring(name):
    doc = inspect.getdoc(hookspec_functions()[name])
    assert doc and "\n" not in doc.strip(), f"{name}: hookspec needs a one-line docstring (details go in the docs)"
