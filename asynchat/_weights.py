"""A model's weights by names that do not depend on ``torch.compile``.

``torch.compile(module)`` wraps ``module`` in an ``OptimizedModule`` whose ``state_dict()``
names every entry ``_orig_mod.<name>``, the wrapped module's own name for it with the wrapper
in front. Weights saved by those names would load only into a model compiled at the same
places, so a run could not be resumed with compiling turned off (to debug it, say), nor its
weights deployed to a plain module. Checkpoints therefore name weights without the
``_orig_mod`` parts, as ``torch.distributed.checkpoint``'s ``get_model_state_dict`` does
for sharded ones, and loading maps those names onto whatever the module at hand calls them
(checkpoints written before this, with ``_orig_mod`` names, load the same way).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
from typing import Any

import torch

#: What ``load_state_dict`` returns: the ``missing_keys`` and ``unexpected_keys``.
IncompatibleKeys = torch.nn.modules.module._IncompatibleKeys

_WRAPPER = "_orig_mod"  # the attribute under which an OptimizedModule holds its module


def plain_name(name: str) -> str:
    """``name`` (a state_dict key or a module path) without its ``_orig_mod`` parts."""
    if _WRAPPER not in name:
        return name
    return ".".join(part for part in name.split(".") if part != _WRAPPER)


def plain_modules(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """``module``'s submodules by :func:`plain_name` (a compiled one's name stands for the
    module it wraps, which it runs)."""
    return {plain_name(name): each for name, each in module.named_modules()}


def portable_state_dict(module: torch.nn.Module) -> dict[str, Any]:
    """``module.state_dict()`` with every name made :func:`plain_name` (its ``_metadata``,
    the module versions that some modules' loading reads, too)."""
    weights = module.state_dict()
    if not any(_WRAPPER in name for name in weights):
        return weights
    renamed = _renamed(weights, plain_name)
    metadata = getattr(weights, "_metadata", None)
    if metadata is not None:
        renamed._metadata = _plain_versions(metadata)  # type: ignore[attr-defined]
    return renamed


def load_portable(
    module: torch.nn.Module, weights: Mapping[str, Any], *, strict: bool = True
) -> IncompatibleKeys:
    """``module.load_state_dict(weights, strict=strict)``, where the names in ``weights`` and
    ``module``'s own may differ by ``_orig_mod`` parts (either side compiled, or neither)."""
    own = module.state_dict(keep_vars=True)
    if any(_WRAPPER in name for name in (*weights, *own)):
        names = {plain_name(name): name for name in own}
        metadata = getattr(weights, "_metadata", None)
        weights = _renamed(weights, lambda name: names.get(plain_name(name), name))
        if metadata is not None:  # each of the module's paths gets its saved version
            versions = _plain_versions(metadata)
            weights._metadata = {  # type: ignore[attr-defined]
                path: versions[plain_name(path)]
                for path, _ in module.named_modules(remove_duplicate=False)
                if plain_name(path) in versions
            }
    result: IncompatibleKeys = module.load_state_dict(weights, strict=strict)
    return result


def under(weights: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The entries of ``weights`` whose :func:`plain_name` starts with ``prefix``, by their
    plain names with ``prefix`` removed (with their module versions): one submodule's."""
    chosen = _renamed(
        {name: value for name, value in weights.items() if plain_name(name).startswith(prefix)},
        lambda name: plain_name(name)[len(prefix) :],
    )
    metadata = getattr(weights, "_metadata", None)
    if metadata is not None:
        chosen._metadata = {  # type: ignore[attr-defined]
            path[len(prefix) :]: version
            for path, version in _plain_versions(metadata).items()
            if f"{path}.".startswith(prefix)
        }
    return chosen


def _renamed(weights: Mapping[str, Any], rename: Callable[[str], str]) -> dict[str, Any]:
    return collections.OrderedDict((rename(name), value) for name, value in weights.items())


def _plain_versions(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """``state_dict()._metadata`` by plain module paths. A compiled module's path names both
    the wrapper and the module it wraps; the module's own entry (after the wrapper's) wins."""
    return {plain_name(path): version for path, version in metadata.items()}
