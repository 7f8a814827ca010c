"""The search space: the TOML grammar (ranges, choices, fixed values, enqueued trials), checked before
any trial runs, and the run configuration of one trial.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import tomllib
from pathlib import Path
from typing import Any

import attrs

from ddpmkit.errors import DdpmkitError
from ddpmkit.run.presets import list_kind_changes
from ddpmkit.sdk.kinds import KINDS, SECTIONS

RANGE_KINDS = ("uniform", "log_uniform", "int", "log_int", "choice")


# RunConfig fields a space may not set: the sweep owns them, or they are lists of components.
NOT_SWEPT = {"preset", "metrics", "metric_options", "loggers", "logger_options"} | set(SECTIONS)


# --------------------------------------------------------------------------
# The search space
# --------------------------------------------------------------------------
@attrs.frozen
class Param:
    """One entry of a search space: ``kind`` is ``fixed``, ``choice`` or a range kind."""

    name: str
    kind: str
    values: tuple = ()  # fixed: (value,); choice: the choices; ranges: (low, high)
    step: float | int | None = None

    def suggest(self, trial) -> Any:
        """The value for ``trial`` (an optuna Trial; an enqueued trial gets its stored value back)."""
        lo, hi = self.values[:2] if self.kind not in ("fixed", "choice") else (None, None)
        if self.kind == "fixed":
            return self.values[0]
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.values))
        if self.kind in ("uniform", "log_uniform"):
            return trial.suggest_float(self.name, lo, hi, log=self.kind == "log_uniform", step=self.step)
        return trial.suggest_int(self.name, lo, hi, log=self.kind == "log_int", step=int(self.step or 1))

    def describe(self) -> dict:
        return {"kind": self.kind, "values": list(self.values), **({"step": self.step} if self.step else {})}


@attrs.frozen
class Space:
    preset: str | None
    params: tuple[Param, ...]
    enqueue: tuple[dict, ...] = ()

    @property
    def searched(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.kind != "fixed")

    def describe(self) -> dict:
        return {"preset": self.preset, **{p.name: p.describe() for p in self.params},
                **({"enqueue": list(self.enqueue)} if self.enqueue else {})}


def _target(name: str, where: str) -> tuple[str, ...]:
    """Where a space key goes: ("component", section), ("option", kind, option) or ("field", name)."""
    from ddpmkit.run.config import RunConfig

    fields = sorted(f.name for f in attrs.fields(RunConfig) if f.name not in NOT_SWEPT)
    if name in SECTIONS:
        return ("component", name)
    kind, dot, option = name.partition(".")
    if dot:
        if kind not in KINDS or not option or option.startswith(".") or option.endswith("."):
            raise DdpmkitError(f"{where}: unknown parameter '{name}': KIND.OPTION (or KIND.COMPONENT.OPTION) needs "
                               f"a kind among {', '.join(KINDS)}")
        component, dot, qualified = option.partition(".")
        if dot:  # KIND.COMPONENT.OPTION: only for trials that choose COMPONENT (e.g. process.flow.time)
            if kind not in SECTIONS:
                raise DdpmkitError(f"{where}: '{name}': KIND.COMPONENT.OPTION needs a kind chosen per run "
                                   f"({', '.join(SECTIONS)})")
            return ("option", kind, qualified, component)
        return ("option", kind, option)
    if name in fields:
        return ("field", name)
    close = difflib.get_close_matches(name, fields + list(SECTIONS), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise DdpmkitError(f"{where}: unknown parameter '{name}'{hint} (a RunConfig field such as lr or max_steps, a "
                       f"component ({', '.join(SECTIONS)}) or KIND.OPTION)")


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _param(name: str, value: Any, where: str) -> Param:
    label = f"{where}: '{name}'"
    if isinstance(value, list):
        value = {"choice": value}
    if not isinstance(value, dict):
        return Param(name, "fixed", (value,))
    kinds = [k for k in value if k in RANGE_KINDS]
    extra = sorted(set(value) - set(RANGE_KINDS) - {"step"})
    if len(kinds) != 1 or extra:
        raise DdpmkitError(f"{label} is malformed: write one of {', '.join(k + ' = [...]' for k in RANGE_KINDS)} "
                           f"(and optionally step), got {{{', '.join(value)}}}")
    kind, body, step = kinds[0], value[kinds[0]], value.get("step")
    if kind == "choice":
        if not isinstance(body, list) or not body or len({json.dumps(v) for v in body}) != len(body) \
                or not all(isinstance(v, (str, int, float, bool)) for v in body):
            raise DdpmkitError(f"{label}: a choice is a non-empty list of distinct strings or numbers, got {body!r}")
        return Param(name, "choice", tuple(body))
    ok = isinstance(body, list) and len(body) == 2 and all(map(_number, body)) and body[0] < body[1]
    if ok and kind in ("int", "log_int"):
        ok = all(isinstance(v, int) for v in body)
    if ok and kind.startswith("log"):
        ok = body[0] > 0
    if not ok:
        need = "integers" if "int" in kind else "numbers"
        extra_rule = " with 0 < low" if kind.startswith("log") else ""
        raise DdpmkitError(f"{label}: {kind} needs [low, high], two {need}{extra_rule} and low < high, got {body!r}")
    if step is not None and (not _number(step) or step <= 0 or kind.startswith("log")):
        raise DdpmkitError(f"{label}: step must be a positive number and cannot go with a log scale, got {step!r}")
    return Param(name, kind, tuple(body), step)


def load_space(path: str | os.PathLike, base_changes: dict | None = None, base_overrides: dict | None = None) -> Space:
    """Read and check a search-space TOML file (every name known, every range well formed, every
    value one that a run accepts, with the sweep's own ``base_changes``/``base_overrides`` applied);
    a problem → one-line :class:`DdpmkitError`."""
    where = str(path)
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DdpmkitError(f"--space: no such file '{path}'") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise DdpmkitError(f"--space: '{path}' is not TOML ({exc})") from None
    preset = data.pop("preset", None)
    if preset is not None and not isinstance(preset, str):
        raise DdpmkitError(f"{where}: preset is fixed: a name such as \"laptop\", got {preset!r}")
    enqueue = data.pop("enqueue", [])
    params = []
    for name, value in data.items():
        _target(name, where)
        params.append(_param(name, value, where))
    space = Space(preset, tuple(params), tuple(enqueue) if isinstance(enqueue, list) else ())
    if not space.searched:
        raise DdpmkitError(f"{where}: nothing to search: give at least one list or range")
    _check_enqueue(space, enqueue, where)
    _check_values(space, where, base_changes, base_overrides)
    return space


def _check_enqueue(space: Space, enqueue, where: str) -> None:
    """Each ``[[enqueue]]`` table sets searched parameters only, each to a value its range or choice allows."""
    searched = {p.name: p for p in space.searched}
    if not isinstance(enqueue, list) or not all(isinstance(e, dict) for e in enqueue):
        raise DdpmkitError(f"{where}: enqueue is a list of tables: [[enqueue]] then name = value lines")
    for i, row in enumerate(enqueue, 1):
        for name, value in row.items():
            p = searched.get(name)
            if p is None:
                raise DdpmkitError(f"{where}: [[enqueue]] #{i} sets '{name}', which is not searched "
                                   f"(searched: {', '.join(searched)})")
            ok = value in p.values if p.kind == "choice" else (_number(value) and p.values[0] <= value <= p.values[1])
            if not ok:
                allowed = list(p.values) if p.kind == "choice" else f"[{p.values[0]}, {p.values[1]}]"
                raise DdpmkitError(f"{where}: [[enqueue]] #{i}: {name} = {value!r} is outside {allowed}")


def _corners(space: Space) -> list[dict]:
    """Assignments that together try every choice and both ends of every range."""
    rows = []
    width = max([len(p.values) for p in space.searched] + [1])
    for i in range(width):
        row = {}
        for p in space.params:
            if p.kind == "fixed":
                row[p.name] = p.values[0]
            elif p.kind == "choice":
                row[p.name] = p.values[i % len(p.values)]
            else:
                row[p.name] = p.values[i % 2]
        rows.append(row)
    return rows


def _check_values(space: Space, where: str, base_changes: dict | None, base_overrides: dict | None) -> None:
    # Component choices first (a bad name gets its own line), then options against every component chosen.
    from ddpmkit.sdk.registry import get_component

    for p in space.params:
        target = _target(p.name, where)
        if target[0] == "component":
            for name in (p.values if p.kind in ("fixed", "choice") else ()):
                get_component(p.name, str(name))
        elif len(target) == 4:  # KIND.COMPONENT.OPTION: every value against that component's options
            comp = get_component(target[1], target[3])
            for value in (p.values if p.kind in ("fixed", "choice") else p.values[:2]):
                try:
                    comp.build_config({target[2]: _option_text(value)})
                except DdpmkitError as exc:
                    raise DdpmkitError(f"{where}: '{p.name}': {exc}") from None
    for row in _corners(space):
        try:
            trial_config(space.preset, row, base_changes, base_overrides)
        except DdpmkitError as exc:
            raise DdpmkitError(f"{where}: {exc}") from None


def _option_text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def trial_config(preset: str | None, values: dict[str, Any], base_changes: dict | None = None,
                 base_overrides: dict | None = None):
    """The RunConfig of a trial: ``preset`` with the space's ``values`` (``{key: value}``) applied."""
    from ddpmkit.run.presets import preset_config, resolve_run_config

    names: dict[str, str] = {}
    overrides: dict[str, dict[str, str]] = {k: dict(v) for k, v in (base_overrides or {}).items()}
    changes: dict[str, Any] = dict(base_changes or {})
    qualified = []
    for key, value in values.items():
        target = _target(key, "space")
        if target[0] == "component":
            names[key] = str(value)
        elif target[0] == "option" and len(target) == 4:
            qualified.append((target, value))
        elif target[0] == "option":
            overrides.setdefault(target[1], {})[target[2]] = _option_text(value)
        else:
            changes[key] = value
    base = preset_config(preset) if any(t[1] not in names for t, _ in qualified) else None
    for (_, kind, option, component), value in qualified:  # only where the trial chose that component
        if (names[kind] if kind in names else getattr(base, kind).name) == component:
            overrides.setdefault(kind, {})[option] = _option_text(value)
    changes = list_kind_changes(changes, overrides)
    return resolve_run_config(preset, names, overrides, changes, strict=False)
