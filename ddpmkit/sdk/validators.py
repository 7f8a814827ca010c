"""attrs validators that plugin configs share (use them in ``attrs.field(validator=...)``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs


def open_unit(inst: Any, attribute: attrs.Attribute, value: float) -> None:
    """The value lies in (0, 1), as every β must."""
    if not 0 < value < 1:
        raise ValueError(f"{attribute.name} must lie in (0, 1), got {value}")


def not_below(other: str) -> Callable[[Any, attrs.Attribute, Any], None]:
    """The value is >= the field ``other`` (e.g. beta_end >= beta_start)."""

    def check(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        low = getattr(inst, other)
        if low > value:
            raise ValueError(f"{other} ({low}) must not exceed {attribute.name} ({value})")

    return check
