"""`orcd-worker` — the command line. Each subcommand lives in `orcd_server.commands.<name>` and
provides `add_parser(subparsers)` and `run(args) -> int`. Expected errors print one line and exit 1."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import structlog

from orcd_core.errors import OrcdError

from .commands._model_args import merge_model

COMMANDS = ("serve", "generate", "logits", "inspect", "tokenize", "bench", "plugins", "synth", "models")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orcd-worker", description="Single-GPU GGUF inference worker")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"orcd_server.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"orcd_server.commands.{name}":
                continue  # command not written yet
            raise
        module.add_parser(sub)
    return parser


def _log_to_stderr() -> None:
    """Logs go to stderr, so that stdout carries only a command's output (`plugins --json`, ...).
    A command that wants another set-up (e.g. `serve`, JSON logs) reconfigures structlog itself."""
    if not structlog.is_configured():
        structlog.configure(logger_factory=_stderr_logger)


def _stderr_logger(*args) -> structlog.PrintLogger:
    # sys.stderr is looked up when a logger is made, not when structlog is configured: main() may run
    # in-process (tests) where sys.stderr is a capture that is closed later.
    return structlog.PrintLogger(sys.stderr)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        return _closed_pipe()


def _main(argv: list[str] | None) -> int:
    _log_to_stderr()
    parser = build_parser()
    args = parser.parse_args(argv)  # --help included: inside main's BrokenPipeError guard
    merge_model(args)
    try:
        return int(args.func(args) or 0)
    except OrcdError as exc:
        print(f"orcd-worker {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _closed_pipe() -> int:
    """stdout went to a reader that stopped reading (`orcd-worker plugins --json | head`): exit
    quietly with the status of a process killed by SIGPIPE (128 + 13), as `cat` would; stdout is
    pointed at /dev/null so that the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141


if __name__ == "__main__":
    sys.exit(main())
