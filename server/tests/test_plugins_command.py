"""`orcd-worker plugins [--json]`: the five built-in plugins (plus the core), versions, failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from orcd_server.cli import main

BUILTIN = {
    "orcd-core": ({"F32", "F16", "BF16"}, set()),
    "orcd-quant-q4k": ({"Q4_K", "Q5_K", "Q6_K"}, set()),
    "orcd-quant-legacy": ({"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}, set()),
    "orcd-quant-mxfp4": ({"MXFP4"}, set()),
    "orcd-llama-adapter": (set(), {"qwen2", "llama", "phi3"}),
    "orcd-gpt-adapter": (set(), {"gpt-oss", "gpt2"}),
}


def test_plugins_json_lists_the_builtin_plugins(capsys, monkeypatch):
    monkeypatch.delenv("ORCD_LOAD_PLUGINS", raising=False)
    assert main(["plugins", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert isinstance(entries, list)
    by_name = {e["name"]: e for e in entries}
    for name, (quant, archs) in BUILTIN.items():
        e = by_name[name]
        assert {"name", "version", "architectures", "quant_types"} <= set(e)
        assert e["version"] == "0.1.0" and e["error"] is None
        assert set(e["quant_types"]) == quant, name
        assert set(e["architectures"]) == archs, name


def test_plugins_text(capsys, monkeypatch):
    monkeypatch.delenv("ORCD_LOAD_PLUGINS", raising=False)
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "orcd-quant-q4k 0.1.0" in out and "quant types:   Q4_K, Q5_K, Q6_K" in out and "FAILED" not in out


def test_plugins_reports_a_broken_plugin_and_exits_1(tmp_path: Path):
    info = tmp_path / "orcd_broken-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: orcd-broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[orcd_worker]\nbroken = orcd_broken_mod\n")
    (tmp_path / "orcd_broken_mod.py").write_text("import orcd_core.no_such_module\n")
    env = {k: v for k, v in os.environ.items() if k != "ORCD_LOAD_PLUGINS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "orcd_server.cli", "plugins"]
    proc = subprocess.run([*cmd, "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr
    entries = json.loads(proc.stdout)  # stdout is pure JSON: the error log goes to stderr
    broken = [e for e in entries if e["entry_point"] == "broken"]
    assert broken == [{
        "name": "orcd-broken", "entry_point": "broken", "module": "orcd_broken_mod", "version": "0.1",
        "error": "ModuleNotFoundError: No module named 'orcd_core.no_such_module'",
        "architectures": [], "quant_types": [], "tokenizers": [],
    }]
    assert {e["name"] for e in entries if e["error"] is None} >= set(BUILTIN)
    assert "plugin_import_failed" in proc.stderr and "1 plugin(s) failed to load" in proc.stderr
    assert "Traceback" not in proc.stderr

    text = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert text.returncode == 1
    assert "FAILED orcd-broken 0.1 (entry point 'broken', module orcd_broken_mod): ModuleNotFoundError" in text.stdout


def test_logging_after_an_in_process_command_survives_a_closed_stderr(monkeypatch, capsys):
    """main() points structlog at stderr; a later log line must go to the stderr of that moment, not
    to a stream that was current during main() and is closed since (pytest's capture, in a suite)."""
    import io

    from orcd_core.plugins import load_plugins

    stale = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stale)
    assert main(["plugins", "--json"]) == 0
    monkeypatch.undo()
    stale.close()
    registry = load_plugins(allow=["no-such-plugin"])  # logs an error
    assert [f.name for f in registry.failed] == ["no-such-plugin"]
    assert "plugin_not_found" in capsys.readouterr().err
