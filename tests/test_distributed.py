"""DistributedDataParallelTrainer with real gloo process groups in real processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import rank_jobs
import torch
from torch import nn
from torch.utils.data import DataLoader

from asynchat import DistributedDataParallelTrainer, launch


@pytest.mark.slow
def test_two_ranks_match_one_process_on_the_global_batch(tmp_path: Path) -> None:
    launch(rank_jobs.ddp_train, nprocs=2, args=(str(tmp_path), -1))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 8  # 64 / (2 x 8) x 2 epochs
    for name, value in ranks[0]["model"].items():
        assert torch.equal(value, ranks[1]["model"][name]), "the replicas stay identical"

    # One process, batches of 16: DistributedSampler(shuffle=False) gives rank r the samples
    # r, r + 2, ..., so each step's two shards together are 16 consecutive samples.
    reference = rank_jobs.ddp_model()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(2):
        for inputs, targets in DataLoader(rank_jobs.ddp_data(), batch_size=16):
            loss_fn(reference(inputs), targets).backward()
            optimizer.step()
            optimizer.zero_grad()
    for name, value in reference.state_dict().items():
        assert torch.allclose(value, ranks[0]["model"][name], atol=1e-6), name


@pytest.mark.slow
def test_stop_on_rank_zero_stops_every_rank_after_the_same_step(tmp_path: Path) -> None:
    launch(rank_jobs.ddp_train, nprocs=2, args=(str(tmp_path), 3))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["global_step"] for r in ranks] == [3, 3]
    assert ranks[0]["stop_reason"] == "rank 0 had enough"
    assert ranks[1]["stop_reason"] == "stopped on another rank"


def test_needs_a_process_group() -> None:
    with pytest.raises(RuntimeError, match="needs an initialised process group"):
        DistributedDataParallelTrainer(
            nn.Linear(2, 2), [], lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
            loss_fn=nn.MSELoss(), num_epochs=1,
        )  # fmt: skip
