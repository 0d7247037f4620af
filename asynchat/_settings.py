"""What a checkpoint records of how a thing was built (an optimizer's param groups, a
scheduler's settings, a metric's class), and what a resumed run built otherwise.

torch's ``load_state_dict`` gives an optimizer or a scheduler the saved settings with its
state, so a run resumed with another ``lr`` or a longer schedule went on with the saved
ones without a word: the owners record their settings, and say which differ.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_SCALARS = (bool, int, float, str, type(None))


def class_name(obj: object) -> str:
    """``"torch.optim.adam.Adam"``: what a checkpoint records of an object's class."""
    kind = type(obj)
    return f"{kind.__module__}.{kind.__qualname__}"


def plain(value: Any, *, nested: bool = False) -> bool:
    """Whether ``value`` is a setting a checkpoint records and a run compares: a number, a
    string, ``None``, or (not ``nested``) a list, tuple or mapping of them (a checkpoint's
    is read the same way, whatever it holds: a crafted nesting is no setting)."""
    if isinstance(value, (list, tuple)):
        return not nested and all(plain(v, nested=True) for v in value)
    if isinstance(value, Mapping):  # (MultiStepLR's milestones: a Counter)
        return not nested and all(
            plain(k, nested=True) and plain(v, nested=True) for k, v in value.items()
        )
    return isinstance(value, _SCALARS)


def changed(built: Mapping[str, Any], saved: Mapping[str, Any]) -> list[str]:
    """``"lr=0.01 (the checkpoint's 0.1)"`` for each setting both have, with other values."""
    return [
        f"{key}={built[key]!r} (the checkpoint's {saved[key]!r})"
        for key in sorted(built.keys() & saved.keys())
        if built[key] != saved[key]
    ]
