#!/usr/bin/env python3
"""Write `.vendor/llama.cpp.tgz`: the llama.cpp source tree of the llama-cpp-python sdist the oracle
pins (`orcd_core.testmodels.LLAMA_CPP_VERSION`), trimmed to what llama-bench, llama-batched-bench and
llama-server build from, for the GPU machine (its checkout travels with at most 64 MiB, and it has no
network).

    python3 scripts/vendor_llama.py [--sdist FILE] [--out .vendor/llama.cpp.tgz]

Left out: the test models and docs (most of the sdist's 176 MB), tests, examples, benches, media, the
server's tests and bench scripts, and the web UI's sources (`tools/ui`, but for its build files:
with no UI assets and no network, llama-server builds without an embedded UI, which the benchmarks
do not use). `scripts/bench_vs_llama.py` builds from the tarball.
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
from pathlib import Path, PurePosixPath

ROOT = "vendor/llama.cpp"
# top-level parts of the tree, and parts of tools/, that no benchmark binary builds from
DROP_TOP = {"models", "docs", "tests", "examples", "benches", "media", "pocs", ".github", ".devops", "app"}
DROP_UNDER = ("tools/server/tests", "tools/server/bench", "tools/ui/")
# the web UI's build files (its CMake target embeds whatever assets there are: none here)
KEEP = ("tools/ui/CMakeLists.txt", "tools/ui/sources.cmake", "tools/ui/ui.h.in", "tools/ui/ui.cpp.in")


def keep(rel: PurePosixPath) -> bool:
    """Whether a path of the llama.cpp tree (relative to its root) goes into the tarball."""
    s = rel.as_posix()
    if s in KEEP:
        return True
    if rel.parts and rel.parts[0] in DROP_TOP:
        return False
    return not any(s == d.rstrip("/") or s.startswith(d.rstrip("/") + "/") for d in DROP_UNDER)


def trim(sdist: str, out: str) -> tuple[int, int]:
    """Copy the kept files of the sdist's llama.cpp tree into `out` (gzip tar, top folder `llama.cpp/`).
    Returns (files, bytes written)."""
    n = 0
    with tarfile.open(sdist) as src, tarfile.open(out, "w:gz") as dst:
        for m in src.getmembers():
            parts = PurePosixPath(m.name).parts
            # <package>-<version>/vendor/llama.cpp/...
            if len(parts) < 4 or "/".join(parts[1:3]) != ROOT or not (m.isfile() or m.isdir()):
                continue
            rel = PurePosixPath(*parts[3:])
            if not keep(rel):
                continue
            m2 = tarfile.TarInfo("llama.cpp/" + rel.as_posix())
            m2.mode, m2.mtime, m2.type, m2.size = m.mode, m.mtime, m.type, m.size
            data = src.extractfile(m) if m.isfile() else None
            dst.addfile(m2, io.BytesIO(data.read()) if data is not None else None)
            n += m.isfile()
    return n, Path(out).stat().st_size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sdist", default=None, help="the llama-cpp-python sdist (default: fetched once into the "
                                                   "test-model cache, as the vocab tests do)")
    ap.add_argument("--out", default=".vendor/llama.cpp.tgz")
    args = ap.parse_args()
    sdist = args.sdist
    if sdist is None:
        from orcd_core import testmodels

        sdist = str(testmodels.fetch_archive(testmodels.LLAMA_CPP_PACKAGE, testmodels.LLAMA_CPP_VERSION, "sdist"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    files, size = trim(sdist, args.out)
    print(f"{args.out}: {files} files, {size / 2**20:.1f} MiB (from {sdist})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
