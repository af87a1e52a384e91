"""A plugin a user adds with `uv pip install` survives the project's own commands (docs/writing_plugins.md,
"Keeping your plugin installed"): the `uv sync` line of `scripts/test` and `uv run` keep it, while a
plain (exact) `uv sync` removes it, which is why every sync the project documents passes `--inexact`.

The end-to-end case runs the real commands against a scratch environment (UV_PROJECT_ENVIRONMENT, so
the workspace's own `.venv` is never touched), offline from uv's cache (the workspace's sync filled it):
about ten seconds."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from test_example_plugin import EXAMPLE, ROOT, uv_executable

SCRIPT = ROOT / "scripts" / "test"


def script_sync_commands() -> list[list[str]]:
    """The `uv sync` command lines of scripts/test, as argument lists (the offline one first)."""
    commands = []
    for line in SCRIPT.read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("uv sync"):
            commands.append(shlex.split(line.split("||")[0]))
    return commands


def documented_sync_commands() -> list[str]:
    """Every `uv sync ...` in backticks or a code block of the README and the docs."""
    found = []
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), EXAMPLE / "README.md"]
    for page in pages:
        for match in re.finditer(r"uv sync[^`\n&|#]*", page.read_text(encoding="utf-8")):
            found.append(f"{page.relative_to(ROOT)}: {match.group(0).strip()}")
    return found


def test_scripts_and_docs_sync_inexactly():
    commands = script_sync_commands()
    assert len(commands) == 2 and "--offline" in commands[0], commands  # offline first, then the network
    for cmd in commands:
        assert "--inexact" in cmd, f"scripts/test runs {shlex.join(cmd)}, which would uninstall a user's plugins"
    documented = documented_sync_commands()
    assert documented, "the README documents the sync command"
    # an exact sync is shown on purpose only where the docs explain that it removes the plugin ("a plain `uv sync`")
    exact = [d for d in documented if "--inexact" not in d and not d.endswith(": uv sync")]
    assert exact == [], exact


def _env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "ORCD_LOAD_PLUGINS")}
    env["UV_PROJECT_ENVIRONMENT"] = str(venv)
    return env


def _run(cmd: list, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _plugins(cmd: list, env: dict[str, str]) -> set[str]:
    return {entry["name"] for entry in json.loads(_run(cmd, env).stdout)}


@pytest.mark.slow
def test_user_plugin_survives_the_scripts_sync_and_uv_run(tmp_path):
    uv = uv_executable()
    venv = tmp_path / "venv"
    env = _env(venv)
    lock = (ROOT / "uv.lock").read_bytes()
    sync = [uv, *script_sync_commands()[0][1:]]  # exactly scripts/test's offline sync, with this uv
    orcd_worker_plugins = [venv / "bin" / "orcd-worker", "plugins", "--json"]

    _run(sync, env)  # the environment scripts/test builds
    assert "orcd-quant-example" not in _plugins(orcd_worker_plugins, env)
    # the documented install (docs/writing_plugins.md: `uv pip install ./orcd-quant-yourformat`), into that environment
    _run([uv, "pip", "install", "--offline", "--python", venv / "bin" / "python", EXAMPLE], env)
    assert "orcd-quant-example" in _plugins(orcd_worker_plugins, env)

    _run(sync, env)  # the next scripts/test run
    assert "orcd-quant-example" in _plugins(orcd_worker_plugins, env)
    # the README's way to run the worker: `uv run orcd-worker ...` (syncs, inexactly, before it runs)
    assert "orcd-quant-example" in _plugins([uv, "run", "--offline", "orcd-worker", "plugins", "--json"], env)

    # the control: a plain, exact sync does uninstall it
    exact = _run([arg for arg in sync if arg != "--inexact"], env)
    assert "- orcd-quant-example==0.1.0" in exact.stderr, exact.stderr
    assert "orcd-quant-example" not in _plugins(orcd_worker_plugins, env)
    assert (ROOT / "uv.lock").read_bytes() == lock  # the workspace's lockfile is left as it was
