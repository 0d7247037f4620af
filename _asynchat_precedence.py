"""Let the installed ``asynchat`` package win over the standard library's module of that name.

Python 3.11 and older ship a deprecated ``asynchat`` module in the standard library, and the
standard library comes before site-packages on ``sys.path``. The distribution installs
``asynchat-precedence.pth``, which imports this module at interpreter start-up; on Python < 3.12
:func:`install` puts a finder first on ``sys.meta_path`` that looks ``asynchat`` up everywhere
*except* the standard library. If no other ``asynchat`` is found the standard library's is used,
as before. Python 3.12 removed the module, so nothing is installed there. This is the technique
setuptools uses for ``distutils`` (``distutils-precedence.pth``).
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
import sysconfig
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

_NAME = "asynchat"


def _stdlib_dirs() -> frozenset[str]:
    paths = sysconfig.get_paths()
    return frozenset(os.path.realpath(paths[key]) for key in ("stdlib", "platstdlib"))


class AsynchatPrecedenceFinder:
    """A meta path finder that resolves ``asynchat`` outside the standard library first."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        if fullname != _NAME:
            return None
        stdlib = _stdlib_dirs()
        search_path = [p for p in sys.path if os.path.realpath(p or os.curdir) not in stdlib]
        for finder in sys.meta_path:
            if finder is self:
                continue
            if finder is importlib.machinery.PathFinder:
                spec = importlib.machinery.PathFinder.find_spec(fullname, search_path)
            else:
                find = getattr(finder, "find_spec", None)
                spec = find(fullname, path, target) if find is not None else None
            if spec is not None and not _in_stdlib(spec, stdlib):
                return spec
        return None  # not installed elsewhere: let the normal search find the stdlib module


def _in_stdlib(spec: ModuleSpec, stdlib: frozenset[str]) -> bool:
    origin = spec.origin
    if origin is None or not os.path.isabs(origin):
        return False
    return os.path.realpath(os.path.dirname(origin)) in stdlib


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (Python < 3.12 only; idempotent)."""
    if sys.version_info >= (3, 12):
        return
    if any(type(f).__name__ == AsynchatPrecedenceFinder.__name__ for f in sys.meta_path):
        return
    sys.meta_path.insert(0, AsynchatPrecedenceFinder())
