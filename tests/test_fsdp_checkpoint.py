"""Sharded checkpoints of the FSDP trainer (torch.distributed.checkpoint), with real gloo
ranks in real processes: stop and resume, resharding to another number of ranks, the files
on disk, damage."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
import rank_jobs
import torch
import torch.distributed.checkpoint as dcp
from conftest import make_loader

import asynchat._dcp
from asynchat import LaunchError, Trainer, launch
from asynchat._checkpoint_io import serialize
from asynchat._dcp import sharded_state
from asynchat.callbacks import (
    Checkpoint,
    CheckpointError,
    CheckpointWarning,
    ExponentialMovingAverage,
    find_checkpoint,
    load_weights,
)

pytestmark = pytest.mark.slow


def run(tmp_path: Path, name: str, ranks: int, checkpoints: str, stop_at: int = 0,
        resume: bool = False, batch: int = 0) -> dict[str, torch.Tensor]:  # fmt: skip
    """The run's final weights, and its EMA's average under ``"ema/<i>"``."""
    out = tmp_path / f"{name}.pt"
    launch(rank_jobs.fsdp_checkpointed, nprocs=ranks,
           args=(str(out), str(tmp_path / checkpoints), stop_at, resume, batch))  # fmt: skip
    result = torch.load(out, weights_only=True)
    assert result["global_step"] == (stop_at or 16)
    return {**result["model"], **{f"ema/{i}": t for i, t in enumerate(result["ema"])}}


class Runs:
    """The launches several tests start from, made once for the module on first use (each is
    seconds of spawned ranks): uninterrupted, or stopped at a step. A test that resumes from
    or damages a run's checkpoints works on its own copy of them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.weights: dict[str, dict[str, torch.Tensor]] = {}

    def get(self, ranks: int, stop_at: int = 0) -> tuple[dict[str, torch.Tensor], str]:
        """The run's final weights and its name (its checkpoints are ``root / name``)."""
        name = f"{ranks}-ranks" + (f"-stopped-at-{stop_at}" if stop_at else "")
        if name not in self.weights:
            self.weights[name] = run(self.root, name, ranks, name, stop_at=stop_at)
        return self.weights[name], name

    def copy(self, name: str, tmp_path: Path) -> Path:
        """A copy of the run's checkpoint directory, in ``tmp_path``."""
        return Path(shutil.copytree(self.root / name, tmp_path / f"{name}-copy"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    yield Runs(tmp_path_factory.mktemp("fsdp-runs"))


def test_stop_and_resume_on_the_same_ranks_equals_an_uninterrupted_run(
    runs: Runs, tmp_path: Path
) -> None:
    """2 ranks stop at step 7 (inside the first epoch, Adam's state and the EMA's sharded
    average in the shards); 2 new ranks resume from the directory to 16: bitwise the
    weights and average of a run never stopped."""
    whole, _ = runs.get(2)
    _, part = runs.get(2, stop_at=7)
    directory = runs.root / part
    saved = sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))
    assert saved == ["manifest.json", "step-000000004.dcp", "step-000000007.dcp"]
    files = sorted(p.name for p in (directory / "step-000000007.dcp").iterdir())
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp", "asynchat.pt"]
    manifest = json.loads((directory / "manifest.json").read_text())
    assert [e["file"] for e in manifest["checkpoints"]] == saved[1:]
    assert not any(p.name.endswith(".tmp") for p in directory.iterdir())

    directory = runs.copy(part, tmp_path)
    resumed = run(tmp_path, "resumed", 2, directory.name, resume=True)
    assert resumed.keys() == whole.keys()
    for name, value in whole.items():
        assert torch.equal(resumed[name], value), name
    # Retention prunes whole directories: every 4 steps to 16, keep_last=2, plus the newest.
    left = sorted(p.name for p in directory.iterdir() if p.name.endswith(".dcp"))
    assert left == ["step-000000012.dcp", "step-000000016.dcp"]


def test_ranks_resumed_past_a_damaged_shard_save_on_into_their_directory(
    runs: Runs, tmp_path: Path
) -> None:
    """Regression: a flipped byte in a shard of the newest checkpoint made the resume fall
    back to the one before, and then the Checkpoint saving into that directory refused the
    job as a run further back than it. The damaged directory is set aside now, as found,
    and the job equals a run never stopped."""
    whole, _ = runs.get(2)
    directory = runs.copy(runs.get(2, stop_at=7)[1], tmp_path)
    shard = directory / "step-000000007.dcp" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    resumed = run(tmp_path, "resumed", 2, directory.name, resume=True)
    for name, value in whole.items():
        assert torch.equal(resumed[name], value), name
    aside = directory / "step-000000007.dcp.damaged" / "__0_0.distcp"
    assert aside.read_bytes() == bytes(data)
    left = sorted(p.name for p in directory.iterdir() if p.name.endswith(".dcp"))
    assert left == ["step-000000012.dcp", "step-000000016.dcp"]


def test_a_checkpoint_resumes_on_another_number_of_ranks(runs: Runs, tmp_path: Path) -> None:
    """DCP reshards: written by 2 ranks x 16, resumed on 1 x 32 (and the other way round),
    the interrupted epoch going on after the samples already trained on; equal to a run
    never stopped on the resuming side's ranks (rtol 1e-4: the mean over 32 samples is
    reduced in another order)."""
    (one, _), (two, _) = runs.get(1), runs.get(2)
    from_two = runs.copy(runs.get(2, stop_at=7)[1], tmp_path).name
    from_one = runs.copy(runs.get(1, stop_at=7)[1], tmp_path).name
    two_to_one = run(tmp_path, "two-to-one", 1, from_two, resume=True)
    one_to_two = run(tmp_path, "one-to-two", 2, from_one, resume=True)
    for name in one:
        torch.testing.assert_close(two_to_one[name], one[name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(one_to_two[name], two[name], rtol=1e-4, atol=1e-6)


def test_load_weights_gathers_a_sharded_checkpoint_and_damage_is_caught(
    runs: Runs, tmp_path: Path
) -> None:
    """Outside any job, load_weights puts a 2-rank checkpoint's weights into a plain module;
    a flipped byte in a shard makes the newest invalid and the next older is used."""
    final, name = runs.get(2)
    directory = runs.copy(name, tmp_path)
    module = rank_jobs.ddp_model()
    load_weights(module, directory)  # the newest: step 16, the final weights
    for name, value in module.state_dict().items():
        assert torch.equal(value, final[name]), name
    # Into a compiled module too (DCP names the weights uncompiled: the module's own
    # "_orig_mod." names were asked of it, and the read failed).
    compiled = torch.compile(rank_jobs.ddp_model(), backend="eager")
    assert load_weights(compiled, directory) == ([], [])  # (missing, unexpected)
    assert torch.equal(compiled._orig_mod[0].weight, final["0.weight"])
    assert find_checkpoint(directory).name == "step-000000016.dcp"
    # A Trainer of one process resumes from it too: the weights, Adam's state, and the
    # EMA's average (sharded when saved, whole tensors here).
    ema = ExponentialMovingAverage(0.9)
    trainer = Trainer(
        rank_jobs.ddp_model(), make_loader(), lambda m: torch.optim.Adam(m.parameters(), lr=0.01),
        loss_fn=torch.nn.CrossEntropyLoss(), num_steps=16, resume_from=directory,
        callbacks=[ema],
    )  # fmt: skip
    # (Each rank's loader had the whole set: one process's epoch holds half the steps.)
    with pytest.warns(CheckpointWarning, match="12 steps into epoch 1, and the data_loader has 6"):
        assert anyio.run(trainer.fit).global_step == 16
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, final[name]), name
    assert len(ema.shadow) == 4
    for i, average in enumerate(ema.shadow):
        assert type(average) is torch.Tensor and torch.equal(average, final[f"ema/{i}"]), i
    assert all(
        s["step"] == 16 for s in trainer.optimizers["default"].state_dict()["state"].values()
    )

    shard = directory / "step-000000016.dcp" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.warns(CheckpointWarning, match=r"__1_0\.distcp does not match its checksum"):
        assert find_checkpoint(directory).name == "step-000000012.dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        with pytest.raises(CheckpointError, match="does not match its checksum"):
            load_weights(module, directory / "step-000000016.dcp")


def seen(directory: Path, name: str, ranks: int, epoch: int) -> list[float]:
    """The samples (their first feature) the run ``name`` trained on in ``epoch``."""
    return [x for r in range(ranks) for e, x in torch.load(directory / f"{name}.pt.seen{r}")
            if e == epoch]  # fmt: skip


def test_another_global_batch_resumes_after_the_samples_already_trained_on(
    runs: Runs, tmp_path: Path
) -> None:
    """2 ranks x 16 stop 7 steps (224 samples) into the first epoch; 1 rank x 16 resumes
    after 14 of its steps: it trains on exactly the 96 samples the first run had not."""
    _, before_run = runs.get(2, stop_at=7)
    directory = runs.copy(before_run, tmp_path)
    run(tmp_path, "after", 1, directory.name, resume=True, batch=16)
    before = seen(runs.root, before_run, 2, 0)
    after = seen(tmp_path, "after", 1, 0)
    everything = rank_jobs.shuffled_data().tensors[0][:, 0].tolist()
    assert (len(before), len(after)) == (224, 96)
    assert sorted(before + after) == sorted(everything)


def test_a_whole_model_checkpoint_is_refused_with_the_way_to_use_its_weights(
    tmp_path: Path,
) -> None:
    trainer = Trainer(
        rank_jobs.ddp_model(), make_loader(), lambda m: torch.optim.Adam(m.parameters()),
        loss_fn=torch.nn.CrossEntropyLoss(), num_steps=2,
        callbacks=[Checkpoint(tmp_path / "ckpt")],
    )  # fmt: skip
    anyio.run(trainer.fit)
    with pytest.raises(Exception, match=r"holds the whole model .*load_weights"):
        run(tmp_path, "refused", 1, "ckpt", resume=True)


def test_a_callbacks_sharded_tensors_are_named_for_the_shards_and_partial_ones_refused(
    tmp_path: Path,
) -> None:
    launch(rank_jobs.split_callback_shards, nprocs=2, args=(str(tmp_path / "out.pt"),))
    result = torch.load(tmp_path / "out.pt", weights_only=True)
    assert result["names"] == ["callbacks/Kept/average/0"]
    assert result["plain"] == {
        "Kept": {
            "average": [
                {"asynchat.sharded": "callbacks/Kept/average/0", "shape": [4, 2],
                 "dtype": "float32", "placements": [["shard", 0]]},
                3,
            ],
            "updates": 5,
        }
    }  # fmt: skip
    assert "cannot save callbacks/Summed/0: a DTensor placed as P(sum) (only" in result["refused"]


def test_a_crafted_placeholder_in_a_sharded_checkpoint_is_refused(
    runs: Runs, tmp_path: Path
) -> None:
    # asynchat.pt names where each sharded tensor of a callback's state lies in the shards.
    # Named "model", a placeholder's empty tensor replaced the model's whole state in the
    # load; any name outside callbacks/ (or a shape, dtype or placement not of a tensor) is
    # refused before anything loads. (The content digest is no signature: recomputed here.)
    _, name = runs.get(2)
    directory = tmp_path / "alone" / "step-000000016.dcp"  # away from the manifest's digest
    shutil.copytree(runs.root / name / directory.name, directory)
    extras = torch.load(directory / "asynchat.pt", weights_only=True)
    placeholder = extras["callbacks"]["ExponentialMovingAverage"]["shadow"][0]
    assert placeholder["asynchat.sharded"] == "callbacks/ExponentialMovingAverage/shadow/0"
    original = dict(placeholder)
    for crafted in ({"asynchat.sharded": "model"}, {"shape": [-1]}, {"dtype": "save"},
                    {"placements": [["partial"]]}):  # fmt: skip
        placeholder.update(original)
        placeholder.update(crafted)  # one field wrong at a time
        data, _ = serialize(extras)
        (directory / "asynchat.pt").write_bytes(data)
        trainer = Trainer(
            rank_jobs.ddp_model(), make_loader(), lambda m: torch.optim.Adam(m.parameters()),
            loss_fn=torch.nn.CrossEntropyLoss(), num_steps=16, resume_from=directory,
            callbacks=[ExponentialMovingAverage(0.9)],
        )  # fmt: skip
        with pytest.raises(CheckpointError, match="a malformed placeholder of a sharded tensor"):
            anyio.run(trainer.fit)


def test_a_sharded_checkpoint_that_does_not_fit_the_model_is_a_checkpoint_error(
    runs: Runs,
) -> None:
    # DCP raises its CheckpointException, a BaseException: it went past the engine's
    # handlers as itself, as an interrupt would.
    _, name = runs.get(2)
    wider = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    with pytest.raises(CheckpointError, match=r"does not load into this model \(rank 0: Value"):
        load_weights(wider, runs.root / name)


class Touch:
    """Unpickled, it creates ``path``: what a crafted file could do, and far worse."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def with_digests(directory: Path, extras: dict[str, Any]) -> None:
    """Write ``extras`` as the directory's asynchat.pt, listing its DCP files' digests as
    they are now (the crafter's last step: digests are no signature)."""
    files = [p for p in directory.iterdir() if p.name != "asynchat.pt"]
    extras["sharded"]["files"] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    data, _ = serialize(extras)
    (directory / "asynchat.pt").write_bytes(data)


def test_a_crafted_sharded_checkpoint_cannot_run_code_when_loaded(
    runs: Runs, tmp_path: Path
) -> None:
    # DCP unpickles .metadata with pickle.load, and the values it saves as bytes (an
    # optimizer's param_groups) with torch.load(weights_only=False): resuming from a crafted
    # directory, or loading its weights, ran whatever code it named (here: created a file).
    _, name = runs.get(2)
    marker = tmp_path / "ran"
    directory = tmp_path / "alone" / "step-000000016.dcp"
    shutil.copytree(runs.root / name / directory.name, directory)
    extras = torch.load(directory / "asynchat.pt", weights_only=True)
    (directory / ".metadata").write_bytes(pickle.dumps(Touch(marker)))
    with_digests(directory, extras)
    # (pathlib.Path is pathlib._local.Path on Python 3.13)
    refers = r"\.metadata: it refers to pathlib(\._local)?\.Path\.touch"
    with pytest.raises(CheckpointError, match=refers):
        load_weights(rank_jobs.ddp_model(), directory)
    assert not marker.exists()

    # A value saved as bytes: the learning rate, re-saved by one process with DCP.
    shutil.rmtree(directory)
    directory.mkdir()
    model = rank_jobs.ddp_model()
    optimizer = torch.optim.Adam(model.parameters())
    state = sharded_state(model, {"default": optimizer})
    state["optimizers"]["default"]["param_groups"][0]["lr"] = Touch(marker)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "torch.distributed is disabled"
        dcp.save(state, checkpoint_id=directory, no_dist=True)
    del extras["callbacks"]["ExponentialMovingAverage"]  # (its shards are not re-saved)
    with_digests(directory, extras)
    trainer = Trainer(
        rank_jobs.ddp_model(), make_loader(), lambda m: torch.optim.Adam(m.parameters()),
        loss_fn=torch.nn.CrossEntropyLoss(), num_steps=16, resume_from=directory,
    )  # fmt: skip
    refused = r"param_groups\.0\.lr refers to getattr, which a weights-only load refuses"
    with pytest.raises(CheckpointError, match=refused):
        anyio.run(trainer.fit)
    assert not marker.exists()


def test_metadata_replaced_after_its_check_is_not_what_loads(
    runs: Runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DCP read .metadata again, with pickle.load, after asynchat had checked it: a writer
    # that replaced the file in between (here: at once after the check) ran its code.
    _, name = runs.get(2)
    marker = tmp_path / "ran"
    directory = tmp_path / "alone" / "step-000000016.dcp"
    shutil.copytree(runs.root / name / directory.name, directory)
    checked = asynchat._dcp.check_metadata

    def then_replaced(checking: Path) -> Any:
        metadata = checked(checking)
        (checking / ".metadata").write_bytes(pickle.dumps(Touch(marker)))
        return metadata

    monkeypatch.setattr(asynchat._dcp, "check_metadata", then_replaced)
    model = rank_jobs.ddp_model()
    load_weights(model, directory)
    assert not marker.exists()
    expected, _ = runs.get(2)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key])


@pytest.mark.parametrize("where", ["shard", "extras"])
def test_a_sharded_save_that_fails_on_one_rank_is_a_checkpoint_error_and_leaves_nothing(
    tmp_path: Path, where: str
) -> None:
    # A shard's write failing: DCP failed it with its CheckpointException, a BaseException,
    # which reached fit() as itself, past the handler that names the checkpoint. Either
    # way the half-written temporary directory stayed on the full disk until the next run.
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(LaunchError) as info:
        launch(rank_jobs.fsdp_save_on_a_full_disk, nprocs=2, args=(str(checkpoints), where))
    message = str(info.value)
    if where == "shard":
        assert "CheckpointError: could not write sharded checkpoint " in message
        # (torch.save reports the failed write as "RuntimeError: ... unexpected pos")
        assert ".step-000000002.dcp.1.tmp: rank 1: " in message
    else:
        assert "CheckpointError: could not write checkpoint " in message
        assert "step-000000002.dcp: [Errno 27] File too large" in message
    assert sorted(p.name for p in checkpoints.iterdir()) == [".asynchat.lock"]


@pytest.mark.parametrize("first_written", [True, False], ids=["after-a-save", "during-a-save"])
def test_a_sharded_save_into_a_directory_another_writer_took_leaves_nothing_there(
    tmp_path: Path, first_written: bool
) -> None:
    # Every rank's shards are written before rank 0 checks the lock: refused, they were
    # left in a hidden temporary directory of the directory another writer now owns. And
    # with step 1's write refused while in flight, rank 1 went on to write step 2's shards
    # (rank 0 learned of the failure only after agreeing to save) and left them there too.
    checkpoints = tmp_path / "ckpt"
    with pytest.raises(LaunchError, match=r"(?s)rank 0 failed.*another writer has taken"):
        launch(rank_jobs.fsdp_directory_taken, nprocs=2, args=(str(checkpoints), first_written))
    left = sorted(p.name for p in checkpoints.iterdir())
    written_before = [".asynchat.lock", "manifest.json", "step-000000001.dcp"]
    if first_written:
        assert left == written_before
    else:
        assert set(left) <= set(written_before), left


def test_fsdp_jobs_one_after_another_hold_no_more_descriptors_than_one(tmp_path: Path) -> None:
    # Each FSDP trainer made a gloo group of its own for its checkpoints, kept for the life
    # of the process: 5 more open descriptors a trainer on each of 2 ranks (20 after 4),
    # until a service running jobs one after another could open no more files.
    launch(rank_jobs.fsdp_jobs_one_by_one, nprocs=2, args=(str(tmp_path), "sequence"))
    for rank in (0, 1):
        counts = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)["descriptors"]
        assert len(counts) == 4 and counts[-1] <= counts[0], counts
    for index in range(4):  # each trainer's checkpoints hold its own weights
        weights = torch.load(tmp_path / "rank0.pt", weights_only=True)["weights"][index]
        model = rank_jobs.ddp_model()
        load_weights(model, tmp_path / str(index))
        for name, value in model.state_dict().items():
            torch.testing.assert_close(value, weights[name])


def test_an_fsdp_trainer_run_inside_anothers_hook_saves_beside_its_saves(tmp_path: Path) -> None:
    # The trainers share one checkpoint group: the inner's saves wait for the outer's write
    # in flight over it, or their collectives would pair up across the two.
    launch(rank_jobs.fsdp_jobs_one_by_one, nprocs=2, args=(str(tmp_path), "nested"),
           collective_timeout=timedelta(seconds=30))  # fmt: skip
    weights = torch.load(tmp_path / "rank0.pt", weights_only=True)["weights"]
    for index in (0, 1):
        assert find_checkpoint(tmp_path / str(index)).name == "step-000000008.dcp"
        model = rank_jobs.ddp_model()
        load_weights(model, tmp_path / str(index))
        for name, value in model.state_dict().items():
            torch.testing.assert_close(value, weights[index][name])
