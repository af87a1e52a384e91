"""Suite-wide checks. `scripts/test` (the README's test command, CI's) sets ORCD_REQUIRE_ORACLE=1: the
oracle packages (llama-cpp-python, quicktok) are then required, so a broken install fails the run
instead of turning every oracle test into a skip.

`tests/support/` (test-support code that names architectures, such as the tiny-model GGUF builder,
which therefore cannot live in orcd_core: tests/test_layering.py) is importable from every suite."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest

ORACLES = ("llama_cpp", "quicktok")
sys.path.insert(0, str(Path(__file__).resolve().parent / "tests" / "support"))


def pytest_configure(config):
    if os.environ.get("ORCD_REQUIRE_ORACLE", "") in ("", "0"):
        return
    missing = []
    for name in ORACLES:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            missing.append(f"{name} ({exc})")
    if missing:
        raise pytest.UsageError("ORCD_REQUIRE_ORACLE=1 but the oracles cannot be imported: " + ", ".join(missing))
