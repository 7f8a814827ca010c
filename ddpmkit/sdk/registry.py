"""Plugin discovery and the component registry.

Plugins come from the setuptools entry-point group ``ddpmkit`` (ddpmkit's own
built-ins too) or are registered in-process with :func:`register_plugin`.
``DDPMKIT_PLUGINS`` (comma-separated entry-point names, or plugin module names)
restricts which entry-point plugins load; set it to an empty string to load none.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.metadata
import inspect
import os
import warnings
from collections.abc import Callable
from typing import Any

import attrs
import pluggy

from ddpmkit.errors import DdpmkitError, PluginError
from ddpmkit.sdk import hookspecs
from ddpmkit.sdk.kinds import KIND_BY_HOOK, KIND_TABLE, KINDS
from ddpmkit.sdk.options import build_config

ENV_VAR = "DDPMKIT_PLUGINS"
BUILTIN_DIST = "ddpmkit"


def takes_keyword(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` names the parameter ``name`` (False when its signature cannot be read)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def accepted_context(factory: Callable[..., Any], context: dict[str, Any]) -> dict[str, Any]:
    """The part of ``context`` that ``factory`` takes: the keywords it names, or all with ``**kw``."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return context
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return context
    return {k: v for k, v in context.items() if k in params}


@attrs.frozen
class Component:
    """One registered component: what ``register(...)`` was called with, and who registered it."""

    kind: str
    name: str
    factory: Callable[..., Any]
    config_class: type | None
    description: str
    plugin: str
    version: str | None
    dist: str | None = None

    def build_config(self, options: dict[str, Any] | None = None) -> Any:
        """This component's config (attrs class or dataclass) from ``options``, validated."""
        return build_config(self, options or {})

    def build(self, options: dict[str, Any] | None = None, *, config: Any = None, **context: Any) -> Any:
        """``factory(config, **context)``: ``config`` as given, else built from ``options``. The factory
        gets the context keywords it names; a component without a config class gets no config."""
        if config is None:
            config = self.build_config(options)
        context = accepted_context(self.factory, context)
        return self.factory(config, **context) if self.config_class is not None else self.factory(**context)

    def label(self) -> str:
        """``kind 'name' (plugin P, distribution D)``: how messages name this component."""
        where = f"plugin '{self.plugin}'" + (f", distribution '{self.dist}'" if self.dist else ", registered in-process")
        return f"{self.kind} '{self.name}' ({where})"


@attrs.define
class PluginInfo:
    name: str
    version: str | None
    module: str
    source: str  # "entry point" or "in-process"
    error: str | None = None  # the plugin as a whole failed (import error, unknown hook)
    dist: str | None = None
    components: list[tuple[str, str]] = attrs.field(factory=list)
    problems: list[str] = attrs.field(factory=list)  # components of it that were dropped, and why

    def uninstall_hint(self) -> str:
        return f"pip uninstall {self.dist}" if self.dist else f"unregister the in-process plugin '{self.name}'"


def _config_kind(cls: type) -> str | None:
    """'attrs', 'dataclass' or None (not a config class ddpmkit can read)."""
    if cls is None:
        return "none"
    if attrs.has(cls):
        return "attrs"
    if dataclasses.is_dataclass(cls) and isinstance(cls, type):
        return "dataclass"
    return None


class PluginManager:
    """Holds the pluggy manager, the loaded plugins and the component registry.

    A faulty plugin never takes the others down: an import error, an unknown hook, a hook that
    raises, a config class ddpmkit cannot read or a name another plugin already uses drops that
    plugin (or that component) with one warning naming the pip distribution; ``ddpmkit plugins``
    lists it as failed.
    """

    def __init__(self, load_entry_points: bool = True):
        self.pm = pluggy.PluginManager("ddpmkit")
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self._registry: dict[str, dict[str, Component]] | None = None
        if load_entry_points:
            self._load_entry_points()

    # -- loading ---------------------------------------------------------
    def _load_entry_points(self) -> None:
        only = os.environ.get(ENV_VAR)
        allowed = None if only is None else {s.strip() for s in only.split(",") if s.strip()}
        seen = set()
        for ep in importlib.metadata.entry_points(group="ddpmkit"):
            if ep.name in seen:
                continue
            seen.add(ep.name)
            if allowed is not None and ep.name not in allowed and ep.value not in allowed:
                continue
            dist = getattr(ep, "dist", None)
            version = dist.version if dist is not None else None
            dist_name = dist.metadata["Name"] if dist is not None else None
            info = PluginInfo(ep.name, version, ep.value, "entry point", dist=dist_name)
            try:
                module = ep.load()
                self._register(module, info)
            except Exception as exc:  # a broken plugin must not take the others down
                info.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
                warnings.warn(f"ddpmkit plugin '{ep.name}' failed to load: {info.error}"
                              f"{self._from(info)}", stacklevel=2)
            self.plugins[ep.name] = info

    @staticmethod
    def _from(info: PluginInfo | None) -> str:
        if info is None or not info.dist:
            return ""
        return f" (distribution '{info.dist}'; {info.uninstall_hint()} to remove it)"

    def _register(self, plugin: object, info: PluginInfo) -> None:
        known = set(KIND_BY_HOOK)
        for attr in dir(plugin):
            fn = getattr(plugin, attr, None)
            if callable(fn) and hasattr(fn, "ddpmkit_impl") and attr not in known:
                close = difflib.get_close_matches(attr, sorted(known), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else f"; hooks are: {', '.join(sorted(known))}"
                raise PluginError(f"plugin '{info.name}' implements unknown hook '{attr}'{hint}")
        self.pm.register(plugin, name=info.name)
        self._registry = None

    def register_plugin(self, plugin: object, name: str | None = None, version: str | None = None) -> None:
        """Register a plugin object or module in-process (tests, notebooks).

        Registering an object that is already registered (say, an installed plugin's module)
        does nothing.
        """
        if self.pm.is_registered(plugin):
            return
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        if name in self.plugins:
            raise PluginError(f"a plugin named '{name}' is already registered")
        info = PluginInfo(name, version, getattr(plugin, "__name__", repr(plugin)), "in-process")
        self._register(plugin, info)
        self.plugins[name] = info

    def unregister_plugin(self, name: str) -> None:
        info = self.plugins.pop(name, None)
        if info is not None and self.pm.get_plugin(name) is not None:
            self.pm.unregister(name=name)
        self._registry = None

    # -- the registry ----------------------------------------------------
    @property
    def registry(self) -> dict[str, dict[str, Component]]:
        if self._registry is None:
            self._registry = self._collect()
        return self._registry

    def _drop(self, info: PluginInfo | None, owner: str, message: str) -> None:
        if info is not None:
            info.problems.append(message)
        warnings.warn(f"ddpmkit plugin '{owner}': {message}; dropped{self._from(info)}", stacklevel=3)

    def _candidates(self) -> list[Component]:
        """Every registration, in plugin load order, with the malformed ones dropped."""
        order = {name: i for i, name in enumerate(self.plugins)}
        found: list[tuple[int, Component]] = []
        for kind in KIND_TABLE:
            for impl in getattr(self.pm.hook, kind.hook).get_hookimpls():
                info = self.plugins.get(impl.plugin_name)
                owner = info.name if info else impl.plugin_name
                mine: list[Component] = []

                def register(name: str, factory: Callable[..., Any], config_class: type | None = None,
                             description: str = "", *, _k=kind.name, _i=info, _o=owner,  # noqa: ANN001
                             _mine=mine) -> None:  # noqa: ANN001  (the loop's values, bound)
                    if not isinstance(name, str) or not name:
                        return self._drop(_i, _o, f"registered a {_k} with an invalid name {name!r}")
                    if _config_kind(config_class) is None:
                        return self._drop(_i, _o, f"config class {getattr(config_class, '__name__', config_class)!r} "
                                                  f"of {_k} '{name}' is neither an attrs class nor a dataclass "
                                                  "(decorate it with @attrs.define or @dataclasses.dataclass)")
                    _mine.append(Component(_k, name, factory, config_class, description or "", _o,
                                           _i.version if _i else None, _i.dist if _i else None))

                try:
                    impl.function(register=register)
                except Exception as exc:
                    self._drop(info, owner, f"{kind.hook} raised {type(exc).__name__}: {exc}".splitlines()[0])
                    continue
                found += [(order.get(owner, len(order)), c) for c in mine]
        found.sort(key=lambda pair: pair[0])  # stable: registration order within a plugin
        return [c for _, c in found]

    def _collect(self) -> dict[str, dict[str, Component]]:
        registry: dict[str, dict[str, Component]] = {k: {} for k in KINDS}
        for info in self.plugins.values():
            info.components, info.problems = [], []
        candidates = self._candidates()
        # A built-in wins a name clash; otherwise the plugin loaded first keeps it.
        candidates.sort(key=lambda c: c.dist != BUILTIN_DIST)
        for comp in candidates:
            kept = registry[comp.kind].get(comp.name)
            if kept is not None:
                self._drop(self.plugins.get(comp.plugin), comp.plugin,
                           f"{comp.kind} '{comp.name}' is registered by two plugins: '{kept.plugin}' and "
                           f"'{comp.plugin}'; '{kept.plugin}' keeps it")
                continue
            registry[comp.kind][comp.name] = comp
            if comp.plugin in self.plugins:
                self.plugins[comp.plugin].components.append((comp.kind, comp.name))
        return registry

    def get(self, kind: str, name: str) -> Component:
        """The component ``name`` of ``kind``; unknown → one-line :class:`DdpmkitError`."""
        if kind not in KINDS:
            raise DdpmkitError(f"unknown kind '{kind}'; kinds are: {', '.join(KINDS)}")
        available = self.registry[kind]
        if name in available:
            return available[name]
        names = sorted(available)
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        listing = ", ".join(names) if names else "(none installed)"
        raise DdpmkitError(f"unknown {kind} '{name}'{hint} available: {listing}")

    def names(self, kind: str) -> list[str]:
        return sorted(self.registry[kind])


_manager: PluginManager | None = None


def get_manager() -> PluginManager:
    """The process-wide plugin manager, loading entry points on first use."""
    global _manager
    if _manager is None:
        _manager = PluginManager()
    return _manager


def reset_manager() -> None:
    """Forget loaded plugins; the next :func:`get_manager` reloads entry points."""
    global _manager
    _manager = None


def register_plugin(plugin: object, name: str | None = None, version: str | None = None) -> None:
    get_manager().register_plugin(plugin, name, version)


def unregister_plugin(name: str) -> None:
    get_manager().unregister_plugin(name)


def get_component(kind: str, name: str) -> Component:
    return get_manager().get(kind, name)


def available(kind: str) -> list[str]:
    return get_manager().names(kind)


def build(kind: str, name: str, options: dict[str, Any] | None = None, **context: Any) -> Any:
    """Build a component by kind and name: ``build("schedule", "linear", {"timesteps": 300})``."""
    return get_component(kind, name).build(options, **context)


