"""Plugin discovery and the registries the core owns.

Every plugin, built-in or third-party, is a module named by an entry point of the group
`orcd_worker`. `load_plugins()` imports each one, lets it register through the hooks of
`orcd_core.hookspecs`, and returns a `Registry`. `ORCD_LOAD_PLUGINS` (a comma list of entry-point
or distribution names) restricts which entry points load. A plugin that fails to import is never
skipped silently: it is logged as an error and listed in `Registry.failed`, and `orcd-worker plugins`
reports it and exits 1.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Iterable

import pluggy
import structlog

from . import hookspecs
from .errors import PluginError

ENTRY_POINT_GROUP = "orcd_worker"
ENV_ALLOWLIST = "ORCD_LOAD_PLUGINS"

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
            "version": self.version,
            "architectures": sorted(self.architectures),
            "quant_types": self.quant_types,
            "tokenizers": sorted(self.tokenizers),
        }


@dataclass
class FailedPlugin:
    """An entry point that could not be imported or whose registration failed."""

    name: str
    value: str
    distribution: str | None
    error: str
    traceback: str


class Registry:
    """What the installed plugins provide. Resolved once at start-up."""

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
        for fmt in self.quant_formats.values():
            if fmt.name == name:
                return fmt
        return None

    def owner(self, kind: str, key: object) -> str | None:
        """Which plugin registered `key` in the registry `kind` ("quant", "arch", "tokenizer")."""
        return self._owner.get((kind, key))

    def describe_installed(self) -> str:
        """One line naming the loaded (and failed) plugins, for error messages."""
        parts = [f"{p.distribution or p.name} {p.version or ''}".strip() for p in self.plugins]
        text = ", ".join(parts) if parts else "none"
        if self.failed:
            text += "; failed to load: " + ", ".join(f"{f.name} ({f.error})" for f in self.failed)
        return text

    # -- registration -----------------------------------------------------------------------------

    def _register(self, kind: str, table: dict, key: object, obj: object, plugin: PluginInfo, label: str) -> None:
        if key in table:
            raise PluginError(
                f"plugin {plugin.name!r} registers {kind} {label!r}, which plugin "
                f"{self._owner[(kind, key)]!r} already registered"
            )
        table[key] = obj
        self._owner[(kind, key)] = plugin.name

    def _registrars(self, plugin: PluginInfo):
        def register_quant(fmt) -> None:
            for attr in ("ggml_type", "name", "block_size", "type_size", "dequantize_blocks"):
                if not hasattr(fmt, attr):
                    raise PluginError(f"plugin {plugin.name!r}: quant format {fmt!r} lacks {attr!r}")
            self._register("quant", self.quant_formats, int(fmt.ggml_type), fmt, plugin, fmt.name)
            plugin.quant_types.append(fmt.name)

        def register_arch(arch) -> None:
            if not getattr(arch, "name", None):
                raise PluginError(f"plugin {plugin.name!r}: architecture {arch!r} has no name")
            self._register("arch", self.architectures, arch.name, arch, plugin, arch.name)
            plugin.architectures.append(arch.name)

        def register_tokenizer(backend) -> None:
            if not getattr(backend, "kind", None):
                raise PluginError(f"plugin {plugin.name!r}: tokenizer backend {backend!r} has no kind")
            self._register("tokenizer", self.tokenizers, backend.kind, backend, plugin, backend.kind)
            plugin.tokenizers.append(backend.kind)

        return register_quant, register_arch, register_tokenizer


def _allowlist() -> set[str] | None:
    raw = os.environ.get(ENV_ALLOWLIST)
    if raw is None or not raw.strip():
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def _entry_points() -> Iterable[metadata.EntryPoint]:
    eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
    # one entry point per name; sorted for a stable order of registration and reporting
    seen: dict[str, metadata.EntryPoint] = {}
    for ep in eps:
        seen.setdefault(ep.name, ep)
    return [seen[name] for name in sorted(seen)]


def load_plugins(allow: Iterable[str] | None = None, extra_modules: Iterable[object] = ()) -> Registry:
    """Import every `orcd_worker` entry point (restricted by `allow`, else by `ORCD_LOAD_PLUGINS`)
    and collect what each registers. `extra_modules` are plugin objects registered in addition
    (tests use it for in-process plugins)."""
    allowed = set(allow) if allow is not None else _allowlist()
    registry = Registry()
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    registry.pm = pm

    candidates: list[tuple[str, str, str | None, str | None, Any]] = []
    for ep in _entry_points():
        dist = ep.dist.name if ep.dist is not None else None
        version = ep.dist.version if ep.dist is not None else None
        if allowed is not None and ep.name not in allowed and (dist or "") not in allowed:
            continue
        try:
            module = ep.load()
        except Exception as exc:  # reported, never swallowed
            failed = FailedPlugin(ep.name, ep.value, dist, f"{type(exc).__name__}: {exc}", traceback.format_exc())
            registry.failed.append(failed)
            log.error("plugin_import_failed", plugin=ep.name, module=ep.value, error=failed.error)
            continue
        candidates.append((ep.name, ep.value, dist, version, module))
    for i, module in enumerate(extra_modules):
        name = getattr(module, "__name__", f"extra-{i}")
        candidates.append((name, name, None, None, module))

    for name, value, dist, version, module in candidates:
        info = PluginInfo(name=name, module=value, distribution=dist, version=version)
        try:
            pm.register(module, name=name)
            reg_quant, reg_arch, reg_tok = registry._registrars(info)
            caller = pm.subset_hook_caller  # call each plugin's hooks alone, to attribute registrations
            others = [p for p in pm.get_plugins() if p is not module]
            caller("orcd_register_quant_formats", others)(register=reg_quant)
            caller("orcd_register_architectures", others)(register=reg_arch)
            caller("orcd_register_tokenizers", others)(register=reg_tok)
        except Exception as exc:
            if pm.is_registered(module):
                pm.unregister(module)
            failed = FailedPlugin(name, value, dist, f"{type(exc).__name__}: {exc}", traceback.format_exc())
            registry.failed.append(failed)
            log.error("plugin_register_failed", plugin=name, module=value, error=failed.error)
            continue
        registry.plugins.append(info)
    return registry


_default: Registry | None = None


def default_registry() -> Registry:
    """The process-wide registry, loaded on first use."""
    global _default
    if _default is None:
        _default = load_plugins()
    return _default
