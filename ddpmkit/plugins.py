"""Plugin discovery and the component registry.

Plugins come from the setuptools entry-point group ``ddpmkit`` (ddpmkit's own
built-ins too) or are registered in-process with :func:`register_plugin`.
``DDPMKIT_PLUGINS`` (comma-separated entry-point names, or plugin module names)
restricts which entry-point plugins load; set it to an empty string to load none.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import os
import warnings
from typing import Any, Callable

import attrs
import pluggy

from . import hookspecs
from .errors import DdpmkitError, PluginError

KINDS = ("schedule", "predictor", "loss", "dataset", "metric", "sampler")
_HOOK_OF_KIND = {
    "schedule": "register_schedules",
    "predictor": "register_predictors",
    "loss": "register_losses",
    "dataset": "register_datasets",
    "metric": "register_metrics",
    "sampler": "register_samplers",
}
ENV_VAR = "DDPMKIT_PLUGINS"


@attrs.frozen
class Component:
    """One registered component: what ``register(...)`` was called with."""

    kind: str
    name: str
    factory: Callable[..., Any]
    config_class: type | None
    description: str
    plugin: str
    version: str | None

    def make_config(self, options: dict[str, Any] | None = None):
        """Build this component's attrs config from ``options`` (validated)."""
        from .config import build_config

        return build_config(self, options or {})

    def create(self, config, **context):
        """``factory(config, **context)``; a component without a config class gets no config."""
        return self.factory(config, **context) if config is not None else self.factory(**context)

    def build(self, options: dict[str, Any] | None = None, **context):
        """``factory(config, **context)`` with ``config`` made from ``options``."""
        return self.create(self.make_config(options), **context)


@attrs.define
class PluginInfo:
    name: str
    version: str | None
    module: str
    source: str  # "entry point" or "in-process"
    error: str | None = None
    dist: str | None = None
    components: list[tuple[str, str]] = attrs.field(factory=list)


class PluginManager:
    """Holds the pluggy manager, the loaded plugins and the component registry."""

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
                info.error = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"ddpmkit plugin '{ep.name}' failed to load: {info.error}", stacklevel=2)
            self.plugins[ep.name] = info

    def _register(self, plugin: object, info: PluginInfo) -> None:
        known = set(_HOOK_OF_KIND.values())
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

    def _collect(self) -> dict[str, dict[str, Component]]:
        registry: dict[str, dict[str, Component]] = {k: {} for k in KINDS}
        for info in self.plugins.values():
            info.components = []
        for kind, hook_name in _HOOK_OF_KIND.items():
            hook = getattr(self.pm.hook, hook_name)
            for impl in hook.get_hookimpls():
                info = self.plugins.get(impl.plugin_name)
                owner = info.name if info else impl.plugin_name

                def register(name, factory, config_class=None, description="", *, _kind=kind, _info=info, _owner=owner):
                    if not isinstance(name, str) or not name:
                        raise PluginError(f"plugin '{_owner}' registered a {_kind} with an invalid name {name!r}")
                    if config_class is not None and not attrs.has(config_class):
                        raise PluginError(f"plugin '{_owner}': config class of {_kind} '{name}' must be an attrs class")
                    if name in registry[_kind]:
                        other = registry[_kind][name].plugin
                        raise PluginError(
                            f"{_kind} '{name}' is registered by two plugins: '{other}' and '{_owner}'; "
                            f"uninstall one or restrict loading with {ENV_VAR}"
                        )
                    registry[_kind][name] = Component(
                        _kind, name, factory, config_class, description, _owner, _info.version if _info else None
                    )
                    if _info is not None:
                        _info.components.append((_kind, name))

                impl.function(register=register)
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


def build(kind: str, name: str, options: dict[str, Any] | None = None, **context):
    """Build a component by kind and name: ``build("schedule", "linear", {"timesteps": 300})``."""
    return get_component(kind, name).build(options, **context)


