"""Plugin discovery and the registries the core owns.

Every plugin, built-in or third-party, is a module named by an entry point of the group
`orcd_worker`. `load_plugins()` imports each one, lets it register through the hooks of
`orcd_core.hookspecs`, and returns a `Registry`.

- `ORCD_LOAD_PLUGINS` (a comma list of entry-point or distribution names) restricts which entry
  points load. The core's own plugin (entry point `core`: the float types) always loads. A name in
  the list that matches no installed entry point is reported as a failure (a typo must not silently
  remove a plugin).
- A plugin that fails to import, or whose registration fails (an exception in a hook, a malformed
  object, a name another plugin already registered, a hook implementation that matches no spec), is
  never skipped silently: it is logged as an error, listed in `Registry.failed`, none of what it
  registered is kept, and `orcd-worker plugins` reports it and exits 1.
- Hooks are called once, here; lookups afterwards are plain dict reads (no `pm.hook` on the token path).
"""

from __future__ import annotations

import os
import re
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Iterable

import pluggy
import structlog

from . import hookspecs
from .errors import PluginError

ENTRY_POINT_GROUP = "orcd_worker"
ENV_ALLOWLIST = "ORCD_LOAD_PLUGINS"
#: Set (to anything but "" or "0") to log every hook call, its plugin and what it registered.
ENV_TRACE = "ORCD_TRACE_PLUGINS"
#: Entry point of the core's own plugin; loaded even when `ORCD_LOAD_PLUGINS` does not name it.
CORE_PLUGIN = "core"
#: Every hook of `orcd_core.hookspecs`, in the order `load_plugins()` calls them.
HOOK_NAMES = (
    "orcd_register_quant_formats",
    "orcd_register_architectures",
    "orcd_register_tokenizers",
)

log = structlog.get_logger("orcd.plugins")


@dataclass
class PluginInfo:
    """One loaded plugin and what it registered."""

    name: str  # entry-point name
    module: str
    distribution: str | None
    version: str | None
    architectures: list[str] = field(default_factory=list)
    quant_types: list[str] = field(default_factory=list)
    tokenizers: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.distribution or self.name,
            "entry_point": self.name,
            "module": self.module,
            "version": self.version,
            "architectures": sorted(self.architectures),
            "quant_types": list(self.quant_types),
            "tokenizers": sorted(self.tokenizers),
        }


@dataclass
class FailedPlugin:
    """An entry point that could not be imported, or whose registration failed."""

    name: str
    value: str
    distribution: str | None
    error: str
    traceback: str
    version: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.distribution or self.name,
            "entry_point": self.name,
            "module": self.value,
            "version": self.version,
            "error": self.error,
        }


def _describe(obj: object) -> str:
    """A plugin object's class, for error messages (its repr may itself be broken)."""
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__} object"


def _normalize(name: str) -> str:
    """PEP 503 normalization, so `orcd_quant_legacy` and `orcd-quant-legacy` name the same thing."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _quant_geometry_table() -> dict[int, tuple[str, int, int]]:
    from .gguf_file import ggml_type_table

    return ggml_type_table()


class Registry:
    """What the installed plugins provide. Resolved once at start-up by `load_plugins()`."""

    def __init__(self) -> None:
        self.plugins: list[PluginInfo] = []
        self.failed: list[FailedPlugin] = []
        self.quant_formats: dict[int, Any] = {}  # ggml type id -> QuantFormat
        self.architectures: dict[str, Any] = {}  # general.architecture -> Architecture
        self.tokenizers: dict[str, Any] = {}  # kind -> TokenizerBackend
        self._owner: dict[tuple[str, object], str] = {}
        self.pm: pluggy.PluginManager | None = None

    # -- lookups ----------------------------------------------------------------------------------

    def quant_format(self, ggml_type: int):
        """The format object for a GGML type id, or None."""
        return self.quant_formats.get(int(ggml_type))

    def quant_format_by_name(self, name: str):
        """The format object whose GGML type name is `name` (e.g. "Q4_K"), or None."""
        for fmt in self.quant_formats.values():
            if fmt.name == name:
                return fmt
        return None

    def architecture(self, name: str):
        """The adapter for a GGUF `general.architecture` value, or None."""
        return self.architectures.get(name)

    def tokenizer(self, kind: str):
        """The tokenizer backend of a kind (e.g. "gguf-bpe"), or None."""
        return self.tokenizers.get(kind)

    def owner(self, kind: str, key: object) -> str | None:
        """Which plugin (entry-point name) registered `key` in the registry `kind`
        ("quant": a GGML type id, "arch": an architecture name, "tokenizer": a kind)."""
        return self._owner.get((kind, key))

    def describe_installed(self) -> str:
        """One line naming the loaded (and failed) plugins, for error messages."""
        parts = [f"{p.distribution or p.name} {p.version or ''}".strip() for p in self.plugins]
        text = ", ".join(parts) if parts else "none"
        if self.failed:
            text += "; failed to load: " + ", ".join(f"{f.name} ({f.error})" for f in self.failed)
        return text

    def raise_for_failures(self) -> None:
        """Raise one `PluginError` naming every plugin that failed to load (for callers that must
        not run with a plugin missing, e.g. the server at start-up)."""
        if self.failed:
            details = "; ".join(f"{f.name} ({f.value}): {f.error}" for f in self.failed)
            raise PluginError(f"{len(self.failed)} plugin(s) failed to load: {details}")

    # -- registration (all-or-nothing per plugin) -----------------------------------------------

    def _commit(self, plugin: PluginInfo, staged: list[tuple[str, dict, object, object, str]]) -> None:
        for kind, table, key, obj, label in staged:
            table[key] = obj
            self._owner[(kind, key)] = plugin.name
        self.plugins.append(plugin)

    def _registrars(self, plugin: PluginInfo, staged: list) -> dict[str, Callable[[object], None]]:
        """The `register` callbacks handed to one plugin's hooks. They validate each object and
        stage it; `_commit` publishes the whole plugin once all its hooks have succeeded."""
        staged_keys: set[tuple[str, object]] = set()

        def stage(kind: str, table: dict, key: object, obj: object, label: str) -> None:
            if key in table:
                raise PluginError(
                    f"plugin {plugin.name!r} registers {kind} {label!r}, which plugin "
                    f"{self._owner[(kind, key)]!r} already registered"
                )
            if (kind, key) in staged_keys:
                raise PluginError(f"plugin {plugin.name!r} registers {kind} {label!r} twice")
            staged_keys.add((kind, key))
            staged.append((kind, table, key, obj, label))

        def register_quant(fmt) -> None:
            for attr in ("ggml_type", "name", "block_size", "type_size", "dequantize_blocks"):
                if not hasattr(fmt, attr):
                    raise PluginError(f"plugin {plugin.name!r}: quant format {_describe(fmt)} lacks {attr!r}")
            type_id, name = fmt.ggml_type, fmt.name
            if isinstance(type_id, bool) or not isinstance(type_id, int) or not isinstance(name, str):
                raise PluginError(f"plugin {plugin.name!r}: quant format {_describe(fmt)} needs an int ggml_type and a str name")
            known = _quant_geometry_table().get(type_id)
            if known is None:
                # open_gguf() sizes and validates every tensor from gguf-py's type table and rejects
                # ids it lacks, so no file could ever use such a format: refuse it here.
                raise PluginError(
                    f"plugin {plugin.name!r}: quant format {name!r} has GGML type id {type_id}, "
                    "which gguf-py does not know (formats must implement a GGML type of gguf.GGMLQuantizationType)"
                )
            expected = (known[0], known[1], known[2])
            got = (name, fmt.block_size, fmt.type_size)
            if got != expected:
                raise PluginError(
                    f"plugin {plugin.name!r}: quant format for GGML type id {type_id} declares "
                    f"name/block_size/type_size {got}, expected {expected} (gguf-py's table)"
                )
            stage("quant", self.quant_formats, type_id, fmt, name)
            plugin.quant_types.append(name)

        def register_arch(arch) -> None:
            name = getattr(arch, "name", None)
            if not isinstance(name, str) or not name:
                raise PluginError(f"plugin {plugin.name!r}: architecture {_describe(arch)} has no name")
            required = getattr(arch, "required_metadata", {})
            if not isinstance(required, dict):
                raise PluginError(f"plugin {plugin.name!r}: architecture {name!r}: required_metadata must be a dict")
            stage("arch", self.architectures, name, arch, name)
            plugin.architectures.append(name)

        def register_tokenizer(backend) -> None:
            kind = getattr(backend, "kind", None)
            if not isinstance(kind, str) or not kind:
                raise PluginError(f"plugin {plugin.name!r}: tokenizer backend {_describe(backend)} has no kind")
            for method in ("applies", "load"):
                if not callable(getattr(backend, method, None)):
                    raise PluginError(f"plugin {plugin.name!r}: tokenizer backend {kind!r} lacks the method {method!r}")
            stage("tokenizer", self.tokenizers, kind, backend, kind)
            plugin.tokenizers.append(kind)

        return {
            "orcd_register_quant_formats": register_quant,
            "orcd_register_architectures": register_arch,
            "orcd_register_tokenizers": register_tokenizer,
        }


def _allowlist() -> set[str] | None:
    """`ORCD_LOAD_PLUGINS` as a set of normalized names; None when unset (load everything). Set
    but empty means: only the core's own plugin."""
    raw = os.environ.get(ENV_ALLOWLIST)
    if raw is None:
        return None
    return {_normalize(part.strip()) for part in raw.split(",") if part.strip()}


def _entry_points() -> tuple[list[metadata.EntryPoint], list[tuple[metadata.EntryPoint, metadata.EntryPoint]]]:
    """The group's entry points, one per name, sorted (a stable order of registration and reporting),
    and the `(dropped, kept)` pairs where two distributions use the same entry-point name (the first
    on sys.path wins, as for imports; the other is reported, not silently ignored)."""
    seen: dict[str, metadata.EntryPoint] = {}
    clashes = []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in seen:
            clashes.append((ep, seen[ep.name]))
        else:
            seen[ep.name] = ep
    return [seen[name] for name in sorted(seen)], clashes


def _dist_of(ep: metadata.EntryPoint) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    return dist.name, dist.version


def _failure(name: str, value: str, dist: str | None, version: str | None, exc: BaseException, event: str) -> FailedPlugin:
    failed = FailedPlugin(name, value, dist, f"{type(exc).__name__}: {exc}", traceback.format_exc(), version)
    log.error(event, plugin=name, module=value, distribution=dist, error=failed.error)
    return failed


def load_plugins(allow: Iterable[str] | None = None, extra_modules: Iterable[object] = ()) -> Registry:
    """Import every `orcd_worker` entry point (restricted by `allow`, else by `ORCD_LOAD_PLUGINS`)
    and collect what each registers. `extra_modules` are plugin objects (modules or instances with
    `@hookimpl` functions) registered after the entry points; tests use it for in-process plugins."""
    allowed = {_normalize(a) for a in allow} if allow is not None else _allowlist()
    registry = Registry()
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    registry.pm = pm
    if os.environ.get(ENV_TRACE, "") not in ("", "0"):
        _enable_tracing(pm)

    candidates: list[tuple[str, str, str | None, str | None, Any]] = []
    matched: set[str] = set()
    entry_points, clashes = _entry_points()
    for dropped, kept in clashes:
        dist, version = _dist_of(dropped)
        exc = PluginError(
            f"entry point name {dropped.name!r} ({dropped.value}) is also used by "
            f"{_dist_of(kept)[0] or '?'} ({kept.value}), which was loaded instead"
        )
        registry.failed.append(FailedPlugin(dropped.name, dropped.value, dist, f"PluginError: {exc}", "", version))
        log.error("plugin_name_clash", plugin=dropped.name, module=dropped.value, distribution=dist, error=str(exc))
    for ep in entry_points:
        dist, version = _dist_of(ep)
        keys = {_normalize(ep.name)} | ({_normalize(dist)} if dist else set())
        if allowed is not None and ep.name != CORE_PLUGIN and not (keys & allowed):
            continue
        matched |= keys
        try:
            module = ep.load()
        except BaseException as exc:  # reported, never swallowed (SystemExit from a plugin included)
            if isinstance(exc, KeyboardInterrupt):
                raise
            registry.failed.append(_failure(ep.name, ep.value, dist, version, exc, "plugin_import_failed"))
            continue
        candidates.append((ep.name, ep.value, dist, version, module))
    if allowed is not None:
        for name in sorted(allowed - matched):
            exc = PluginError(f"{ENV_ALLOWLIST} names {name!r}, but no installed entry point or distribution has that name")
            registry.failed.append(FailedPlugin(name, "", None, f"{type(exc).__name__}: {exc}", ""))
            log.error("plugin_not_found", plugin=name, error=str(exc))
    for i, module in enumerate(extra_modules):
        name = getattr(module, "__name__", None) or f"extra-{i}"
        candidates.append((name, name, None, None, module))

    for name, value, dist, version, module in candidates:
        info = PluginInfo(name=name, module=value, distribution=dist, version=version)
        staged: list = []
        try:
            pm.register(module, name=name)
            _check_hookimpls(pm, module, name)
            registrars = registry._registrars(info, staged)
            others = [p for p in pm.get_plugins() if p is not module]
            for hook_name in HOOK_NAMES:  # each plugin's hooks alone, to attribute registrations
                pm.subset_hook_caller(hook_name, others)(register=registrars[hook_name])
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            if pm.is_registered(module):
                pm.unregister(module)
            registry.failed.append(_failure(name, value, dist, version, exc, "plugin_register_failed"))
            continue
        registry._commit(info, staged)
    return registry


def _enable_tracing(pm: pluggy.PluginManager) -> None:
    """Log each hook call with the plugins it reaches (a plugin author's first debugging aid)."""

    def before(hook_name, impls, kwargs):
        log.info("plugin_hook_call", hook=hook_name, plugins=[impl.plugin_name for impl in impls])

    def after(outcome, hook_name, impls, kwargs):
        exc = outcome.exception
        log.info("plugin_hook_done", hook=hook_name, plugins=[impl.plugin_name for impl in impls],
                 error=None if exc is None else f"{type(exc).__name__}: {exc}")

    pm.add_hookcall_monitoring(before, after)


def _check_hookimpls(pm: pluggy.PluginManager, module: object, name: str) -> None:
    """A function marked `@hookimpl` whose name matches no hookspec (a typo such as
    `orcd_register_quant_format`) would never be called; make it an error instead."""
    unknown = [
        impl.function.__name__
        for hook_caller in pm.get_hookcallers(module) or []
        if not hook_caller.has_spec()
        for impl in hook_caller.get_hookimpls()
        if impl.plugin is module
    ]
    if unknown:
        raise PluginError(
            f"plugin {name!r} implements {', '.join(sorted(unknown))}, which is not a hook of orcd-worker "
            f"(hooks: {', '.join(HOOK_NAMES)})"
        )


_default: Registry | None = None


def default_registry() -> Registry:
    """The process-wide registry, loaded on first use."""
    global _default
    if _default is None:
        _default = load_plugins()
    return _default
