"""`orcd-worker plugins [--json]`: which installed plugin provides which architectures, tensor types
and tokenizers, with versions, and every plugin that failed to load (then the exit status is 1).

JSON: a list with one object per plugin, `{"name", "version", "architectures", "quant_types",
"tokenizers", "entry_point", "module", "error"}`; `error` is null for a loaded plugin and the reason
for a failed one (whose lists are empty).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from orcd_core.plugins import ENV_ALLOWLIST, load_plugins


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "plugins",
        help="list the installed plugins and what each provides",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.set_defaults(func=run)


def as_json(registry) -> list[dict]:
    entries = []
    for p in registry.plugins:
        entries.append({**p.as_json(), "error": None})
    for f in registry.failed:
        entries.append({**f.as_json(), "architectures": [], "quant_types": [], "tokenizers": []})
    return entries


def run(args: argparse.Namespace) -> int:
    registry = load_plugins()
    if args.json:
        json.dump(as_json(registry), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for p in registry.plugins:
            print(f"{p.distribution or p.name} {p.version or '?'} (entry point {p.name!r}, module {p.module})")
            print(f"  architectures: {', '.join(sorted(p.architectures)) or '-'}")
            print(f"  quant types:   {', '.join(p.quant_types) or '-'}")
            print(f"  tokenizers:    {', '.join(sorted(p.tokenizers)) or '-'}")
        for f in registry.failed:
            print(f"FAILED {f.distribution or f.name} {f.version or ''} (entry point {f.name!r}, module {f.value}): {f.error}".replace("  ", " "))
    if registry.failed:
        restricted = f" ({ENV_ALLOWLIST} is set)" if ENV_ALLOWLIST in os.environ else ""
        print(f"orcd-worker plugins: error: {len(registry.failed)} plugin(s) failed to load{restricted}", file=sys.stderr)
        return 1
    return 0
