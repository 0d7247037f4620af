"""A DataLoader's worker processes go when its loop does, without a stall.

A DataLoader with persistent workers keeps its worker processes as long as it lives. One
held only by a finished loop is freed by Python's cycle collector along with the loop, and
the collector used to finalize the pipes of the loader's queues before the loader's iterator,
which could then not tell its workers to stop and waited for each to time out: 5 s, in
whatever thread the collection ran in (the next job's compute thread, or the event loop).
"""

from __future__ import annotations

import gc
import multiprocessing
import time
import weakref
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data._utils import MP_STATUS_CHECK_INTERVAL

from asynchat import Trainer

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
