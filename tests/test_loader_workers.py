"""A DataLoader's worker processes go when its loop does, without a stall.

A DataLoader with persistent workers keeps its worker processes as long as it lives. One
held only by a finished loop is freed by Python's cycle collector along with the loop, and
the collector used to finalize the pipes of the loader's queues before the loader's iterator,
which could then not tell its workers to stop and waited for each to time out: 5 s, in
whatever thread the collection ran in (the next job's compute thread, or the event loop).
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import subprocess
import sys
import textwrap
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data._utils import MP_STATUS_CHECK_INTERVAL

from asynchat import Callback, LoopState, Trainer

pytestmark = pytest.mark.anyio


@pytest.fixture
def collection_by_hand() -> Iterator[None]:
    """The cycle collector runs only when the test says so."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.usefixtures("collection_by_hand")
async def test_persistent_workers_stop_at_once_when_a_finished_loops_loader_goes() -> None:
    data = TensorDataset(torch.randn(16, 8), torch.randint(0, 3, (16,)))
    loader = DataLoader(data, batch_size=4, num_workers=1, persistent_workers=True)
    trainer = Trainer(
        nn.Linear(8, 3), loader, lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        loss_fn=nn.CrossEntropyLoss(), num_epochs=2,
    )  # fmt: skip
    await trainer.fit()
    workers = multiprocessing.active_children()
    assert workers, "the loader's worker is alive between runs (persistent)"
    gone = weakref.ref(loader)
    del loader, trainer  # held in the loop's reference cycles: only the collector frees it
    start = time.perf_counter()
    gc.collect()
    took = time.perf_counter() - start
    assert gone() is None, "nothing keeps the loader alive"
    assert not any(worker.is_alive() for worker in workers)
    # Before, the collection waited out the workers' status check interval.
    assert took < MP_STATUS_CHECK_INTERVAL / 2, f"the workers took {took:.1f} s to stop"


@pytest.mark.parametrize("stop_at", [3, 7, 13])
def test_persistent_workers_resume_to_the_uninterrupted_order(tmp_path: Path, stop_at: int) -> None:
    # Such a loader draws its workers' base seed from its generator when its one iterator
    # is created, at the first epoch only; a run resumed in a later epoch (or its loader
    # cloned to skip the resumed epoch's first batches) created it there, and the extra draw
    # gave the epoch another order: other weights from step 7 on.
    import anyio
    from conftest import StopAt, make_data, make_model, sgd

    from asynchat.callbacks import Checkpoint

    def run(directory: Path, *extra: Any, resume: bool = False) -> Trainer:
        loader = DataLoader(
            make_data(96), batch_size=16, shuffle=True, num_workers=1,
            persistent_workers=True, generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        trainer = Trainer(
            make_model(), loader, sgd, loss_fn=nn.CrossEntropyLoss(), num_epochs=3,
            callbacks=[*extra, Checkpoint(directory)], resume_from=directory if resume else None,
        )  # fmt: skip
        anyio.run(trainer.fit)
        return trainer

    straight = run(tmp_path / "straight")
    run(tmp_path / "interrupted", StopAt(stop_at))
    resumed = run(tmp_path / "interrupted", resume=True)  # a new loader, as a new process has
    for name, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name


def test_a_forked_process_never_stops_the_workers_of_its_parents_loaders() -> None:
    # A loader's finalizer (stop its persistent workers) was inherited by processes forked
    # after it was made, such as the workers of the next job's DataLoader: a collection in
    # one of them ran it and printed "Exception ignored ... AssertionError: can only test a
    # child process" (Python refuses to look at another process's children).
    script = textwrap.dedent(
        """
        import gc, os, sys
        import torch
        from torch.utils.data import DataLoader, TensorDataset
        from asynchat._data import workers_stop_with_loader

        data = TensorDataset(torch.randn(8, 2))
        loader = DataLoader(data, batch_size=4, num_workers=1, persistent_workers=True)
        list(workers_stop_with_loader(loader))
        pid = os.fork()
        if pid == 0:  # a child, as a later loader's worker is: the loader goes here
            del loader
            gc.collect()
            sys.stderr.flush()
            os._exit(0)
        os.waitpid(pid, 0)
        print("parent done", flush=True)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert "parent done" in done.stdout
    assert "can only test a child process" not in done.stderr, done.stderr
    assert "Exception ignored" not in done.stderr, done.stderr


class Raise(Callback):
    def on_step_end(self, state: LoopState) -> None:
        if state.global_step == 2:
            raise RuntimeError("a hook failed")


@pytest.mark.usefixtures("collection_by_hand")
@pytest.mark.parametrize("how", ["cancel", "error", "stop"])
@pytest.mark.parametrize("prefetch", [0, 2])
def test_an_epoch_cut_short_stops_its_workers_when_the_loop_ends(how: str, prefetch: int) -> None:
    """Regression: an epoch ended by a cancellation or an error left its DataLoader iterator
    in a reference cycle (the traceback's frames), and its worker processes alive until the
    cycle collector came by; a later loader's workers, forked meanwhile, inherited it, and a
    collection there ran its shutdown ("Exception ignored ... can only test a child
    process"). The loop now stops an epoch's workers as it leaves the epoch."""
    import anyio
    from conftest import CancelAt, StopAt, make_data, make_model, sgd

    loader = DataLoader(make_data(96), batch_size=8, num_workers=2)
    cancel = CancelAt(2)
    extra = {"cancel": cancel, "error": Raise(), "stop": StopAt(2)}[how]
    trainer = Trainer(
        make_model(), loader, sgd, loss_fn=nn.CrossEntropyLoss(), num_epochs=2,
        callbacks=[extra], prefetch=prefetch,
    )  # fmt: skip

    async def main() -> None:
        with anyio.CancelScope() as cancel.scope:
            await trainer.fit()

    with contextlib.suppress(RuntimeError):
        anyio.run(main)
    assert trainer.state.global_step == 2
    assert not multiprocessing.active_children(), "the epoch's workers outlived the loop"
