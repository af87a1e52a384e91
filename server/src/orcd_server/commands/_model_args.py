"""Options shared by the commands that load a model: the model, named the same way in every
subcommand (`MODEL` positional or `--model/-m MODEL`; `cli.main` merges the two into `args.model`),
and for generate and logits the backend (default: cuda; without a usable GPU an error that says to
pass --backend reference: never a silent CPU fallback)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orcd_core.backends import BackendUnavailable, cuda_usable


MODEL_DEFAULT_HELP = "default: the Qwen2.5 test model, fetched and verified on first use"
BACKEND_HELP = "cuda (default; needs an NVIDIA GPU) or reference (NumPy on the CPU, slow); never chosen for you"


def add_model_arg(parser: argparse.ArgumentParser, help: str, *, required: bool) -> None:
    """`MODEL` (positional) or `--model/-m MODEL`, one of them; `required` without a default model."""
    parser.add_argument("model_pos", nargs="?", metavar="MODEL", help=help)
    parser.add_argument("--model", "-m", dest="model_opt", metavar="MODEL", help="the same as MODEL")
    parser.set_defaults(model_required=required, model_parser=parser)


def merge_model(args: argparse.Namespace) -> None:
    """Called by cli.main after parsing: `args.model` = MODEL or --model (a usage error when both
    name different files, or when a required model is missing)."""
    if not hasattr(args, "model_pos"):
        return
    pos, opt = args.model_pos, args.model_opt
    if pos and opt and pos != opt:
        args.model_parser.error(f"MODEL {pos!r} and --model {opt!r} differ; give one")
    args.model = pos or opt
    if args.model is None and args.model_required:
        args.model_parser.error("a model is required: MODEL or --model/-m MODEL")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    add_model_arg(parser, f"path to a GGUF file ({MODEL_DEFAULT_HELP})", required=False)
    parser.add_argument("--backend", choices=("reference", "cuda"), default=None, help=BACKEND_HELP)
    parser.add_argument("--gpu-device", type=int, default=0, metavar="N", help="CUDA device index (default 0)")
    parser.add_argument("--max-context", type=int, default=None, metavar="N",
                        help="serve at most N positions (default: the model's context length)")


def model_path(args: argparse.Namespace) -> Path:
    if args.model:
        return Path(args.model)
    from orcd_core.testmodels import default_model_path

    from ..logging import DownloadProgress

    shown = DownloadProgress(sys.stderr)
    try:
        return default_model_path(progress=shown.line, on_bytes=shown.bytes)
    finally:
        shown.close()


def backend(args: argparse.Namespace) -> str:
    if args.backend:
        return args.backend
    if cuda_usable(args.gpu_device):
        return "cuda"
    raise BackendUnavailable("no usable CUDA GPU (or CuPy) here; pass --backend reference to run on the CPU (slow); "
                             "the worker never falls back by itself")


def load_engine(args: argparse.Namespace):
    from orcd_core.engine import Engine

    return Engine.load(model_path(args), backend=backend(args), gpu_device=args.gpu_device,
                       max_context=args.max_context)
