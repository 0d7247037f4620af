"""RankGroup: the collectives by which the ranks of one loop act together.

A loop spans ranks when its ranks must step in lockstep: a distributed trainer (its gradient
all-reduce, FSDP's gathers), or a Predictor over a sharded model (each forward gathers the
parameters). Its ranks then agree, on a CPU (gloo) group, on what each would decide alone:
the run's settings before it starts, each epoch's length, and stop, cancel and pause at
every boundary (``LoopControl.agree``).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from asynchat._callback import Callback
from asynchat._control import LoopControl
from asynchat._data import DataSource, data_length, is_read_once
from asynchat._state import LoopState

T = TypeVar("T")


class RankGroup:
    """The ranks of one loop, in the default process group; created by every rank at the
    same point (with NCCL it creates a gloo group: a collective call). ``sharded_model``:
    the loop's model is sharded over the ranks (its forward is a collective)."""

    def __init__(self, *, sharded_model: bool) -> None:
        self.sharded_model = sharded_model
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.group = control_group()
        self._told_lengths: dict[str, list[int]] = {}  # each loop's counts last warned of

    def agree(self, flags: Sequence[bool]) -> list[bool]:
        """Each flag True on every rank if it is True on any: one MAX all-reduce on the CPU
        (every rank calls this at the same point)."""
        values = torch.tensor([1.0 if flag else 0.0 for flag in flags])
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.group)
        return [bool(v) for v in values.tolist()]

    def agree_later(self, flags: Sequence[bool]) -> Callable[[], list[bool]]:
        """:meth:`agree`, started now; what it returns waits for the result."""
        values = torch.tensor([1.0 if flag else 0.0 for flag in flags])
        work = dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        assert work is not None  # (async_op=True)

        def result() -> list[bool]:
            work.wait()
            return [bool(v) for v in values.tolist()]

        return result

    def any(self, flag: bool) -> bool:
        return self.agree([flag])[0]

    def sum(self, values: Sequence[float]) -> list[float]:
        totals = torch.tensor([float(v) for v in values], dtype=torch.float64)
        dist.all_reduce(totals, group=self.group)  # on the CPU, like the agreements
        return [float(v) for v in totals.tolist()]

    def gather_to_rank_zero(self, obj: T) -> list[T] | None:
        gathered: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, gathered, dst=0, group=self.group)  # on the CPU too
        return gathered

    def rank_zeros(self, obj: T) -> T:
        """Rank 0's ``obj``, on every rank (one broadcast on the CPU)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def refuse_unlike(
        self, name: str, settings: str, callbacks: Iterable[Callback], together: str
    ) -> None:
        """One all-gather, before a loop (of class ``name``) runs, of what must be alike on
        every rank: its ``settings`` and its ``callbacks`` with ``every_rank`` (in the same
        order, on the same schedule); a ValueError listing every rank's if they differ.
        ``together``: what its ranks do together (for the message)."""
        alike = ", ".join(_alike(c) for c in callbacks if c.every_rank) or "none"
        everyone: list[tuple[str, str]] = [("", "")] * self.world_size
        dist.all_gather_object(everyone, (settings, alike), group=self.group)
        _refuse_unlike(
            [settings for settings, _ in everyone],
            f"a {name} must be built alike on every rank, where its ranks {together} "
            "({}): give every rank the same arguments",
        )
        _refuse_unlike(
            [callbacks for _, callbacks in everyone],
            f"callbacks must be alike on every rank of a {name}, in the same order, where "
            "they act together or change the training ({}). Give every rank the same ones: "
            "Checkpoint, the loggers and Progress write on rank 0 only by themselves",
        )

    def agreed_length(
        self, state: LoopState, data_loader: DataSource, control: LoopControl, hint: str = ""
    ) -> int | None:
        """The steps every rank runs in an epoch over ``data_loader`` of the loop of
        ``state`` and ``control`` (the loop that spans the ranks, or one run inline in it):
        the fewest any rank's data has, with a warning (ending in ``hint``) whenever the
        counts differ anew; None (data without a ``len()`` on some rank): agreed before each
        step instead (``control.agree_last``). A rank that stepped on alone met its peers'
        next collective with one of its own (gloo aborted the job; NCCL would hang)."""
        facts: list[tuple[int | None, bool]] = [(None, False)] * self.world_size
        own = data_length(data_loader), is_read_once(data_loader)
        dist.all_gather_object(facts, own, group=self.group)
        lengths = [length for length, _ in facts]
        if None in lengths:  # told as it happens: agreed before each step
            if control.agree_last is None:
                # A loop of its own ranks agrees its boundary's requests in the same
                # all-reduce; one run inline in it (the parent decides) only the end.
                any_rank = self.any if control.agree is None else control.agree_with
                read_once = any(once for _, once in facts)
                control.agree_last = _LastAgreed(state, control, any_rank, read_once)
            return None
        control.agree_last = None
        known = [length for length in lengths if length is not None]  # (all of them)
        name = state.loop.name
        told, self._told_lengths[name] = self._told_lengths.get(name), known
        if min(known) != max(known) and self.rank == 0 and known != told:
            listed = ", ".join(f"rank {rank}: {n}" for rank, n in enumerate(known))
            warnings.warn(
                f"{name}: the ranks' data have different numbers of batches ({listed}): "
                f"every rank runs {min(known)} steps an epoch and leaves the rest unread. "
                f"Give every rank as many (a DistributedSampler does{hint})",
                RuntimeWarning,
                stacklevel=2,
            )
        return min(known)


_shared_groups: dict[tuple[dist.ProcessGroup, str], dist.ProcessGroup | None] = {}


def shared_group(purpose: str, *, unless_gloo: bool = False) -> dist.ProcessGroup | None:
    """A gloo group of the default process group's ranks for ``purpose``, made once per
    default group by every rank at the same point (a collective call), then shared: a group
    per loop held its connections (5 descriptors a group on each of 2 ranks) for the life of
    the process, so a service running jobs one after another ran out of them. None, with
    ``unless_gloo``, when the default group is gloo already: it serves."""
    world = dist.group.WORLD
    assert world is not None, "a shared group needs an initialised default process group"
    if not any(key[0] is world for key in _shared_groups):
        _shared_groups.clear()  # a default group destroyed and made anew: its are gone
    if (world, purpose) not in _shared_groups:
        gloo = unless_gloo and dist.get_backend() == "gloo"
        _shared_groups[world, purpose] = None if gloo else dist.new_group(backend="gloo")
    return _shared_groups[world, purpose]


def control_group() -> dist.ProcessGroup | None:
    """The CPU group of the loops' control collectives (:class:`RankGroup`): a CUDA tensor
    would cost a host sync per step under NCCL. Shared by every loop: loops that span the
    ranks run one at a time (``asynchat._in_use``), or nested, never side by side."""
    return shared_group("control", unless_gloo=True)


def sharded_over_ranks(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds parameters sharded over more than one rank (FSDP2's, tensor
    parallelism's ``DTensor``s): its forward is then a collective."""
    dtensor = _dtensor()
    if dtensor is None or not (dist.is_available() and dist.is_initialized()):
        return False  # (no DTensor spans ranks without a process group)
    return any(isinstance(p, dtensor) and p.device_mesh.size() > 1 for p in model.parameters())


def local_parts(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's part of each tensor: a ``DTensor``'s local shard (FSDP2's parameters),
    any other tensor itself."""
    dtensor = _dtensor()
    if dtensor is None:
        return list(tensors)
    return [t.to_local() if isinstance(t, dtensor) else t for t in tensors]


def _dtensor() -> type[Any] | None:
    """torch's ``DTensor`` class, or None where nothing has imported it, and so no tensor is
    one (importing it brings sympy: a third of ``import asynchat``'s time, were it paid
    there, or half a second of a loop's first step here)."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def _refuse_unlike(everyone: list[str], message: str) -> None:
    """A ValueError unless every rank's entry of ``everyone`` is the same: ``message`` with
    each rank's entry listed in its ``{}``."""
    if any(theirs != everyone[0] for theirs in everyone):
        listed = "; ".join(f"rank {rank}: {theirs}" for rank, theirs in enumerate(everyone))
        raise ValueError(message.format(listed))


class _LastAgreed:
    """``control.agree_last`` for the loop of ``state``: whether the epoch ends with the next
    step, True if it does on any rank (its data ran out); the rank whose data goes on says
    so, once. ``read_once``: the data is read once on some rank."""

    def __init__(
        self,
        state: LoopState,
        control: LoopControl,
        any_rank: Callable[[bool], bool],
        read_once: bool,
    ) -> None:
        self.state = state
        self.control = control
        self.any_rank = any_rank
        self.read_once = read_once
        self.cut_short = False

    def __call__(self, last: bool) -> bool:
        agreed = self.any_rank(last)
        if agreed and not last and not self.cut_short:
            self.cut_short = True
            warnings.warn(self._cut_short(), RuntimeWarning, stacklevel=2)
        return agreed

    def _cut_short(self) -> str:
        state, carried = self.state, self.control.carried
        rank = f"{state.loop.name}: rank {state.loop.rank}"
        if carried is not None and (carried[0] or carried[1]):  # a stop or cancellation
            return (
                f"{rank}'s epoch {state.epoch} ended with another rank's, whose wait for data "
                "a stop or a cancellation ended (or whose data ran out): this rank's next "
                "batch, read ahead, was not trained"
            )
        return (
            f"{rank}'s data had more batches than another rank's in epoch {state.epoch}: "
            "every rank ends an epoch when the first runs out, and this rank's next batch "
            "(read ahead) and any after it were not trained. Give every rank as many"
        )


# The attributes that say when a callback's hooks act (and so when its collectives run):
# part of what must be alike on every rank.
_SCHEDULE = ("every_n_steps", "every_n_epochs", "log_every_n_steps", "check_every_n_steps",
             "save_on_end", "interval")  # fmt: skip


def _alike(callback: Callback) -> str:
    """``Name`` or ``Name(every_n_steps=2, ...)``: what must be alike on every rank."""
    schedule = ", ".join(
        f"{name}={getattr(callback, name)!r}" for name in _SCHEDULE if hasattr(callback, name)
    )
    return f"{type(callback).__qualname__}({schedule})" if schedule else type(callback).__qualname__
