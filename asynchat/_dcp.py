"""Sharded checkpoints: a directory per checkpoint, each rank writing its own shards with
``torch.distributed.checkpoint`` (DCP).

A sharded checkpoint is ``step-<global_step>.dcp/``, holding DCP's files (``.metadata``
and one ``__<rank>_0.distcp`` per rank: the model's and every optimizer's state, as each
rank holds it) and ``asynchat.pt``: what is not sharded (progress, metrics, callbacks, RNG
states, the grad scaler), the optimizers' names and the SHA-256 of each of DCP's files, with
the file's own content digest over all of it. Every rank writes into a hidden temporary
directory; rank 0 writes ``asynchat.pt`` once DCP has finished (its coordinator writes
``.metadata`` only after every rank's shards are written and fsynced), then renames the
directory into place, so a checkpoint under its name is always complete.

Loading goes through DCP's resharding: a checkpoint written by 2 ranks loads on 1 or 4, or
into a module that is not sharded at all. It is as safe as ``torch.load(weights_only=True)``:
``.metadata`` must unpickle into DCP's own types (:func:`check_metadata`), and the values
DCP saved as bytes must load with ``weights_only=True`` (:func:`_weights_only_planner`).

``torch.distributed.checkpoint`` is imported when first used (it costs ~0.4 s to import).
"""

from __future__ import annotations

import contextlib
import io
import pickle
import re
import threading
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from asynchat._errors import CheckpointError
from asynchat._weights import IncompatibleKeys, load_portable, portable_state_dict

# In asynchat.pt, a placeholder {SHARDED: name, ...} stands for a tensor saved in the shards.
SHARDED = "asynchat.sharded"


def sharded_state(
    model: torch.nn.Module,
    optimizers: Mapping[str, torch.optim.Optimizer],
    callbacks: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The model's and each optimizer's state as this rank holds it (``DTensor`` shards
    under FSDP), optimizer state keyed by parameter name so that it reshards; and the
    DTensors in the callbacks' states (``{key: state}``), by name."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    _, callback_shards = split_sharded(callbacks or {})
    return {
        "model": get_model_state_dict(model),
        "optimizers": {name: get_optimizer_state_dict(model, o) for name, o in optimizers.items()},
        **callback_shards,
    }


def split_sharded(callbacks: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The callbacks' states (``{key: state}``) with each ``DTensor`` in them (in dicts,
    lists and tuples) replaced by a placeholder that names it, and those DTensors by
    name, for DCP: every rank saves its shards of them, as of the model's weights."""
    from torch.distributed.tensor import DTensor

    shards: dict[str, torch.Tensor] = {}

    def placeholder(node: Any, path: str) -> Any:
        if not isinstance(node, DTensor):
            return _DESCEND
        shards[path] = node
        return {
            SHARDED: path,
            "shape": list(node.shape),
            "dtype": str(node.dtype).removeprefix("torch."),
            "placements": [_placement_name(p, path) for p in node.placements],
        }

    plain = {
        key: _rebuilt(state, f"callbacks/{key}", placeholder) for key, state in callbacks.items()
    }
    return plain, shards


def _placement_name(placement: Any, path: str) -> list[Any]:
    from torch.distributed.tensor import Replicate, Shard

    if isinstance(placement, Shard):
        return ["shard", placement.dim]
    if isinstance(placement, Replicate):
        return ["replicate"]
    raise CheckpointError(
        f"cannot save {path}: a DTensor placed as {placement} (only sharded or replicated "
        "ones; redistribute it in the callback's state_dict)"
    )


def _with_templates(
    callbacks: Mapping[str, Any], model: torch.nn.Module
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The callbacks' states with an empty tensor in place of each placeholder of
    :func:`split_sharded`, and those tensors by name, for DCP to load into in place: a
    ``DTensor`` placed as it was, over the mesh of ``model``'s parameters (DCP reshards it to
    this job's ranks), or a whole tensor for a model that is not sharded."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, empty

    mesh = next((p.device_mesh for p in model.parameters() if isinstance(p, DTensor)), None)
    templates: dict[str, torch.Tensor] = {}

    def template(node: Any, path: str) -> Any:
        if not (isinstance(node, dict) and SHARDED in node):
            return _DESCEND
        name, shape, dtype, placed = _placeholder(node)
        if name in templates:
            return templates[name]
        if mesh is None:
            templates[name] = torch.empty(shape, dtype=dtype)
            return templates[name]
        if len(placed) != mesh.ndim:
            raise CheckpointError(
                f"{name} was sharded over a {len(placed)}-dimensional device mesh; this "
                f"model's is {mesh.ndim}-dimensional"
            )
        placements = [Shard(p[1]) if p[0] == "shard" else Replicate() for p in placed]
        templates[name] = empty(shape, dtype=dtype, device_mesh=mesh, placements=placements)
        return templates[name]

    states = {key: _rebuilt(state, "", template) for key, state in callbacks.items()}
    return states, templates


def _placeholder(node: Mapping[str, Any]) -> tuple[str, list[int], torch.dtype, list[Any]]:
    """A placeholder's name, shape, dtype and placements, checked (the file may be crafted:
    a name outside ``callbacks/`` would replace the model's state in the load)."""
    name, shape = node.get(SHARDED), node.get("shape")
    dtype, placed = getattr(torch, str(node.get("dtype")), None), node.get("placements")
    if not (
        isinstance(name, str) and name.startswith("callbacks/")
        and isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)
        and isinstance(dtype, torch.dtype)
        and isinstance(placed, list) and all(
            p == ["replicate"] or (len(p) == 2 and p[0] == "shard" and type(p[1]) is int)
            for p in placed
        )
    ):  # fmt: skip
        raise CheckpointError(f"a malformed placeholder of a sharded tensor: {node!r:.300}")
    return name, shape, dtype, placed


_DESCEND = object()  # from a _rebuilt visitor: not mine, go on into it


def _rebuilt(node: Any, path: str, visit: Callable[[Any, str], Any]) -> Any:
    """``node`` rebuilt with ``visit(value, path)`` in place of every value, container or
    not, for which it does not return :data:`_DESCEND`; dicts, lists and tuples it leaves
    are rebuilt from their items (paths ``<path>/<key or index>``), anything else kept."""
    replaced = visit(node, path)
    if replaced is not _DESCEND:
        return replaced
    if isinstance(node, dict):
        return {key: _rebuilt(value, f"{path}/{key}", visit) for key, value in node.items()}
    if type(node) in (list, tuple):
        return type(node)(_rebuilt(value, f"{path}/{i}", visit) for i, value in enumerate(node))
    return node


# One DCP operation at a time in this process: the trainers' checkpoint group is shared
# (asynchat._ranks.shared_group), and a trainer run nested in another's hook could save while
# the outer's write is still going over it on DCP's thread (their collectives would pair up
# across the two). A Lock, not an RLock: a save releases it on DCP's thread.
_one_at_a_time = threading.Lock()


def start_save(
    state: dict[str, Any], directory: Path, group: dist.ProcessGroup | None
) -> Future[Any]:
    """Every rank: copy ``state`` to host memory now (the stall), write it to ``directory``
    on a thread of DCP's. The collectives of the write go over ``group`` (a CPU group, and
    not one a training step uses: two threads must not share a group's collectives), once
    any earlier save or load over it is done (``_one_at_a_time``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    _one_at_a_time.acquire()  # released when the write is done, on DCP's thread
    try:
        written = dcp.async_save(state, checkpoint_id=directory, process_group=group)  # type: ignore[attr-defined]
    except BaseException:
        _one_at_a_time.release()
        raise
    assert isinstance(written, Future)  # (a response object only with a stager of one's own)
    # DCP fails the write with its CheckpointException, a BaseException, which went past
    # every handler as an interrupt would: relayed as a CheckpointError saying each rank's.
    relayed: Future[Any] = Future()

    def relay(done: Future[Any]) -> None:
        _one_at_a_time.release()
        try:
            relayed.set_result(done.result())
        except CheckpointException as exc:
            relayed.set_exception(CheckpointError(ranks_failures(exc)))
        except BaseException as exc:
            relayed.set_exception(exc)

    written.add_done_callback(relay)
    return relayed


def ranks_failures(exc: BaseException) -> str:
    """What failed on each rank in one of DCP's ``CheckpointException`` (its message holds
    every rank's whole traceback)."""
    failures = getattr(exc, "failures", None)
    if not isinstance(failures, Mapping) or not failures:
        return f"{type(exc).__name__}: {exc}"
    return "; ".join(
        f"rank {rank}: {type(error).__name__}: {error}"
        for rank, (error, _) in sorted(failures.items())
    )


def load_sharded(
    directory: Path,
    model: torch.nn.Module,
    optimizers: Mapping[str, torch.optim.Optimizer],
    saved_optimizers: list[str],
    group: dist.ProcessGroup | None = None,
    callbacks: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Load a sharded checkpoint's model and optimizer state into ``model`` and
    ``optimizers`` (sharded or not, on any number of ranks: DCP reshards); return the
    callbacks' states (as ``asynchat.pt`` holds them) with their sharded tensors loaded."""
    if optimizers and set(optimizers) != set(saved_optimizers):
        raise CheckpointError(
            f"{directory} holds the optimizers {sorted(saved_optimizers)} but this Trainer "
            f"has {sorted(optimizers)}: resume with the same optimizer names"
        )
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = sharded_state(model, optimizers)
    if not optimizers:
        del state["optimizers"]
    callback_states, templates = _with_templates(callbacks or {}, model)
    read({**state, **templates}, directory, group)  # into the templates, in place
    set_model_state_dict(model, state["model"])
    for name, optimizer in optimizers.items():
        set_optimizer_state_dict(model, optimizer, state["optimizers"][name])
    return callback_states


def read(
    state: dict[str, Any],
    directory: Path,
    group: dist.ProcessGroup | None,
    *,
    single: bool = False,
    partial: bool = False,
) -> None:
    """DCP's load of ``directory`` into the tensors of ``state`` (in place): by every rank
    of ``group`` together, or by this process alone (``single``, or outside a job)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    single = single or not (dist.is_available() and dist.is_initialized())
    reader = _checked_reader(directory, check_metadata(directory))
    planner = _weights_only_planner(partial)
    try:
        with warnings.catch_warnings(), contextlib.nullcontext() if single else _one_at_a_time:
            # "torch.distributed is ... uninitialized, assuming ... a single process": yes.
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load(  # type: ignore[attr-defined]
                state, storage_reader=reader, process_group=group, no_dist=single,
                planner=planner,
            )  # fmt: skip
    except (Exception, CheckpointException) as exc:  # (DCP's is a BaseException)
        if planner.refused is not None:
            raise CheckpointError(f"{directory}: {planner.refused}; not loaded") from None
        raise CheckpointError(
            f"{directory} does not load into this model ({ranks_failures(exc)})"
        ) from exc


def _weights_only_planner(partial: bool) -> Any:
    """DCP's load planner, but what DCP saved as bytes (the values that are not tensors: an
    optimizer's ``param_groups``) must load as :func:`torch.load` with ``weights_only=True``
    would (torch's own loads them with ``weights_only=False``); ``planner.refused`` says
    which did not."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class WeightsOnlyPlanner(DefaultLoadPlanner):
        refused: str | None = None

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            try:
                torch.load(value, weights_only=True)
            except Exception as exc:
                found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
                what = f"refers to {found[1]}" if found else f"holds a {type(exc).__name__}"
                self.refused = (
                    f"{read_item.dest_index.fqn} {what}, which a weights-only load refuses "
                    "(it could run code)"
                )
                raise
            value.seek(0)
            super().load_bytes(read_item, value)

    return WeightsOnlyPlanner(allow_partial_load=partial)


def _checked_reader(directory: Path, metadata: Any) -> Any:
    """DCP's reader of ``directory``, but its metadata is ``metadata``, as
    :func:`check_metadata` read it: DCP's own read unpickled the file again, with
    :func:`pickle.load` (a file replaced in between was loaded unchecked)."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class CheckedReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id  # as DCP's own read sets it
            return metadata

    return CheckedReader(directory)


def check_metadata(directory: Path) -> Any:
    """``directory``'s ``.metadata``, refused unless it unpickles into DCP's metadata types
    alone: DCP reads it with :func:`pickle.load`, and a crafted one ran any code it named
    when a checkpoint was resumed or its weights loaded (digests do not help: whoever
    writes the directory rewrites them)."""
    path = directory / ".metadata"
    try:
        with path.open("rb") as file:
            return _MetadataUnpickler(file).load()
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc} (it could run code); not loaded") from None
    except Exception as exc:
        raise CheckpointError(f"{path} is not DCP metadata ({type(exc).__name__}: {exc})") from exc


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles what DCP's ``.metadata`` holds, and nothing else: its own classes, torch's
    sizes, dtypes and layouts, and paths."""

    _PLAIN = frozenset({
        ("torch", "Size"), ("torch", "device"), ("torch.serialization", "_get_layout"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("collections", "OrderedDict"),
        ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
        ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
        ("pathlib._local", "PosixPath"), ("pathlib._local", "WindowsPath"),  # (3.13)
    })  # fmt: skip

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._PLAIN or self._dcp_class(module, name):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(f"it refers to {module}.{name}, which DCP's metadata never holds")

    @staticmethod
    def _dcp_class(module: str, name: str) -> bool:
        from torch.distributed.checkpoint import metadata

        found = getattr(metadata, name, None) if module == metadata.__name__ else None
        return isinstance(found, type) and found.__module__ == module  # its own, not imports


def load_module(
    directory: Path, module: torch.nn.Module, *, prefix: str, strict: bool
) -> IncompatibleKeys:
    """:func:`asynchat.callbacks.load_weights` of a sharded checkpoint: its model's weights
    named ``prefix*``, gathered from every rank's shards, into a module of this process (by
    the names the module has uncompiled, which are DCP's)."""
    own = portable_state_dict(module)
    state = {"model": {prefix + key: value for key, value in own.items()}}
    read(state, directory, None, single=True, partial=not strict)
    chosen = {key[len(prefix) :]: value for key, value in state["model"].items()}
    return load_portable(module, chosen, strict=strict)
