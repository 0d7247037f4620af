"""DistributedDataParallelTrainer with real gloo process groups in real processes."""

from __future__ import annotations

import datetime
import json
import re
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
import rank_jobs
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from asynchat import DistributedDataParallelTrainer, LaunchError, Trainer, launch
from asynchat.callbacks import CheckpointWarning, LossMonitor, MetricUpdater, load_checkpoint


def global_batches(epochs: int = 2) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``rank_jobs.ddp_data()`` as one process sees what two ranks of ``ddp_train`` (8 each,
    shuffled) see together: each epoch's DistributedSampler permutation (seed 0 + epoch)
    gives rank r the positions r, r + 2, ..., so each step's two shards together are 16
    consecutive entries of the permutation. ``(step within the epoch, inputs, targets)``."""
    data = rank_jobs.ddp_data()
    for epoch in range(epochs):
        order = torch.randperm(64, generator=torch.Generator().manual_seed(epoch)).tolist()
        for step, start in enumerate(range(0, 64, 16)):
            inputs, targets = data[order[start : start + 16]]
            yield step, inputs, targets


@pytest.mark.slow
@pytest.mark.parametrize("accumulate", [1, 2], ids=["every-step", "accumulate-2-no-sync"])
def test_two_ranks_match_one_process_on_the_global_batch(tmp_path: Path, accumulate: int) -> None:
    launch(rank_jobs.ddp_train, nprocs=2, args=(str(tmp_path), -1, "", False, accumulate))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 8  # 64 / (2 x 8) x 2 epochs
    for name, value in ranks[0]["model"].items():
        assert torch.equal(value, ranks[1]["model"][name]), "the replicas stay identical"

    reference = rank_jobs.ddp_model()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    for step, inputs, targets in global_batches():
        (loss_fn(reference(inputs), targets) / accumulate).backward()
        if (step + 1) % accumulate == 0:
            optimizer.step()
            optimizer.zero_grad()
    for name, value in reference.state_dict().items():
        assert torch.allclose(value, ranks[0]["model"][name], atol=1e-6), name


@pytest.mark.slow
def test_two_optimizers_on_one_loss_match_one_process_on_the_global_batch(
    tmp_path: Path,
) -> None:
    launch(rank_jobs.ddp_two_optimizers_one_loss, nprocs=2, args=(str(tmp_path),))
    ranks = [torch.load(tmp_path / f"two-rank{r}.pt", weights_only=True) for r in range(2)]
    reference = rank_jobs.ddp_model()
    first = torch.optim.SGD(reference[0].parameters(), lr=0.1, momentum=0.9)
    last = torch.optim.Adam(reference[2].parameters(), lr=0.01)
    for _, inputs, targets in global_batches():
        nn.functional.cross_entropy(reference(inputs), targets).backward()
        for optimizer in (first, last):
            optimizer.step()
            optimizer.zero_grad()
    for name, value in reference.state_dict().items():
        assert torch.equal(ranks[0]["model"][name], ranks[1]["model"][name]), name
        assert torch.allclose(value, ranks[0]["model"][name], atol=1e-6), name


@pytest.mark.slow
def test_a_model_that_computes_its_own_loss_trains_as_one_scored_by_a_loss_function(
    tmp_path: Path,
) -> None:
    # loss_fn=model_loss on dict batches under DDP: each rank's replica equals, to the bit,
    # the one trained on (inputs, targets) pairs with loss_fn=CrossEntropyLoss().
    launch(rank_jobs.ddp_own_loss, nprocs=2, args=(str(tmp_path),))
    launch(rank_jobs.ddp_train, nprocs=2, args=(str(tmp_path), -1))
    scored = torch.load(tmp_path / "rank0.pt", weights_only=True)["model"]
    initial = rank_jobs.ddp_model().state_dict()
    for rank in range(2):
        own = torch.load(tmp_path / f"own-rank{rank}.pt", weights_only=True)["model"]
        for name, value in own.items():
            assert torch.equal(value, scored[name]), name
            assert not torch.equal(value, initial[name]), name


@pytest.mark.slow
@pytest.mark.parametrize(
    ("accumulate", "lag", "ends_at"),
    [(1, 0, 3), (2, 0, 4), (1, 1, 4), (2, 1, 4)],
    ids=["every-step", "accumulate-2", "every-step-lag-1", "accumulate-2-lag-1"],
)
def test_stop_on_rank_zero_stops_every_rank_after_the_same_step(
    tmp_path: Path, accumulate: int, lag: int, ends_at: int
) -> None:
    # With accumulation, every rank goes on to the window's update (after global step 4);
    # with control_lag=1 every rank ends a step after the one the stop was asked in.
    launch(rank_jobs.ddp_train, nprocs=2, args=(str(tmp_path), 3, "", False, accumulate, lag))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["global_step"] for r in ranks] == [ends_at, ends_at]
    assert ranks[0]["stop_reason"] == "rank 0 had enough"
    assert ranks[1]["stop_reason"] == "stopped on another rank"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("accumulate", "stop_at", "saved"),
    [(1, 3, [3]), (2, 5, [4, 6])],
    ids=["every-step", "accumulate-2"],
)
@pytest.mark.parametrize("lag", [0, 1], ids=["", "lag-1"])
def test_resume_across_the_same_world_size(
    tmp_path: Path, accumulate: int, stop_at: int, saved: list[int], lag: int
) -> None:
    # Checkpoints every 3 steps; with accumulation each is saved at its window's end (4, 6),
    # and the stop at 5 waits for the update after 6.
    straight, first, resumed = (tmp_path / name for name in ("straight", "first", "resumed"))
    for directory in (straight, first, resumed):
        directory.mkdir()
    checkpoints = str(tmp_path / "checkpoints")
    launch(rank_jobs.ddp_train, nprocs=2, args=(str(straight), -1, "", False, accumulate, lag))
    launch(rank_jobs.ddp_train, nprocs=2,
           args=(str(first), stop_at, checkpoints, False, accumulate, lag))  # fmt: skip
    launch(rank_jobs.ddp_train, nprocs=2,
           args=(str(resumed), -1, checkpoints, True, accumulate, lag))  # fmt: skip
    assert [p.name for p in sorted((tmp_path / "checkpoints").glob("*.ckpt"))] == [
        f"step-{step:09d}.ckpt" for step in saved
    ], "rank 0 alone wrote the checkpoints"
    for rank in range(2):
        a = torch.load(straight / f"rank{rank}.pt", weights_only=True)
        b = torch.load(resumed / f"rank{rank}.pt", weights_only=True)
        assert a["global_step"] == b["global_step"] == 8
        for name, value in a["model"].items():
            assert torch.equal(value, b["model"][name]), (rank, name)
    # One run_id a run, rank 0's on every rank (each drew its own); the resumed run's, the
    # checkpoint's (of the first run).
    run_ids = {
        name: {torch.load(tmp_path / name / f"rank{r}.pt")["run_id"] for r in range(2)}
        for name in ("straight", "first", "resumed")
    }
    assert all(len(ids) == 1 for ids in run_ids.values()), run_ids
    assert run_ids["resumed"] == run_ids["first"] != run_ids["straight"]


@pytest.mark.slow
@pytest.mark.parametrize(("samples", "strided"), [(80, False), (61, True)], ids=["even", "uneven"])
def test_validation_loss_is_the_mean_over_every_ranks_shard(
    tmp_path: Path, samples: int, strided: bool
) -> None:
    # Each rank published the mean over its own shard (1.036 and 1.094 where the whole set
    # gave 1.065): rank 0 ranked checkpoints by half the data, and EarlyStopping on each
    # rank saw another value. The torchmetrics were global already. Shards one apart in
    # size (31 and 30 samples, what the DistributedSampler's padding warning advises) too.
    launch(rank_jobs.validate_shards, nprocs=2, args=(str(tmp_path), samples, strided))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    model = rank_jobs.ddp_model()
    model.load_state_dict(ranks[0]["model"])
    inputs, targets = (t[:samples] for t in rank_jobs.ddp_data().tensors)
    with torch.no_grad():
        expected = nn.CrossEntropyLoss()(model(inputs), targets).item()
    assert ranks[0]["val/loss"] == ranks[1]["val/loss"]
    assert ranks[0]["val/loss"] == pytest.approx(expected, rel=1e-5)


def test_a_plateau_schedule_follows_only_a_metric_every_rank_shares(tmp_path: Path) -> None:
    # On LossMonitor's train/mean_loss (each rank's mean of its own losses), each rank's
    # ReduceLROnPlateau saw another value: the ranks trained at different rates and the
    # replicas drifted apart without a word (0.017 apart after 4 epochs in a probe).
    with pytest.raises(LaunchError) as info:
        launch(rank_jobs.plateau_schedule, nprocs=2, args=(str(tmp_path), "train/mean_loss"))
    assert "ValueError: LRSchedule(monitor='train/mean_loss'): 'train/mean_loss' is each " in (
        str(info.value)
    )
    assert "Monitor a metric that is the same on every rank" in str(info.value)
    # On val/loss (the mean over every rank's shard): one rate, one model, on every rank.
    launch(rank_jobs.plateau_schedule, nprocs=2, args=(str(tmp_path), "val/loss"))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["lr"] == ranks[1]["lr"] == pytest.approx(0.1 / 2**3)  # one a validation
    for name, value in ranks[0]["model"].items():
        assert torch.equal(value, ranks[1]["model"][name]), name


def test_two_distributed_trainers_of_a_process_run_one_at_a_time(tmp_path: Path) -> None:
    # Two DDP trainers started together in each rank's process: their gradient all-reduces
    # and agreements paired up wrongly across the ranks, and gloo aborted the job (SIGABRT,
    # "Received data size doesn't match expected size"). The second is refused, naming both.
    with pytest.raises(LaunchError) as info:
        launch(rank_jobs.two_trainers, nprocs=2, args=(str(tmp_path), "together"))
    assert re.search(
        r"InUseError: distributeddataparalleltrainer-\d cannot run while "
        r"distributeddataparalleltrainer-\d runs: both step with the other ranks",
        str(info.value),
    )
    # One inside the other (the first waits in its hook): both train, alike on every rank.
    launch(rank_jobs.two_trainers, nprocs=2, args=(str(tmp_path), "nested"))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for which in ("first", "second"):
        for name, value in ranks[0][which].items():
            assert torch.equal(value, ranks[1][which][name]), (which, name)
    assert not torch.equal(ranks[0]["first"]["0.weight"], rank_jobs.ddp_model()[0].weight)


@pytest.mark.slow
@pytest.mark.parametrize("lag", [0, 1], ids=["", "lag-1"])
def test_a_rank_cancelled_at_a_validation_ends_with_the_others(tmp_path: Path, lag: int) -> None:
    # Rank 0's validation was cut short by its own cancellation while rank 1's went on
    # into the loss's all-reduce: the two ranks' collectives no longer matched, and the job
    # failed on a gloo timeout. The validation is part of the step: it runs to its end.
    launch(
        rank_jobs.cancel_rank_zero_at_a_validation, nprocs=2, args=(str(tmp_path), lag),
        collective_timeout=timedelta(seconds=30),
    )  # fmt: skip
    ends = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ends[0] == ["cancelled", 2 + lag, 2, "cancelled"]
    # Both validated at step 2 and ended there (with control_lag=1 a step later); rank 1
    # says why (its stop_reason was None, and a monitor's end-of-run warning took the run
    # for one that went to its end).
    assert ends[1][1:] == [2 + lag, 2, "cancelled on another rank"]


@pytest.mark.slow
def test_a_resumed_loss_monitor_goes_on_with_each_ranks_own_interval(tmp_path: Path) -> None:
    # The checkpoint held rank 0's interval; rank 1 first took it for its own (a mean
    # mixing rank 0's losses with its own), then started afresh (the mean of the steps
    # after the resume). Each rank's interval is in the checkpoint now: both go on exactly.
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    for directory in (straight, stopped):
        directory.mkdir()
    launch(rank_jobs.loss_monitor_across_a_stop, nprocs=2,
           args=(str(straight), str(tmp_path / "c1"), 0))  # fmt: skip
    launch(rank_jobs.loss_monitor_across_a_stop, nprocs=2,
           args=(str(stopped), str(tmp_path / "c2"), 2))  # fmt: skip
    for rank in range(2):
        resumed = torch.load(stopped / f"rank{rank}.pt", weights_only=True)
        reference = torch.load(straight / f"rank{rank}.pt", weights_only=True)
        assert sorted(resumed["losses"]) == [3, 4]  # the resumed run's steps
        assert resumed["published"][4] == pytest.approx(reference["published"][4], rel=1e-6)
    means = [torch.load(straight / f"rank{r}.pt", weights_only=True)["published"] for r in (0, 1)]
    assert means[0][4] != means[1][4]  # each rank's own losses


@pytest.mark.slow
def test_a_checkpoint_written_before_rank_parts_gives_rank_zeros_interval_to_rank_zero_only(
    tmp_path: Path,
) -> None:
    # Such a checkpoint holds rank 0's interval alone: rank 1 took it for its own once
    # each rank resumed its LossMonitor, and published a mean mixing rank 0's losses.
    launch(rank_jobs.loss_monitor_across_a_stop, nprocs=2,
           args=(str(tmp_path), str(tmp_path / "c"), 2, True))  # fmt: skip
    rank_one = torch.load(tmp_path / "rank1.pt", weights_only=True)
    own = rank_one["losses"]  # the resumed run's steps, 3 and 4: afresh
    assert rank_one["published"][4] == pytest.approx((own[3] + own[4]) / 2, rel=1e-6)


@pytest.mark.slow
def test_ranks_seeded_apart_each_resume_from_their_own_state(tmp_path: Path) -> None:
    # The checkpoint held rank 0's random states, and every rank resumed from them: ranks
    # seeded apart (nanoGPT's seed offset) drew the same dropout masks after a resume, and
    # the job ended with other weights than the uninterrupted one. A MetricUpdater's
    # epoch-so-far states were left out of distributed checkpoints altogether.
    for name, stop_at in (("straight", 0), ("stopped", 2)):
        (tmp_path / name).mkdir()
        checkpoints = str(tmp_path / f"{name}-ckpt")
        launch(rank_jobs.seeded_apart_across_a_stop, nprocs=2,
               args=(str(tmp_path / name), checkpoints, stop_at))  # fmt: skip
    ends = {
        name: [torch.load(tmp_path / name / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
        for name in ("straight", "stopped")
    }
    for straight, resumed in zip(ends["straight"], ends["stopped"], strict=True):
        assert all(map(torch.equal, straight["weights"], resumed["weights"]))
        assert resumed["metrics"] == straight["metrics"]
    # On another number of ranks a shard's states have no rank to go to: said, not lost silently.
    trainer = Trainer(
        rank_jobs.dropout_model(), DataLoader(rank_jobs.ddp_data(), batch_size=8),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1),  # (the saved run's)
        loss_fn=nn.CrossEntropyLoss(), num_epochs=2, device="cpu",
        callbacks=[MetricUpdater({"accuracy": MulticlassAccuracy(3, average="micro")}),
                   LossMonitor(3)],
        resume_from=tmp_path / "stopped-ckpt",
    )  # fmt: skip
    lost = r"written by 2 rank\(s\) and this run has 1: the per-rank state of LossMonitor, Metric"
    with pytest.warns(CheckpointWarning, match=lost):
        anyio.run(trainer.fit)
    assert trainer.state.global_step == 4 + 8  # then the second epoch, on one process


def test_only_rank_zero_writes_a_ddp_checkpoint_holding_every_ranks_part(
    tmp_path: Path,
) -> None:
    # Once every rank took part in a save, rank 1 went on to write the checkpoint too
    # (without the other ranks' parts), its manifest and its pruning, into the same
    # directory: whichever rename landed last was the checkpoint.
    launch(rank_jobs.checkpoint_per_rank_directory, nprocs=2, args=(str(tmp_path),))
    assert not (tmp_path / "rank1").exists()
    files = sorted((tmp_path / "rank0").glob("step-*.ckpt"))
    assert [f.name for f in files] == [f"step-{s:09d}.ckpt" for s in (1, 2, 3, 4)]
    for file in files:
        checkpoint = torch.load(file, weights_only=True)
        assert len(checkpoint["ranks"]) == 2
        assert checkpoint["ranks"][0]["rng"]["python"] == checkpoint["rng"]["python"]
    # A callback's own files are brought up to date where the save writes, on rank 0: once
    # every rank took part in saves, rank 1's on_checkpoint ran too, for a save it never
    # writes.
    assert (tmp_path / "on_checkpoint.rank0").read_text().split() == ["1", "2", "3", "4"]
    assert not (tmp_path / "on_checkpoint.rank1").exists()


@pytest.mark.parametrize(
    ("how", "listed"),
    [
        ("missing", "rank 0: Checkpoint(every_n_steps=None, every_n_epochs=None, "
                    "save_on_end=True); rank 1: GradClip)"),
        ("schedule", "rank 0: Checkpoint(every_n_steps=2, every_n_epochs=None, save_on_end=True);"
                     " rank 1: Checkpoint(every_n_steps=3,"),
    ],
)  # fmt: skip
def test_callbacks_that_act_together_must_be_alike_on_every_rank(
    tmp_path: Path, how: str, listed: str
) -> None:
    # A Checkpoint on rank 0 alone (or on another schedule) paired its save agreement with
    # rank 1's step agreement: the job failed after the collective timeout (20 s here, 5
    # min by default), at the first save. A GradClip on one rank drove its replica apart.
    started = time.monotonic()
    with pytest.raises(LaunchError) as info:
        launch(rank_jobs.callbacks_unlike, nprocs=2, args=(str(tmp_path / "ckpt"), how),
               collective_timeout=timedelta(seconds=20))  # fmt: skip
    message = str(info.value)
    assert "callbacks must be alike on every rank of a DistributedDataParallelTrainer" in message
    assert listed in message
    assert time.monotonic() - started < 15
    assert not (tmp_path / "ckpt").exists(), "refused before any hook ran"


def uneven_reference(accumulate: int) -> list[torch.Tensor]:
    """The uneven-data jobs' weights trained in one process: each step on both ranks'
    batches at once (DDP's mean of two equal batches' gradients), 4 steps an epoch."""
    model = rank_jobs.ddp_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ranks = [list(DataLoader(rank_jobs.uneven_samples(rank), batch_size=8)) for rank in (0, 1)]
    for _epoch in range(2):
        for step in range(4):
            x, y = (torch.cat(parts) for parts in zip(ranks[0][step], ranks[1][step], strict=True))
            (nn.functional.cross_entropy(model(x), y) / accumulate).backward()
            if (step + 1) % accumulate == 0 or step == 3:
                optimizer.step()
                optimizer.zero_grad()
    return [p.detach().flatten() for p in model.parameters()]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "accumulate"), [("list", 1), ("stream", 1), ("stream", 3), ("async", 3)],
    ids=["lengths-known", "no-length", "no-length-accumulate-3", "async-accumulate-3"],
)  # fmt: skip
def test_ranks_with_uneven_data_run_as_many_steps_as_the_shortest(
    tmp_path: Path, kind: str, accumulate: int
) -> None:
    # Rank 1 has 7 batches an epoch, rank 0 has 4. Rank 1 went on alone to its fifth step,
    # whose gradient all-reduce met rank 0's next agreement: gloo aborted the job ("Received
    # data size doesn't match expected size"), NCCL would hang. A DataLoader over an
    # IterableDataset was refused when the trainer tried to give it a DistributedSampler.
    launch(rank_jobs.uneven_data, nprocs=2, args=(str(tmp_path), kind, accumulate),
           collective_timeout=timedelta(seconds=20))  # fmt: skip
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["steps"] for r in ranks] == [[4, 4], [4, 4]]
    assert [r["global_step"] for r in ranks] == [8, 8]
    reference = uneven_reference(accumulate)
    for result in ranks:
        for got, want in zip(result["weights"], reference, strict=True):
            torch.testing.assert_close(torch.tensor(got), want)
    told = {0: ranks[0]["warnings"], 1: ranks[1]["warnings"]}
    if kind == "list":  # rank 0 names every rank's count
        assert told[1] == [] and len(told[0]) == 1
        assert "different numbers of batches (rank 0: 4, rank 1: 7)" in told[0][0]
    else:  # the rank cut short says so, once
        assert told[0] == [] and len(told[1]) == 1
        assert "rank 1's data had more batches than another rank's in epoch 0" in told[1][0]


@pytest.mark.parametrize(
    ("how", "rank_one"),
    [("steps", "num_steps=8, batch_processor=BasicBatchProcessor(grad_accumulation_steps=1,"),
     ("accumulate", "num_steps=5, batch_processor=BasicBatchProcessor(grad_accumulation_steps=2,")],
)  # fmt: skip
def test_ranks_built_with_other_bounds_or_steps_are_refused_before_training(
    how: str, rank_one: str
) -> None:
    # With more steps rank 1 went on alone and waited in a collective until the timeout (5
    # minutes by default; 18.6 s with 15 s); accumulating apart, gloo aborted the job.
    started = time.monotonic()
    with pytest.raises(LaunchError) as info:
        launch(rank_jobs.settings_unlike, nprocs=2, args=(how,),
               collective_timeout=timedelta(seconds=20))  # fmt: skip
    message = str(info.value)
    assert "a DistributedDataParallelTrainer must be built alike on every rank" in message
    assert "rank 0: num_epochs=None, num_steps=5, batch_processor=BasicBatchProcessor(" in message
    assert f"rank 1: num_epochs=None, {rank_one}" in message
    assert time.monotonic() - started < 15


@pytest.mark.slow
def test_a_batch_sampler_over_a_distributed_sampler_is_each_ranks_shard_epoch_by_epoch(
    tmp_path: Path,
) -> None:
    # It was rebuilt around a second DistributedSampler with batch_size=None (a
    # batch_sampler's DataLoader has none): the default collate then stacked the parts of
    # single samples ("stack expects each tensor to be equal size").
    launch(rank_jobs.batch_sampler_shards, nprocs=2, args=(str(tmp_path), "distributed"))
    firsts = rank_jobs.ddp_data().tensors[0][:, 0].tolist()
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        sampler = torch.utils.data.DistributedSampler(
            rank_jobs.ddp_data(), num_replicas=2, rank=rank, shuffle=True, seed=0
        )
        for epoch in (0, 1):
            sampler.set_epoch(epoch)  # the trainer's set_epoch reached the inner sampler
            assert [firsts.index(value) for value in seen[epoch]] == list(sampler)


def test_a_batch_sampler_of_the_users_own_is_refused_naming_the_way(tmp_path: Path) -> None:
    with pytest.raises(LaunchError) as info:
        launch(rank_jobs.batch_sampler_shards, nprocs=2, args=(str(tmp_path), "plain"))
    assert "a DataLoader with a batch_sampler (BatchSampler) cannot be sharded" in str(info.value)
    assert "BatchSampler(DistributedSampler(dataset), batch_size, drop_last)" in str(info.value)


def test_ranks_agree_each_epochs_length_as_their_data_says_at_that_epoch(
    tmp_path: Path,
) -> None:
    # Rank 0 has 3 then 4 batches, rank 1 has 5 then 6: every rank runs 3 then 4 steps.
    launch(rank_jobs.growing_epochs, nprocs=2, args=(str(tmp_path),))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["steps"] for r in ranks] == [[3, 4], [3, 4]]
    assert ranks[1]["warnings"] == []
    told = ranks[0]["warnings"]
    assert len(told) == 2
    assert "(rank 0: 3, rank 1: 5)" in told[0] and "(rank 0: 4, rank 1: 6)" in told[1]


def test_each_rank_predicts_its_shard_and_rank_zero_gathers(tmp_path: Path) -> None:
    launch(rank_jobs.predict_shard, nprocs=2, args=(str(tmp_path),))
    gathered = torch.load(tmp_path / "gathered.pt", weights_only=True)
    assert gathered.shape == (64, 8)
    rows = {tuple(row.tolist()) for row in gathered}
    assert rows == {tuple(row.tolist()) for row in rank_jobs.ddp_data().tensors[0]}


def test_data_parallel_trainer_is_the_plain_trainer_without_several_gpus() -> None:
    from asynchat import DataParallelTrainer, Trainer

    models = [rank_jobs.ddp_model(), rank_jobs.ddp_model()]
    for cls, model in zip((DataParallelTrainer, Trainer), models, strict=True):
        loader = DataLoader(rank_jobs.ddp_data(), batch_size=16)
        trainer = cls(model, loader, lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                      loss_fn=nn.CrossEntropyLoss(), num_epochs=1, device="cpu")  # fmt: skip
        anyio.run(trainer.fit)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"device_ids \[7\] are not visible CUDA devices"):
        DataParallelTrainer(rank_jobs.ddp_model(), [], lambda m: torch.optim.SGD(m.parameters()),
                            loss_fn=nn.MSELoss(), num_epochs=1, device_ids=[7])  # fmt: skip


def test_data_parallel_gathers_the_replicas_scalar_losses_into_their_mean() -> None:
    # nn.DataParallel gathers each replica's scalar loss into a vector (one per GPU), which
    # model_loss refused ("no loss in it"): the DataParallelTrainer of a model that scores
    # itself failed at its first step on several GPUs. (The gather itself needs GPUs: see
    # tests/test_cuda.py; here the places and the mean, on what it would give.)
    from collections import namedtuple

    from asynchat._distributed import mean_of_replicas, scalar_loss_place

    logits = torch.zeros(4, 3)
    scalar = torch.tensor(1.0)
    assert scalar_loss_place([{"logits": logits, "loss": scalar}] * 2) == ("loss",)
    assert scalar_loss_place([(logits, scalar)] * 2) == (1,)
    assert scalar_loss_place([scalar, scalar]) == (None,)
    assert scalar_loss_place([logits, logits]) is None  # outputs, not a loss
    assert scalar_loss_place([{"loss": torch.ones(4)}] * 2) is None  # per sample: gathered
    assert scalar_loss_place([(scalar, scalar)] * 2) is None  # which one is the loss?
    assert scalar_loss_place([{"loss": scalar}, {"logits": logits}]) is None

    losses = torch.tensor([1.0, 3.0], requires_grad=True)  # as gathered: one per replica
    mean = mean_of_replicas({"logits": logits, "loss": losses}, ("loss",), [3, 1])
    assert mean["loss"].dim() == 0 and mean["loss"].item() == 1.5  # (1 x 3 + 3 x 1) / 4
    mean["loss"].backward()
    assert losses.grad is not None and losses.grad.tolist() == [0.75, 0.25]
    Pair = namedtuple("Pair", "logits loss")
    assert mean_of_replicas(Pair(logits, losses), (1,), [2, 2]).loss.item() == 2.0
    assert mean_of_replicas((losses, logits), (0,), [2, 2])[0].item() == 2.0
    assert mean_of_replicas(losses, (None,), [1, 3]).item() == 2.5
    assert mean_of_replicas(losses, (None,), [0, 0]).item() == 2.0  # shares not counted


@pytest.mark.slow
def test_a_nan_on_one_rank_ends_every_rank() -> None:
    started = time.monotonic()
    with pytest.raises(LaunchError, match="NonFiniteLossError"):
        launch(rank_jobs.nan_on_rank_one, nprocs=2)
    assert time.monotonic() - started < 60, "no rank waited in a collective"


def test_sync_batchnorm_needs_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the CPU error")
    with pytest.raises(ValueError, match="sync_batchnorm=True needs a CUDA device"):
        DistributedDataParallelTrainer(
            nn.Linear(2, 2), [], lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
            loss_fn=nn.MSELoss(), num_epochs=1, sync_batchnorm=True,
        )  # fmt: skip


@pytest.mark.parametrize("lag", [2, -1, True, 0.5])
def test_control_lag_is_0_or_1(lag: Any) -> None:
    with pytest.raises(ValueError, match=rf"control_lag must be 0 or 1, got {lag!r}"):
        DistributedDataParallelTrainer(
            nn.Linear(2, 2), [], lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
            loss_fn=nn.MSELoss(), num_epochs=1, control_lag=lag,
        )  # fmt: skip


def test_needs_a_process_group() -> None:
    with pytest.raises(RuntimeError, match="needs an initialised process group"):
        DistributedDataParallelTrainer(
            nn.Linear(2, 2), [], lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
            loss_fn=nn.MSELoss(), num_epochs=1,
        )  # fmt: skip


def control_results(
    tmp_path: Path, scenario: str, lag: int = 0, streamed: bool = False
) -> list[dict[str, Any]]:
    launch(rank_jobs.ddp_control, nprocs=2, args=(str(tmp_path), scenario, lag, streamed),
           collective_timeout=datetime.timedelta(seconds=60))  # fmt: skip
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]


# Data without a len(): the boundary before each step is agreed with the read that tells
# whether the epoch ends there (one all-reduce), so it acts at once with control_lag=1 too.
LAGS_AND_DATA = pytest.mark.parametrize(
    ("lag", "streamed"), [(0, False), (1, False), (0, True), (1, True)],
    ids=["", "lag-1", "streamed", "streamed-lag-1"],
)  # fmt: skip


@LAGS_AND_DATA
def test_pausing_one_rank_holds_every_rank_and_both_finish_equal(
    tmp_path: Path, lag: int, streamed: bool
) -> None:
    results = control_results(tmp_path, "pause", lag, streamed)
    assert [r["global_step"] for r in results] == [12, 12]  # 3 epochs of 4 steps each
    for a, b in zip(results[0]["model"].values(), results[1]["model"].values(), strict=True):
        assert torch.equal(a, b)
    for r in results:  # both were held: paused, then running again
        assert "paused" in r["statuses"] and r["statuses"][-1] == "finished"


@LAGS_AND_DATA
def test_a_stop_during_one_ranks_on_epoch_end_ends_every_rank_after_the_same_step(
    tmp_path: Path, lag: int, streamed: bool
) -> None:
    # The epoch's boundary agrees at once, with control_lag=1 too: no step of the next.
    results = control_results(tmp_path, "stop-at-epoch-end", lag, streamed)
    assert [r["global_step"] for r in results] == [4, 4]
    assert results[0]["stop_reason"] == "rank 0 decided at the epoch's end"
    assert results[1]["stop_reason"] == "stopped on another rank"


@LAGS_AND_DATA
def test_a_stop_at_one_ranks_step_ends_every_rank_at_the_same_step(
    tmp_path: Path, lag: int, streamed: bool
) -> None:
    # Asked at step 6: every rank ends there; with control_lag=1 at step 7, unless the data
    # has no len() (the boundary is agreed at once with the next batch's read).
    results = control_results(tmp_path, "stop-at-step", lag, streamed)
    ends_at = 7 if lag and not streamed else 6
    assert [r["global_step"] for r in results] == [ends_at, ends_at]
    for a, b in zip(results[0]["model"].values(), results[1]["model"].values(), strict=True):
        assert torch.equal(a, b)
    assert [r["stop_reason"] for r in results] == ["rank 0 had enough", "stopped on another rank"]


def resumes_as_if_uninterrupted(
    tmp_path: Path, job: Any, interrupted: str, steps: tuple[int, int, int], *args: Any
) -> None:
    """Launch ``job(rank, world_size, out, phase, *args)`` over two ranks for the phases
    ``straight``, ``interrupted`` and ``resumed`` (each writes ``out/rank<r>.pt``); on each
    rank the three runs end at ``steps``, and the resumed weights are the straight run's,
    bitwise."""
    runs = {phase: tmp_path / phase for phase in ("straight", interrupted, "resumed")}
    for phase, out in runs.items():
        out.mkdir()
        launch(job, nprocs=2, args=(str(out), phase, *args),
               collective_timeout=datetime.timedelta(seconds=60))  # fmt: skip
    for rank in range(2):
        straight, stopped, resumed = (
            torch.load(out / f"rank{rank}.pt", weights_only=True) for out in runs.values()
        )
        assert (straight["global_step"], stopped["global_step"], resumed["global_step"]) == steps
        for name, value in straight["model"].items():
            assert torch.equal(value, resumed["model"][name]), name


@pytest.mark.parametrize("workers", [0, 1], ids=["in-the-main-process", "in-workers"])
def test_a_stop_then_resume_over_randomly_augmented_data_equals_an_uninterrupted_run(
    tmp_path: Path, workers: int
) -> None:
    # The dataset draws noise from torch's generator as each sample is read. The resumed
    # run read its first batch with the state of the epoch's start (the order re-drawn),
    # and only then put back the stopped run's: that batch's noise, and all after, differed.
    # In a worker, the resumed epoch's batches met the worker's generator where the new
    # worker's seed put it, not where the batches skipped had left it.
    resumes_as_if_uninterrupted(
        tmp_path, rank_jobs.augmented_stop_resume, "stopped", (8, 2, 8), workers
    )


def test_a_rank_with_more_data_resumes_from_a_cancellation_at_an_epochs_last_step(
    tmp_path: Path,
) -> None:
    """Regression: a rank whose data had more batches than the ranks agreed to run read one
    more (its random augmentation drawing from torch's RNG) after each epoch's last step.
    Cancelled there, the epoch's end did not run and its checkpoint was inside the epoch; the
    resumed run went on with nothing left of the epoch and read that batch again, so rank 1
    began the next epoch from another RNG state than the uninterrupted run. The extra
    batches are now left unread, as the ranks' agreement says."""
    resumes_as_if_uninterrupted(
        tmp_path, rank_jobs.uneven_augmented_cancel_resume, "cancelled", (8, 4, 8)
    )


def test_a_distributed_step_costs_one_agreement_with_or_without_a_data_length(
    tmp_path: Path,
) -> None:
    # Data without a len() agreed the epoch's end before each step in an all-reduce of its
    # own, besides the boundary's after it: two blocking round trips a step (3.5 ms
    # against 2.6 a step on benchmarks/uneven_data.py). The end rides with the boundary now.
    launch(rank_jobs.agreements_a_step, nprocs=2, args=(str(tmp_path),),
           collective_timeout=datetime.timedelta(seconds=60))  # fmt: skip
    for rank in range(2):
        counts = json.loads((tmp_path / f"rank{rank}.json").read_text())
        per_step = {run: (ten - four) / 6 for run, (four, ten) in counts.items()}
        assert per_step == {"list-0": 1, "list-1": 1, "stream-0": 1, "stream-1": 1}


def test_freeze_module_takes_the_unwrapped_names_under_ddp(tmp_path: Path) -> None:
    results = control_results(tmp_path, "freeze")
    initial = rank_jobs.ddp_model().state_dict()
    for r in results:
        assert torch.equal(r["model"]["0.weight"], initial["0.weight"]), "frozen"
        assert not torch.equal(r["model"]["2.weight"], initial["2.weight"]), "trained"


def test_freeze_module_under_ddp_without_unused_parameters_is_refused_before_a_step() -> None:
    # It failed at the first backward with torch's "Expected to have finished reduction in
    # the prior iteration", which names neither FreezeModule nor the fix.
    with pytest.raises(LaunchError, match=r"FreezeModule\(\['0'\]\) under DDP needs .*"
                       r"find_unused_parameters=True"):  # fmt: skip
        launch(rank_jobs.frozen_without_unused_parameters, nprocs=2)


def test_a_predictor_under_launch_knows_its_rank(tmp_path: Path) -> None:
    launch(rank_jobs.ddp_control, nprocs=2, args=(str(tmp_path), "predictor"))
    assert (tmp_path / "rank0.txt").read_text() == "0 2 True"
    assert (tmp_path / "rank1.txt").read_text() == "1 2 False"


@pytest.mark.parametrize("mode", ["multi", "accumulate"])
def test_gradients_are_all_reduced_once_per_update_under_ddp(tmp_path: Path, mode: str) -> None:
    """Two sub-batches per step, or two steps per update: only the update's last backward
    all-reduces (before, DDP's no_sync wrapped the backward alone and did nothing)."""
    launch(rank_jobs.ddp_multibatch, nprocs=2, args=(str(tmp_path), mode))
    for rank in range(2):
        seen = (tmp_path / f"rank{rank}.txt").read_text()
        assert seen == " ".join(["local", "update synced"] * 4)


def test_data_parallel_device_must_be_the_first_of_device_ids() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    from asynchat import DataParallelTrainer

    with pytest.raises(ValueError, match=r"must be device_ids\[0\]"):
        DataParallelTrainer(nn.Linear(2, 2), [], torch.optim.SGD, loss_fn=nn.MSELoss(),
                            num_epochs=1, device="cuda:1", device_ids=[0, 1])  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    ("how", "lag", "saved"),
    [("request", 0, [3]), ("request", 1, [4]), ("request-stream", 0, [3]),
     ("request-stream", 1, [3]), ("request-fsdp", 1, [4]), ("both", 0, [3]),
     ("both-fsdp", 0, [3])],
    ids=["known-length", "known-length-lag-1", "stream", "stream-lag-1", "sharded-lag-1",
         "both-ranks", "both-ranks-sharded"],
)  # fmt: skip
def test_a_save_requested_on_one_rank_is_taken_by_every_rank_at_the_same_step(
    tmp_path: Path, how: str, lag: int, saved: list[int]
) -> None:
    # Asked on rank 1 at the end of step 2: the ask goes with the boundary's agreement, and
    # every rank saves a step later (two with control_lag=1; data without a len() agrees
    # its boundary with the next read, lag or not). Rank 0 writes what every rank gave.
    # The loop's other Checkpoint, asked nothing, saves nothing.
    # The future of an ask: on rank 0, the checkpoint's path once written; on rank 1,
    # None once its part is handed over (sharded, its shards written).
    launch(rank_jobs.asked_saves, nprocs=2, args=(str(tmp_path), how, lag))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    [entry] = json.loads((tmp_path / "checkpoints" / "manifest.json").read_text())["checkpoints"]
    path = str(tmp_path / "checkpoints" / entry["file"])
    served = [[path] if how.startswith("both") else "not asked", [None]]
    assert ranks == [{"first": [], "second": saved, "served": s} for s in served]
    assert not (tmp_path / "other" / "manifest.json").exists()
    assert entry["global_step"] == saved[0]
    if how.endswith("-fsdp"):  # every rank wrote its shards
        loaded, _ = load_checkpoint(tmp_path / "checkpoints")
        assert loaded["progress"]["global_step"] == saved[0]
    else:  # rank 0 wrote what every rank gave
        saved_ranks = torch.load(tmp_path / "checkpoints" / entry["file"], weights_only=True)
        assert len(saved_ranks["ranks"]) == 2


@pytest.mark.slow
def test_every_n_seconds_on_rank_zeros_clock_saves_every_rank_at_the_same_steps(
    tmp_path: Path,
) -> None:
    launch(rank_jobs.asked_saves, nprocs=2, args=(str(tmp_path), "clock", 1))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    listed = json.loads((tmp_path / "checkpoints" / "manifest.json").read_text())["checkpoints"]
    steps = [e["global_step"] for e in listed]
    assert ranks[0] == ranks[1] == {"first": [], "second": steps, "served": "not asked"}
    assert len(listed) >= 1


def test_each_rank_profiles_its_own_steps_into_a_trace_of_its_own(tmp_path: Path) -> None:
    launch(rank_jobs.profiled, nprocs=2, args=(str(tmp_path),))
    run_id = (tmp_path / "run_id0").read_text()  # (rank 0's, on every rank)
    for rank in range(2):
        trace = (
            tmp_path
            / f"distributeddataparalleltrainer-0-{run_id[:8]}-rank{rank}-step4.pt.trace.json"
        )
        events = json.loads(trace.read_text())["traceEvents"]
        recorded = {event.get("name") for event in events}
        assert {"ProfilerStep#1", "ProfilerStep#2", "aten::addmm"} <= recorded, rank


def test_a_failure_before_the_checkpoints_begin_is_reported_as_itself() -> None:
    # The Checkpoint's on_loop_end (teardown: it runs all the same) looked up its flag in
    # the ranks' agreements, which it takes in on_loop_begin: an IndexError was attached.
    with pytest.raises(LaunchError) as info:
        launch(rank_jobs.fails_as_it_begins, nprocs=2, args=("/nonexistent-never-written",))
    report = str(info.value)
    assert "RuntimeError: the first callback failed as the run began" in report
    assert "IndexError" not in report and "on_loop_end" not in report


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "accumulate", "lag"),
    [("sync", 1, 0), ("async", 1, 1), ("mixed", 1, 0), ("sync", 2, 0), ("short", 1, 0)],
    ids=["generators", "async-generators-lag-1", "generator-and-re-iterable",
         "accumulate-2", "rank-0-ends-with-the-stop"],
)  # fmt: skip
def test_a_stop_trains_what_ranks_took_from_data_read_once(
    tmp_path: Path, kind: str, accumulate: int, lag: int
) -> None:
    # The ranks agree a stop as they read the batch after the next, before the next one's
    # step: both were taken from each rank's stream and dropped (steps 0-2 trained of 0-4).
    # Now every rank trains them, the same steps on each, where data is read once on any.
    launch(rank_jobs.stream_stopped, nprocs=2, args=(str(tmp_path), kind, accumulate, lag),
           collective_timeout=timedelta(seconds=20))  # fmt: skip
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # Stopped as step 3 ends (accumulating 2: the window of steps 2-3 updates first).
    steps = {"short": 4}.get(kind, 6 if accumulate == 2 else 5)
    assert [r["global_step"] for r in ranks] == [steps, steps]
    assert ranks[0]["trained"] == ranks[0]["taken"] == list(range(steps))
    if kind == "short":  # rank 1's batch read ahead as rank 0's data ended: the one lost
        assert ranks[1]["taken"] == list(range(steps + 1))
        assert ranks[1]["trained"] == list(range(steps))
        told = "rank 1's epoch 0 ended with another rank's, whose wait for data a stop or a "
        assert [w for w in ranks[1]["warnings"] if told in w] != []
    else:
        assert ranks[1]["trained"] == ranks[1]["taken"] == list(range(steps))
    assert ranks[1]["stop_reason"] == "stopped on another rank"
    for mine, theirs in zip(ranks[0]["weights"], ranks[1]["weights"], strict=True):
        torch.testing.assert_close(torch.tensor(mine), torch.tensor(theirs))
    assert ranks[0]["warnings"] == []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "who"), [("async", "all"), ("sync", "all"), ("async", "rank0"), ("sync", "rank0")],
    ids=["async-every-rank", "sync-every-rank", "async-rank-0-beside-a-flowing-stream",
         "sync-rank-0-beside-a-flowing-stream"],
)  # fmt: skip
def test_a_stop_ends_ranks_that_wait_for_data(tmp_path: Path, kind: str, who: str) -> None:
    # Ranks whose streams waited for data could not be stopped: a stop on every rank (a
    # launcher's Ctrl-C, SIGTERM) waited with them, until data came (if ever). A rank's
    # wait is now ended by its stop after RANK_READ_PATIENCE_S, as the end of its data,
    # which every rank's epoch ends with (agreed before each step). Beside a stream that
    # still gives batches (rank 1, waiting in the agreement) the batch it read ahead is
    # not trained, and it says why.
    launch(rank_jobs.idle_stream_stopped, nprocs=2, args=(str(tmp_path), kind, who),
           hang_timeout=30, collective_timeout=timedelta(seconds=30))  # fmt: skip
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    steps = ranks[0]["global_step"]
    assert [r["global_step"] for r in ranks] == [steps, steps]
    assert ranks[0]["trained"] == list(range(steps))
    if who == "all":  # none came: the three each stream gave, all trained
        assert steps == 3
        assert all(r["took"] < 4.5 for r in ranks), [r["took"] for r in ranks]  # not at 5 s
        assert not any("did not return from __next__" in w for r in ranks for w in r["warnings"])
    else:  # rank 1's stream gave more before rank 0 was stopped; its last, not trained
        assert steps >= 3
        assert ranks[0]["took"] < 4.5
        told = [w for w in ranks[1]["warnings"] if "ended with another rank's" in w]
        assert len(told) == 1 and "a stop or a cancellation ended" in told[0]
    assert ranks[1]["stop_reason"] == ("enough" if who == "all" else "stopped on another rank")
    assert ranks[0]["warnings"] == []
