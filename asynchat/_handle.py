"""LoopHandle: what callbacks and batch processors may use of the loop they run in."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from asynchat._events import LoopStatus

T = TypeVar("T")


class LoopHandle(Protocol):
    """``state.loop``: the running loop, as callbacks and batch processors see it.

    A narrow view of :class:`~asynchat.LoopBase` (which implements it): enough to know where
    the loop runs, to stop, pause or agree with it, and to read its state, and nothing of its
    machinery. ``model`` is the model as given (unwrapped); ``state.model`` may be a DDP or
    DataParallel wrapper around it.
    """

    @property
    def name(self) -> str: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def training(self) -> bool: ...

    @property
    def model(self) -> torch.nn.Module: ...

    @property
    def callbacks(self) -> Sequence[Any]: ...

    @property
    def status(self) -> LoopStatus: ...

    @property
    def paused_s(self) -> float: ...

    @property
    def run_id(self) -> str:
        """Names this run across its stops and resumes: drawn for a new loop (rank 0's on
        every rank of a distributed one), the checkpoint's once resumed. Its checkpoints
        carry it, and a Checkpoint refuses a directory holding another run's."""

    @property
    def resumed_from(self) -> Path | None:
        """The checkpoint file this run resumed from (None: it began afresh)."""

    @property
    def damaged_at_resume(self) -> tuple[Path, ...]:
        """The newer checkpoints of the ``resume_from`` directory that the resume tried first
        and found damaged (or gone), newest first."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    @property
    def is_rank_zero(self) -> bool: ...

    def stop(self, reason: str | None = None) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def any_rank(self, flag: bool) -> bool: ...

    def sum_over_ranks(self, values: Sequence[float]) -> list[float]: ...

    def gather_to_rank_zero(self, obj: T) -> list[T] | None: ...

    async def to_host(self, obj: T) -> T: ...

    def samples_in(self, batch: Any) -> int: ...

    def state_dict(self) -> dict[str, Any]: ...

    def rank_state_dict(self) -> dict[str, Any]: ...

    @property
    def spans_ranks(self) -> bool: ...

    @property
    def shards_state(self) -> bool: ...

    def save_shards(self, directory: Path) -> Future[Any]: ...

    # Checkpoint's own (``LoopBase``'s docstrings): a save asked for on any rank, carried
    # to every rank by the agreement each step boundary makes anyway.
    def _save_slot(self) -> int: ...

    def _ask_ranks_to_save(self, slot: int) -> None: ...

    def _ranks_agreed_to_save(self, slot: int) -> bool: ...

    # The futures of Checkpoint's and Profiler's asks: waited for in one of the loop's own
    # hooks, they would wait forever (what they wait for comes after the hook).
    def _waits_for_caller(self) -> bool: ...

    def _waits_for_a_hook(self) -> bool: ...
