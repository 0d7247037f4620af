"""FullyShardedDataParallelTrainer (FSDP2) with real gloo process groups in real processes."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import rank_jobs
import torch
from conftest import make_loader
from torch import nn
from torch.utils.data import DataLoader

from asynchat import FullyShardedDataParallelTrainer, LaunchError, launch


@pytest.mark.slow
@pytest.mark.parametrize("accumulate", [1, 2], ids=["every-step", "accumulate-2"])
def test_two_sharded_ranks_match_one_process_on_the_global_batch(
    tmp_path: Path, accumulate: int
) -> None:
    """2 ranks x 16 samples a step == 1 process x 32, after 16 updates (rtol 1e-4)."""
    launch(rank_jobs.fsdp_train, nprocs=2, args=(str(tmp_path), accumulate))
    result = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    assert result["global_step"] == 16 * accumulate
    # Rank 0's shard of each parameter: the first half of its rows (rounded up).
    expected = [-(-p.shape[0] // 2) * p[0].numel() for p in rank_jobs.ddp_model().parameters()]
    assert result["shards"] == expected, "each rank held about half of each parameter"

    reference = rank_jobs.ddp_model()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    inputs, targets = rank_jobs.ddp_data().tensors
    for step in range(16):  # DistributedSampler without shuffling: rank r takes r, r + 2...
        start = (step * 32) % 64
        nn.CrossEntropyLoss()(reference(inputs[start : start + 32]),
                              targets[start : start + 32]).backward()  # fmt: skip
        optimizer.step()
        optimizer.zero_grad()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(result["model"][name], value, rtol=1e-4, atol=1e-6)


def test_sharding_needs_factories() -> None:
    model = rank_jobs.ddp_model()
    with pytest.raises(TypeError, match="needs optimizer factories"):
        FullyShardedDataParallelTrainer(
            model, make_loader(), torch.optim.SGD(model.parameters(), 0.1), num_steps=1,
            loss_fn=nn.CrossEntropyLoss(),
        )  # fmt: skip
    with pytest.raises(ValueError, match="mixed_precision must be None or 'bf16'"):
        FullyShardedDataParallelTrainer(
            model, make_loader(), lambda m: torch.optim.SGD(m.parameters(), 0.1), num_steps=1,
            loss_fn=nn.CrossEntropyLoss(), mixed_precision="fp16",  # type: ignore[arg-type]
        )  # fmt: skip


def test_a_shard_policy_must_return_the_models_own_submodules() -> None:
    # Before: None failed in list() ("'NoneType' object is not iterable"), naming nothing;
    # names and a copy's modules went on to fully_shard.
    from asynchat._sharded import _shard_units

    model = rank_jobs.ddp_model()
    copy = rank_jobs.ddp_model()
    assert _shard_units(model, lambda m: [m[0], m[2]]) == [model[0], model[2]]
    for policy, match in [
        (lambda m: None, r"shard\(model\) must return the submodules .* got None"),
        (lambda m: ["0", "2"], r"returned '0' at \[0\]: .* \(modules, not names"),
        (lambda m: [m[0], copy[2]], r"returned a module of another model at \[1\]"),
    ]:
        with pytest.raises(TypeError, match=match):
            _shard_units(model, policy)
    with pytest.raises(LaunchError, match=r"shard\(model\) must return the submodules"):
        launch(rank_jobs.fsdp_shard_forgets_return, nprocs=2)


@pytest.mark.slow
def test_a_mapping_of_models_is_sharded_model_by_model(tmp_path: Path) -> None:
    """The GAN-shaped step of the DDP test, on two sharded ranks: equal to one process."""
    launch(rank_jobs.fsdp_two_models, nprocs=2, args=(str(tmp_path),))
    sharded = torch.load(tmp_path / "fsdp_gan.pt", weights_only=True)
    for name, value in rank_jobs.gan_reference().items():
        torch.testing.assert_close(sharded["model"][name], value, rtol=1e-5, atol=1e-6)


def test_validation_on_the_average_of_a_sharded_model_equals_ddps(tmp_path: Path) -> None:
    # Swapping the average into an FSDP model failed: DTensor has no sharding rule for
    # _foreach_copy_ (NotImplementedError at the first validation).
    results = {}
    for kind in ("ddp", "fsdp"):
        out = tmp_path / f"{kind}.pt"
        launch(rank_jobs.validated_on_the_average, nprocs=2, args=(kind, str(out)))
        results[kind] = torch.load(out, weights_only=True)
    ddp, fsdp = results["ddp"], results["fsdp"]
    assert {"val/loss", "val/accuracy"} <= fsdp["metrics"].keys()
    for name in ("val/loss", "val/accuracy"):
        assert fsdp["metrics"][name] == pytest.approx(ddp["metrics"][name], rel=1e-5), name
    for name, value in ddp["weights"].items():  # the live weights came back after each swap
        torch.testing.assert_close(fsdp["weights"][name], value, rtol=1e-5, atol=1e-6)
    for theirs, ours in zip(ddp["ema"], fsdp["ema"], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert not torch.equal(ddp["ema"][0], ddp["weights"]["0.weight"])  # an average, not a copy


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["list", "stream"], ids=["lengths-known", "no-length"])
@pytest.mark.parametrize("how", ["inline", "standalone"])
def test_validation_of_a_sharded_model_on_uneven_data_runs_as_many_steps_on_every_rank(
    tmp_path: Path, kind: str, how: str
) -> None:
    # Its forward is a collective (each module's parameters are gathered): rank 0 went on
    # to the loss's sum over the ranks after its 2 batches while rank 1 gathered for its
    # third; the job failed at the collective timeout (5 minutes by default). A Predictor
    # over the sharded model, run on each rank once the trainer was done, did the same.
    launch(rank_jobs.fsdp_uneven_validation, nprocs=2, args=(str(tmp_path), kind, how),
           collective_timeout=timedelta(seconds=20))  # fmt: skip
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    model = rank_jobs.ddp_model()
    model.load_state_dict(ranks[0]["weights"])
    batches = [list(DataLoader(rank_jobs.uneven_samples(r), batch_size=8))[:2] for r in (0, 1)]
    x, y = (torch.cat(part) for part in zip(*batches[0], *batches[1], strict=True))
    with torch.no_grad():
        expected = nn.functional.cross_entropy(model(x), y).item()
    assert [r["batches"] for r in ranks] == [2, 2]
    # Run inline, it steps with the trainer's agreements, not with collectives of its own.
    assert [r["spans_ranks"] for r in ranks] == [[how == "standalone"]] * 2
    assert ranks[0]["val/loss"] == ranks[1]["val/loss"] == pytest.approx(expected, rel=1e-5)
    if how == "inline":
        assert ranks[0]["published"] == ranks[1]["published"] == pytest.approx(expected, 1e-5)
    name = "validation" if how == "inline" else "predictor"
    warned = [[w for w in r["warnings"] if name in w] for r in ranks]
    if kind == "list":
        assert warned[1] == [] and "(rank 0: 2, rank 1: 5)" in warned[0][0]
    else:
        assert warned[0] == [] and "rank 1's data had more batches" in warned[1][0]


def sharded_predictor_results(tmp_path: Path, scenario: str) -> list[dict[str, Any]]:
    """What each rank of ``rank_jobs.sharded_predictor`` wrote for ``scenario``."""
    launch(rank_jobs.sharded_predictor, nprocs=2, args=(str(tmp_path), scenario),
           collective_timeout=timedelta(seconds=20))  # fmt: skip
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_a_predictor_over_a_sharded_model_stops_on_every_rank_when_one_stops(
    tmp_path: Path,
) -> None:
    # Rank 1 ended after 2 batches while rank 0 gathered the parameters for its third,
    # alone, until the collective timeout.
    ranks = sharded_predictor_results(tmp_path, "stop")
    assert [r["batches"] for r in ranks] == [2, 2]
    assert [r["stop_reason"] for r in ranks] == ["stopped on another rank", "enough"]
    assert [r["status"] for r in ranks] == ["finished", "finished"]


def test_a_stream_closed_on_one_rank_ends_every_ranks_stream_of_a_sharded_model(
    tmp_path: Path,
) -> None:
    ranks = sharded_predictor_results(tmp_path, "stream")
    # The predictor runs ahead of the reader (by its buffer and the step in progress): both
    # ranks run as many batches, fewer than the 6 each has.
    assert ranks[0]["batches"] == ranks[1]["batches"] < 6
    reasons = [r["stop_reason"] for r in ranks]
    assert reasons == ["the stream was closed", "stopped on another rank"]


def test_a_predictor_over_a_sharded_model_is_refused_with_callbacks_unlike(
    tmp_path: Path,
) -> None:
    ranks = sharded_predictor_results(tmp_path, "unlike")
    assert [r["batches"] for r in ranks] == [0, 0]
    for r in ranks:
        assert "callbacks must be alike on every rank of a Predictor" in r["error"]
        assert "rank 0: MetricUpdater(log_every_n_steps=None); rank 1: none" in r["error"]


def test_ranks_sharded_or_reducing_apart_are_refused_before_training() -> None:
    # bf16 on one rank only: their gathers did not pair up and gloo aborted the job (SIGABRT).
    started = time.monotonic()
    with pytest.raises(LaunchError) as info:
        launch(rank_jobs.fsdp_settings_unlike, nprocs=2, collective_timeout=timedelta(seconds=20))
    message = str(info.value)
    assert "a FullyShardedDataParallelTrainer must be built alike on every rank" in message
    assert "shard=None, mixed_precision=None; rank 1: " in message
    assert "shard=None, mixed_precision='bf16')" in message
    assert time.monotonic() - started < 15
