"""Component options: a plugin's attrs (or dataclass) config class, built from what the user typed.

Values from the command line (``--set schedule.beta_end=0.02``) are strings; each is converted with
the field's declared type (int, float, bool, str, tuple[...], X | None) before the class's own
validators run. A bad name or value → one-line :class:`~ddpmkit.errors.DdpmkitError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

import attrs

from ddpmkit.errors import DdpmkitError


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a command-line string to ``tp`` (int, float, bool, str, tuple[...], X | None)."""
    if not isinstance(value, str) or tp is None or tp is Any:
        if isinstance(value, list):
            return tuple(value)
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value.lower() in ("none", "null", ""):
            return None
        for a in args:
            try:
                return _coerce(value, a, where)
            except DdpmkitError:
                continue
        raise DdpmkitError(f"invalid value for {where}: {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        item = args[0] if args else str
        parts = [p.strip() for p in value.strip("()[] ").split(",") if p.strip()]
        return tuple(_coerce(p, item, where) for p in parts)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(map(str, typing.get_args(tp)))
            raise DdpmkitError(f"invalid value for {where}: {value!r}; expected one of {choices}")
        return value
    try:
        if tp is bool:
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp in (int, float, str):
            return tp(value)
    except ValueError:
        raise DdpmkitError(f"invalid value for {where}: {value!r} is not a {tp.__name__}") from None
    return value


def config_fields(cls: type) -> dict[str, Any]:
    """``{option name: declared type}`` of an attrs class or a dataclass (init fields only)."""
    if attrs.has(cls):
        attrs.resolve_types(cls)
        return {f.name: f.type for f in attrs.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(cls) if f.init}


def config_defaults_missing(cls: type) -> list[str]:
    """Options of ``cls`` that have no default (a config must build from no options)."""
    if attrs.has(cls):
        return [f.name for f in attrs.fields(cls) if f.init and f.default is attrs.NOTHING]
    return [f.name for f in dataclasses.fields(cls)
            if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


def build_config(component: Any, options: dict[str, Any]) -> Any:
    """Instantiate ``component.config_class`` from ``options``; bad keys/values → DdpmkitError."""
    cls = component.config_class
    label = f"{component.kind} '{component.name}'"
    if cls is None:
        if options:
            raise DdpmkitError(f"{label} takes no options, got: {', '.join(sorted(options))}")
        return None
    fields = config_fields(cls)
    kwargs = {}
    for key, value in options.items():
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise DdpmkitError(f"unknown option '{key}' for {label}{hint} options: {', '.join(sorted(fields)) or '(none)'}")
        kwargs[key] = _coerce(value, fields[key], f"{component.kind}.{key}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        # attrs' validators raise with (message, attribute, ...) args: the message is what the user needs
        message = exc.args[0] if len(exc.args) > 1 and isinstance(exc.args[0], str) else str(exc)
        raise DdpmkitError(f"invalid option for {label}: {message}") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """An attrs or dataclass config as JSON-ready data (tuples become lists)."""
    if config is None:
        return {}
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    return attrs.asdict(config, recurse=True)
