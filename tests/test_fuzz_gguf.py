"""scripts/fuzz_gguf.py in CI: 500 seeded mutations of the tiny models through the whole load path
(parse, support check, config, tokenizer + chat template, reference weight build, 2-token chat),
in a pool of 2 workers with a timer and a memory limit each; no defect allowed. About 10 s here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fuzz_gguf.py"


def _fuzz_module():
    """The script as module `fuzz_gguf`, importable by the pool's worker processes too."""
    if "fuzz_gguf" not in sys.modules:
        if str(SCRIPT.parent) not in sys.path:
            sys.path.append(str(SCRIPT.parent))
        spec = importlib.util.spec_from_file_location("fuzz_gguf", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["fuzz_gguf"] = module
        spec.loader.exec_module(module)
    return sys.modules["fuzz_gguf"]


def test_500_mutations_without_a_defect(tmp_path):
    fuzz = _fuzz_module()
    report = fuzz.fuzz(500, seed=0, workers=2, out=tmp_path / "defects", timeout_s=10.0, memory_mb=1024,
                       generate=True)
    assert report["clean"] + report["accepted"] + report["defect"] == 500
    assert report["defect"] == 0, report["defects"]
    # the mutations reach every stage: rejected by the parser, by the metadata checks, by the
    # tokenizer, and some files load and generate
    for kind in ("GGUFFormatError", "GGUFTensorError", "GGUFMetadataError", "GGUFVocabularyError"):
        assert report["clean_errors"].get(kind, 0) > 0, report["clean_errors"]
    assert report["accepted"] > 0


def test_mutations_are_deterministic():
    fuzz = _fuzz_module()
    assert [fuzz.mutate(7, i) for i in range(20)] == [fuzz.mutate(7, i) for i in range(20)]
    assert len({fuzz.mutate(7, i)[2] for i in range(20)}) == 20
