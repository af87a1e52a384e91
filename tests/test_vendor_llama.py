"""scripts/vendor_llama.py trims the llama-cpp-python sdist's llama.cpp tree to what the benchmark
binaries (llama-bench, llama-batched-bench, llama-server) build from: checked on a small archive laid
out as the sdist is."""

from __future__ import annotations

import io
import tarfile

from repo_scripts import load_script


def _script():
    return load_script("vendor_llama")


KEPT = ["CMakeLists.txt", "ggml/src/ggml.c", "src/llama.cpp", "common/arg.cpp", "vendor/cpp-httplib/httplib.h",
        "tools/llama-bench/llama-bench.cpp", "tools/batched-bench/batched-bench.cpp", "tools/server/server.cpp",
        "tools/server/CMakeLists.txt", "tools/ui/CMakeLists.txt", "tools/ui/ui.h.in", "tools/ui/ui.cpp.in",
        "tools/ui/sources.cmake", "scripts/ui-assets.cmake"]
DROPPED = ["models/ggml-vocab-llama-spm.gguf", "docs/build.md", "tests/test-tokenizer-0.cpp", "examples/simple/simple.cpp",
           "tools/server/tests/unit/test_basic.py", "tools/server/bench/bench.py", "tools/ui/src/app.ts",
           "tools/ui/package-lock.json",
           "media/logo.png", ".github/workflows/build.yml"]


def test_the_trimmed_tree_keeps_what_the_benchmarks_build_from(tmp_path):
    sdist = tmp_path / "llama_cpp_python-0.0.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        for rel in KEPT + DROPPED + ["../outside.txt"]:
            name = f"llama_cpp_python-0.0.0/vendor/llama.cpp/{rel}" if not rel.startswith("..") else \
                "llama_cpp_python-0.0.0/llama_cpp/outside.py"
            data = f"// {rel}\n".encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    out = tmp_path / "llama.cpp.tgz"
    files, size = _script().trim(str(sdist), str(out))
    with tarfile.open(out) as tf:
        names = {m.name for m in tf.getmembers() if m.isfile()}
        assert tf.extractfile("llama.cpp/tools/server/server.cpp").read() == b"// tools/server/server.cpp\n"
    assert names == {f"llama.cpp/{rel}" for rel in KEPT}
    assert files == len(KEPT) and size == out.stat().st_size > 0
