"""The command line's rough edges (issue 14): one way to name the model in every subcommand, one set
of sampling defaults shared with the HTTP API, help texts that are true, a quiet exit into a closed
pipe, and the example client's usage line."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from orcd_core import testmodels
from orcd_core.generation import SamplingParams
from orcd_server import schemas
from orcd_server.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
VOCAB = "ggml-vocab-phi-3.gguf"


def test_model_positional_or_option_in_every_model_command():
    parser = build_parser()
    for command in ("serve", "generate", "logits", "inspect", "tokenize", "bench"):
        sub = parser._subparsers._group_actions[0].choices[command]  # the subcommand's own parser
        options = {o for a in sub._actions for o in a.option_strings}
        positionals = [a.metavar for a in sub._actions if not a.option_strings]
        assert {"--model", "-m"} <= options and "MODEL" in positionals, command


def test_model_as_option_positional_and_conflict(capsys):
    vocab = str(testmodels.llama_cpp_models_dir() / VOCAB)
    assert main(["tokenize", vocab, "--text", "hello", "--json"]) == 0
    by_position = capsys.readouterr().out
    assert main(["tokenize", "-m", vocab, "--text", "hello", "--json"]) == 0
    assert capsys.readouterr().out == by_position
    with pytest.raises(SystemExit) as info:
        main(["tokenize", vocab, "--model", vocab + "x", "--text", "hello"])
    assert info.value.code == 2 and "differ" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["inspect"])
    assert info.value.code == 2 and "a model is required" in capsys.readouterr().err


def test_one_set_of_sampling_defaults():
    defaults = SamplingParams()
    native = msgspec.json.decode(b'{"job_id": "j", "prompt": "p"}', type=schemas.ExecuteRequest)
    args = build_parser().parse_args(["generate", "--prompt", "p"])
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty"):
        assert getattr(native, name) == getattr(args, name) == getattr(defaults, name), name
    assert args.repeat_last_n == defaults.repetition_window


def test_help_texts_are_true():
    parser = build_parser()
    for command, sub in parser._subparsers._group_actions[0].choices.items():
        text = sub.format_help()
        assert "DESIGN.md" not in text and "ENGINE.md" not in text, command
        assert "when a GPU is usable" not in text, command  # no hint at a CPU fallback that does not exist


def _closed_pipe_run(args):
    proc = subprocess.Popen([sys.executable, "-m", "orcd_server.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first byte (`| head -0`)
    code = proc.wait(60)
    return code, proc.stderr.read().decode()


@pytest.mark.parametrize("args", [["plugins", "--json"], ["plugins"], ["--help"]])
def test_closed_pipe_is_quiet(args):
    code, err = _closed_pipe_run(args)
    assert err == "" and code in (0, 141), (code, err)


def test_sse_client_prints_usage(capsys):
    spec = importlib.util.spec_from_file_location("sse_client_usage", ROOT / "examples" / "sse_client.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["sse_client.py"]) == 2
    assert capsys.readouterr().err.startswith("usage: ")
