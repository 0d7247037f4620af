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
into a module that is not sharded at all.

``torch.distributed.checkpoint`` is imported when first used (it costs ~0.4 s to import).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from asynchat._errors import CheckpointError


def sharded_state(
    model: torch.nn.Module, optimizers: Mapping[str, torch.optim.Optimizer]
) -> dict[str, Any]:
    """The model's and each optimizer's state as this rank holds it (``DTensor`` shards
    under FSDP), optimizer state keyed by parameter name so that it reshards."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    return {
        "model": get_model_state_dict(model),
        "optimizers": {name: get_optimizer_state_dict(model, o) for name, o in optimizers.items()},
    }


def start_save(
    state: dict[str, Any], directory: Path, group: dist.ProcessGroup | None
) -> Future[Any]:
    """Every rank: copy ``state`` to host memory now (the stall), write it to ``directory``
    on a thread of DCP's. The collectives of the write go over ``group`` (a CPU group, and
    not one a training step uses: two threads must not share a group's collectives)."""
    import torch.distributed.checkpoint as dcp

    written = dcp.async_save(state, checkpoint_id=directory, process_group=group)  # type: ignore[attr-defined]
    assert isinstance(written, Future)  # (a response object only with a stager of one's own)
    return written


def load_sharded(
    directory: Path,
    model: torch.nn.Module,
    optimizers: Mapping[str, torch.optim.Optimizer],
    saved_optimizers: list[str],
    group: dist.ProcessGroup | None = None,
) -> None:
    """Load a sharded checkpoint's model and optimizer state into ``model`` and
    ``optimizers`` (sharded or not, on any number of ranks: DCP reshards)."""
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
    read(state, directory, group)
    set_model_state_dict(model, state["model"])
    for name, optimizer in optimizers.items():
        set_optimizer_state_dict(model, optimizer, state["optimizers"][name])


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
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    single = single or not (dist.is_available() and dist.is_initialized())
    planner = DefaultLoadPlanner(allow_partial_load=partial)
    try:
        with warnings.catch_warnings():
            # "torch.distributed is ... uninitialized, assuming ... a single process": yes.
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load(  # type: ignore[attr-defined]
                state, checkpoint_id=directory, process_group=group, no_dist=single,
                planner=planner,
            )  # fmt: skip
    except Exception as exc:
        raise CheckpointError(
            f"{directory} does not load into this model ({type(exc).__name__}: {exc})"
        ) from exc


def load_module(directory: Path, module: torch.nn.Module, *, prefix: str, strict: bool) -> None:
    """:func:`asynchat.callbacks.load_weights` of a sharded checkpoint: its model's weights
    named ``prefix*``, gathered from every rank's shards, into a module of this process."""
    own = module.state_dict()
    state = {"model": {prefix + key: value for key, value in own.items()}}
    read(state, directory, None, single=True, partial=not strict)
    chosen = {key[len(prefix) :]: value for key, value in state["model"].items()}
    module.load_state_dict(chosen, strict=strict)
