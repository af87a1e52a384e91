"""The README opens with the serve and test commands, and CI runs exactly the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text, flags=re.S)
    assert block and text.index(block.group(0)) < 40, "the README must open with its commands"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_serve_and_test():
    commands = readme_commands()
    assert "uv run orcd-worker serve --backend reference" in commands
    assert any("serve --backend cuda" in c and "--extra cuda13" in c for c in commands)
    assert "scripts/test" in commands


def test_ci_runs_the_readmes_test_command():
    test_command = next(c for c in readme_commands() if "serve" not in c)
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip() and not line.strip().startswith("#")]
    assert ci[0] == "set -euo pipefail"
    assert ci[-1] == test_command
    script = (ROOT / "scripts" / "test").read_text()
    assert "uv sync --all-packages --group oracle --inexact\n" in script  # the online fallback, exactly
    assert 'uv run --no-sync pytest -m "not gpu" "$@"' in script
    for path in (ROOT / ".ci" / "run", ROOT / "scripts" / "test"):
        assert path.stat().st_mode & 0o111, f"{path} is not executable"


def test_relative_links_in_readme_and_docs_exist():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "examples" / "orcd-quant-example" / "README.md"]
    for page in pages:
        for target in re.findall(r"\]\(([^)#]+)\)", page.read_text(encoding="utf-8")):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"


def test_curl_examples_send_json():
    """Every curl example with a body says it is JSON: curl's -d alone sends
    application/x-www-form-urlencoded, which the worker answers with 415 (found on a fresh clone)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    n = 0
    for page in pages:
        text = page.read_text(encoding="utf-8").replace("\\\n", " ")
        for line in text.splitlines():
            if "curl " in line and (" -d " in line or " --data" in line):
                n += 1
                assert "Content-Type: application/json" in line, f"{page.relative_to(ROOT)}: {line.strip()}"
    assert n >= 3
