"""Options shared by the commands that load a model (generate, logits): the model path (default:
the project's default test model), the backend (default: cuda when a GPU is usable; otherwise an
error that says to pass --backend reference: never a silent CPU fallback)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orcd_core.backends import BackendUnavailable, cuda_usable


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="path to a GGUF file (default: the default test model, fetched if needed)")
    parser.add_argument("--backend", choices=("reference", "cuda"), default=None,
                        help="where to run (default: cuda when a GPU is usable)")
    parser.add_argument("--gpu-device", type=int, default=0, metavar="N", help="CUDA device index (default 0)")
    parser.add_argument("--max-context", type=int, default=None, metavar="N",
                        help="serve at most N positions (default: the model's context length)")


def model_path(args: argparse.Namespace) -> Path:
    if args.model:
        return Path(args.model)
    from orcd_core.testmodels import default_model_path

    return default_model_path(progress=lambda msg: print(msg, file=sys.stderr))


def backend(args: argparse.Namespace) -> str:
    if args.backend:
        return args.backend
    if cuda_usable(args.gpu_device):
        return "cuda"
    raise BackendUnavailable("no usable CUDA GPU (or CuPy) here; pass --backend reference to run on the CPU")


def load_engine(args: argparse.Namespace):
    from orcd_core.engine import Engine

    return Engine.load(model_path(args), backend=backend(args), gpu_device=args.gpu_device,
                       max_context=args.max_context)
