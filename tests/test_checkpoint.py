"""Checkpoint and resume: exactness, atomicity, fallbacks, retention, every way out."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from conftest import StopAt, make_loader, make_model, make_trainer, wait_for_line
from torch import nn

import asynchat._checkpoint_io
from asynchat import Callback, LoopState, Trainer
from asynchat._checkpoint_io import RECORDED_METRICS, serialize
from asynchat.callbacks import (
    Checkpoint,
    CheckpointError,
    CheckpointWarning,
    ExponentialMovingAverage,
    JSONLinesLogger,
    LRSchedule,
    Validation,
    cosine,
    find_checkpoint,
    load_checkpoint,
    load_weights,
)

HERE = Path(__file__).resolve().parent


def run_job(mode: str, out: Path, total: int, k: int, directory: Path, shuffle: str) -> None:
    subprocess.run(
        [sys.executable, str(HERE / "resume_job.py"), mode, str(out), str(total), str(k),
         str(directory), shuffle],
        check=True, timeout=300, cwd=HERE,
    )  # fmt: skip


def assert_bitwise_equal(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path} keys differ"
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path} lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_bitwise_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("k", "shuffle"),
    [(5, "global"), (6, "generator"), (9, "generator"), (12, "global"), (5, "augmented"),
     (12, "augmented"), (5, "augmented-workers"), (9, "augmented-persistent"),
     (12, "augmented-persistent")],
    ids=["mid-epoch-global-rng", "epoch-boundary-generator", "mid-epoch-2-generator",
         "epoch-boundary-2-global-rng", "mid-epoch-augmented", "epoch-boundary-augmented",
         "mid-epoch-augmented-in-workers", "mid-epoch-2-augmented-in-persistent-workers",
         "epoch-boundary-augmented-in-persistent-workers"],
)  # fmt: skip
def test_resume_in_a_new_process_is_bitwise_exact(tmp_path: Path, k: int, shuffle: str) -> None:
    """N steps straight == k steps, checkpoint, stop, resume in a new process up to N.

    "augmented": a dataset drawing noise from the global RNGs as each sample is read. A run
    resumed mid-epoch read its first batch with the RNG state of the epoch's start (that
    batch drew other noise), and only then put back the interrupted run's."""
    total = 16  # 6 steps an epoch: the run ends inside its third epoch
    out, directory = tmp_path / "result", tmp_path / "checkpoints"
    run_job("straight+first", out, total, k, directory, shuffle)
    run_job("resume", out, total, k, directory, shuffle)
    straight = torch.load(f"{out}.straight", weights_only=True)
    first = torch.load(f"{out}.first", weights_only=True)
    resumed = torch.load(f"{out}.resume", weights_only=True)
    assert first["global_step"] == k
    assert resumed["global_step"] == straight["global_step"] == total
    assert_bitwise_equal(resumed["model"], straight["model"], "model")
    assert_bitwise_equal(resumed["optimizer"], straight["optimizer"], "optimizer")
    assert_bitwise_equal(resumed["counter"], straight["counter"], "callback state")
    assert_bitwise_equal(resumed["torch_rng"], straight["torch_rng"], "torch RNG")


def read_manifest(directory: Path) -> list[dict[str, Any]]:
    return json.loads((directory / "manifest.json").read_text())["checkpoints"]  # type: ignore[no-any-return]


@pytest.mark.anyio
async def test_every_n_steps_writes_loadable_checkpoints_with_a_manifest(tmp_path: Path) -> None:
    checkpoint = Checkpoint(tmp_path, every_n_steps=4, keep_last=10, save_on_end=True)
    trainer = make_trainer(checkpoint, num_epochs=2)
    await trainer.fit()  # 12 steps
    entries = read_manifest(tmp_path)
    assert [e["global_step"] for e in entries] == [4, 8, 12]
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == [
        "step-000000004.ckpt", "step-000000008.ckpt", "step-000000012.ckpt",
    ]  # fmt: skip
    assert checkpoint.checkpoints == [tmp_path / e["file"] for e in entries]
    for entry in entries:
        data = torch.load(tmp_path / entry["file"], weights_only=True)
        assert data["progress"]["global_step"] == entry["global_step"]
        assert len(entry["sha256"]) == 64 and entry["bytes"] > 0
    final = torch.load(tmp_path / "step-000000012.ckpt", weights_only=True)
    # Due at the epoch's last step, the save waited for the epoch's end: a resumed run goes
    # on at the next epoch.
    assert final["progress"] == {
        "epoch": 1, "steps_in_epoch": 6, "epoch_exhausted": True, "global_step": 12,
        "world_size": 1, "batch_size": 16, "run": trainer.run_id,
    }  # fmt: skip
    assert {e["run"] for e in entries} == {trainer.run_id}


def test_a_step_save_at_an_epochs_last_step_holds_what_the_epochs_end_did(
    tmp_path: Path,
) -> None:
    # Taken at the step's end, before the epoch's end, the step-6 checkpoint held no
    # val/loss; a run resumed from it ran epoch 0's end again, and its validation was
    # measured and logged at step 6 a second time (a kill soak found the point twice in
    # TensorBoard: the killed run had logged it too).
    def run(name: str, resume: Path | None = None) -> Trainer:
        return make_trainer(
            Validation(make_loader(48, 16, seed=1), loss_fn=nn.CrossEntropyLoss()),
            JSONLinesLogger(tmp_path / f"{name}.jsonl", every_n_steps=100),
            Checkpoint(tmp_path / name, every_n_steps=6, keep_last=None, save_on_end=False),
            num_epochs=2, resume_from=resume,
        )  # fmt: skip

    anyio.run(run("straight").fit)
    saved = torch.load(tmp_path / "straight" / "step-000000006.ckpt", weights_only=True)
    assert saved["progress"]["epoch_exhausted"] and "val/loss" in saved["metrics"]
    anyio.run(run("resumed", resume=tmp_path / "straight" / "step-000000006.ckpt").fit)
    rows = [json.loads(line) for line in (tmp_path / "resumed.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "val/loss" in row] == [12]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("bounds", "told"),
    [({"num_steps": 12}, None), ({"num_epochs": 2}, None),
     ({"num_steps": 7}, "at global step 12, past num_steps=7"),
     ({"num_epochs": 1}, "at epoch 2, past num_epochs=1")],
    ids=["at-steps", "at-epochs", "past-steps", "past-epochs"],
)  # fmt: skip
async def test_a_run_resumed_past_its_bound_says_it_trains_nothing(
    tmp_path: Path, bounds: dict[str, int], told: str | None
) -> None:
    # It finished at once, without a word (num_steps=7 where 70 was meant, say).
    await make_trainer(Checkpoint(tmp_path), num_epochs=2).fit()  # 12 steps, epochs 0-1
    resumed = make_trainer(resume_from=tmp_path, **bounds)
    if told is None:  # at its bound: a finished run resumed (an elastic job's last restart)
        await resumed.fit()
    else:
        with pytest.warns(RuntimeWarning, match=f"resumed from .* {told}: there is nothing"):
            await resumed.fit()
    assert resumed.state.global_step == 12


@pytest.mark.anyio
async def test_every_n_epochs_saves_after_the_epoch(tmp_path: Path) -> None:
    await make_trainer(Checkpoint(tmp_path, every_n_epochs=2, save_on_end=False)).fit()
    (entry,) = read_manifest(tmp_path)
    data = torch.load(tmp_path / entry["file"], weights_only=True)
    assert data["progress"] == {
        "epoch": 1, "steps_in_epoch": 6, "epoch_exhausted": True, "global_step": 12,
        "world_size": 1, "batch_size": 16, "run": entry["run"],
    }  # fmt: skip


@pytest.mark.anyio
async def test_keep_last_and_keep_best(tmp_path: Path) -> None:
    scores = {1: 0.5, 2: 0.9, 3: 0.7, 4: 0.6, 5: 0.4, 6: 0.3}

    class Score(Callback):
        def on_step_end(self, state: LoopState) -> None:
            state.metrics["val/accuracy"] = scores[state.global_step]

    checkpoint = Checkpoint(
        tmp_path, every_n_steps=1, keep_last=2, monitor="val/accuracy", mode="max",
        keep_best=2, save_on_end=False,
    )  # fmt: skip
    await make_trainer(Score(), checkpoint, num_epochs=1).fit()
    kept = [e["global_step"] for e in read_manifest(tmp_path)]
    assert kept == [2, 3, 5, 6]  # best two (0.9, 0.7) and last two
    assert sorted(int(p.stem.split("-")[1]) for p in tmp_path.glob("*.ckpt")) == kept


@pytest.mark.anyio
async def test_the_best_checkpoint_is_loaded_reading_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # load_checkpoint(find_checkpoint(d, best=True)) read the best file twice (once to
    # check it, once to load it): 20 GB for a 10 GB checkpoint. best=True reads it once,
    # and, as find_checkpoint does, passes over a damaged best for the next.
    scores = Scores({"val/accuracy": ACCURACY})
    checkpoint = Checkpoint(tmp_path, every_n_steps=1, keep_last=None, monitor="val/accuracy",
                            mode="max")  # fmt: skip
    trainer = make_trainer(scores, checkpoint, num_steps=6)
    await trainer.fit()
    reads: list[str] = []
    load_file = asynchat._checkpoint_io._load_file

    def counted(file: Path, digest: str | None) -> dict[str, Any]:
        reads.append(file.name)
        return load_file(file, digest)

    monkeypatch.setattr(asynchat._checkpoint_io, "_load_file", counted)
    loaded, path = load_checkpoint(tmp_path, best=True)
    assert path.name == "step-000000005.ckpt" and reads == [path.name]
    assert loaded["progress"]["global_step"] == 5
    model = make_model()
    assert load_weights(model, tmp_path, best=True) == ([], [])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in loaded["model"].items())
    path.write_bytes(b"damaged")
    with pytest.warns(CheckpointWarning, match="step-000000005.ckpt .*; trying the next best"):
        assert load_checkpoint(tmp_path, best=True)[1].name == "step-000000002.ckpt"
    with pytest.raises(CheckpointError, match="is not a directory \\(best=True picks among"):
        load_checkpoint(tmp_path / "step-000000006.ckpt", best=True)
    with pytest.raises(ValueError, match="checkpoint is one loaded already"):
        load_weights(model, loaded, best=True)


class Scores(Callback):
    """Publishes at each step the values ``scores`` gives for it (``{name: {step: value}}``),
    a metric not in it left as it was (measured at an earlier step)."""

    def __init__(self, scores: dict[str, dict[int, float]]) -> None:
        self.scores = scores

    def on_step_end(self, state: LoopState) -> None:
        for name, values in self.scores.items():
            if state.global_step in values:
                state.metrics[name] = values[state.global_step]


# Steps 1-6: a loss best (lowest) at 2, an accuracy best at 5; steps 7-9: worse than both.
LOSS = {1: 5.0, 2: 1.0, 3: 3.0, 4: 4.0, 5: 4.5, 6: 4.6, 7: 4.7, 8: 4.8, 9: 4.9}
ACCURACY = {1: 0.1, 2: 0.9, 3: 0.2, 4: 0.3, 5: 0.95, 6: 0.5, 7: 0.4, 8: 0.3, 9: 0.2}


@pytest.mark.anyio
async def test_a_run_resumed_with_another_monitor_ranks_the_checkpoints_by_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: resumed with monitor="val/accuracy" (max) into a directory ranked by
    "val/loss" (min), a run took step 4's loss of 4.0 for the best accuracy, kept that
    checkpoint as the best and pruned step 5's (accuracy 0.95, the best), and
    find_checkpoint(best=True) named step 4's. The checkpoints are ranked again by the new
    monitor, as each holds it."""

    def checkpoint(**ranking: Any) -> Checkpoint:
        return Checkpoint(tmp_path, every_n_steps=1, keep_last=1, keep_best=1, **ranking)

    scores = Scores({"val/loss": LOSS, "val/accuracy": ACCURACY})
    await make_trainer(scores, checkpoint(monitor="val/loss"), num_steps=6).fit()
    assert [e["global_step"] for e in read_manifest(tmp_path)] == [2, 6]
    resumed = make_trainer(
        scores, checkpoint(monitor="val/accuracy", mode="max"), num_steps=9,
        resume_from=tmp_path,
    )  # fmt: skip
    with caplog.at_level("INFO", logger="asynchat.checkpoint"):
        await resumed.fit()
    assert {e["global_step"]: e["metric"] for e in read_manifest(tmp_path)} == {2: 0.9, 9: 0.2}
    assert find_checkpoint(tmp_path, best=True) == tmp_path / "step-000000002.ckpt"
    assert "2 checkpoint(s) ranked by 'val/loss' before, ranked again by 'val/accuracy' " \
        "(0 file(s) read for it)" in caplog.text  # fmt: skip


@pytest.mark.anyio
@pytest.mark.parametrize("listed", ["with-metrics", "older-manifest"])
async def test_a_monitor_given_on_resume_ranks_the_checkpoints_saved_without_one(
    tmp_path: Path, listed: str
) -> None:
    """Saved without a monitor, the checkpoints rank by the one a resumed run gives, where
    each measured it at its own step (step 3's value was measured at step 2: unranked).
    Regression: each checkpoint file was read whole for its value (1.1 s for four of
    128 MiB); the manifest records the metrics measured at each checkpoint's step, so no
    file is read (step 4's, damaged, ranks by what the manifest recorded). From a manifest
    of an older version, without them, each file is read (and what it holds recorded):
    the damaged one is kept unranked, with a warning."""
    scores = Scores({"val/accuracy": {k: v for k, v in ACCURACY.items() if k != 3}})
    await make_trainer(
        scores, Checkpoint(tmp_path, every_n_steps=1, keep_last=None), num_steps=6
    ).fit()
    entries = read_manifest(tmp_path)
    assert [e["metrics"] for e in entries[1:4]] == [
        {"val/accuracy": 0.9}, {}, {"val/accuracy": 0.3},
    ]  # fmt: skip
    if listed == "older-manifest":
        manifest = json.loads((tmp_path / "manifest.json").read_text())
        for entry in manifest["checkpoints"]:
            del entry["metrics"]
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "step-000000004.ckpt").write_bytes(b"damaged")
    checkpoint = Checkpoint(
        tmp_path, every_n_steps=1, keep_last=None, monitor="val/accuracy", mode="max"
    )
    resumed = make_trainer(scores, checkpoint, num_steps=7, resume_from=tmp_path)
    if listed == "older-manifest":
        with pytest.warns(CheckpointWarning, match=r"step-000000004\.ckpt does not match its "
                          r"manifest checksum .*; it is kept unranked"):  # fmt: skip
            await resumed.fit()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error", CheckpointWarning)
            await resumed.fit()
    assert {e["global_step"]: e["metric"] for e in read_manifest(tmp_path)} == {
        1: 0.1, 2: 0.9, 3: None, 4: None if listed == "older-manifest" else 0.3, 5: 0.95,
        6: 0.5, 7: 0.4,
    }  # fmt: skip
    # What was read is recorded: the next monitor reads none (but the damaged one's).
    unrecorded = [e["global_step"] for e in read_manifest(tmp_path) if "metrics" not in e]
    assert unrecorded == ([4] if listed == "older-manifest" else [])
    assert checkpoint.best_path == tmp_path / "step-000000005.ckpt"


@pytest.mark.anyio
async def test_a_step_that_measured_too_many_metrics_records_none_and_ranks_by_its_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A manifest entry records at most RECORDED_METRICS metrics (a few thousand
    checkpoints of a thousand per-class values would pass the manifest's 64 MiB): past it,
    none, and a run resumed with another monitor reads that file for its value."""
    many = {f"val/class_{i:03d}": {s: float(s * i) for s in ACCURACY}
            for i in range(RECORDED_METRICS)}  # fmt: skip
    scores = Scores({"val/accuracy": ACCURACY, **many})  # one too many, at every step
    await make_trainer(
        scores, Checkpoint(tmp_path, every_n_steps=1, keep_last=None), num_steps=6
    ).fit()
    assert [e.get("metrics") for e in read_manifest(tmp_path)] == [None] * 6
    checkpoint = Checkpoint(
        tmp_path, every_n_steps=1, keep_last=None, monitor="val/accuracy", mode="max"
    )
    resumed = make_trainer(scores, checkpoint, num_steps=7, resume_from=tmp_path)
    with caplog.at_level("INFO", logger="asynchat.checkpoint"):
        await resumed.fit()
    assert "(6 file(s) read for it)" in caplog.text
    assert checkpoint.best_path == tmp_path / "step-000000005.ckpt"


@pytest.mark.anyio
@pytest.mark.parametrize("lost", ["manifest", "newest-entry"])
async def test_checkpoints_the_manifest_does_not_list_are_ranked_by_what_they_hold(
    tmp_path: Path, lost: str
) -> None:
    """Regression: files the manifest does not list (it was removed by hand or is
    unreadable; a crash came between a file and its entry) were kept unranked, so the best
    of them was pruned like any other: here step 5's (accuracy 0.95) at the resumed run's
    first save. Each is ranked by the monitor's value it holds."""

    def checkpoint() -> Checkpoint:
        return Checkpoint(
            tmp_path, every_n_steps=1, keep_last=1, keep_best=1, monitor="val/accuracy",
            mode="max",
        )  # fmt: skip

    scores = Scores({"val/accuracy": ACCURACY})
    await make_trainer(scores, checkpoint(), num_steps=5).fit()
    assert [e["global_step"] for e in read_manifest(tmp_path)] == [5]
    if lost == "manifest":
        (tmp_path / "manifest.json").unlink()
    else:  # as a crash between the file's write and the manifest's leaves them
        manifest = json.loads((tmp_path / "manifest.json").read_text())
        manifest["checkpoints"] = []
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    await make_trainer(scores, checkpoint(), num_steps=7, resume_from=tmp_path).fit()
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == [
        "step-000000005.ckpt", "step-000000007.ckpt",
    ]  # fmt: skip
    assert find_checkpoint(tmp_path, best=True) == tmp_path / "step-000000005.ckpt"


@pytest.mark.anyio
async def test_a_checkpoint_is_ranked_only_by_a_metric_measured_on_its_weights(
    tmp_path: Path,
) -> None:
    """Validation each epoch (6 steps), saves every 4 steps and each epoch: the save at step
    8 carries step 6's val/loss and must not rank; the one at 12 (a step save before the
    epoch's validation) is saved again with the fresh value."""
    checkpoint = Checkpoint(
        tmp_path, every_n_steps=4, every_n_epochs=1, keep_last=None, monitor="val/loss"
    )
    validation = Validation(make_loader(48, 16, seed=1), loss_fn=nn.CrossEntropyLoss())
    with pytest.warns(CheckpointWarning) as caught:
        state = await make_trainer(validation, checkpoint, num_epochs=2).fit()
    entries = {e["global_step"]: e["metric"] for e in read_manifest(tmp_path)}
    assert entries.keys() == {4, 6, 8, 12}
    assert entries[4] is None and entries[8] is None  # not yet measured / measured at 6
    assert entries[12] == state.metrics["val/loss"]
    assert entries[6] is not None and entries[6] != entries[12]
    messages = [str(w.message) for w in caught]
    assert any("its value is from step 6" in m for m in messages), messages
    assert find_checkpoint(tmp_path, best=True).name in (
        "step-000000006.ckpt",
        "step-000000012.ckpt",
    )
    assert state.metrics.measured_at("val/loss") == 12


@pytest.mark.anyio
async def test_save_on_end_after_stop_and_cancellation_but_not_after_an_error(
    tmp_path: Path,
) -> None:
    class StopAt3(Callback):
        def on_step_end(self, state: LoopState) -> None:
            if state.global_step == 3:
                state.loop.stop()

    await make_trainer(StopAt3(), Checkpoint(tmp_path / "stop")).fit()
    assert [e["global_step"] for e in read_manifest(tmp_path / "stop")] == [3]

    class Cancel(Callback):
        def __init__(self, scope: anyio.CancelScope) -> None:
            self.scope = scope

        async def on_step_end(self, state: LoopState) -> None:
            if state.global_step == 4:
                self.scope.cancel()
                await anyio.lowlevel.checkpoint()

    with anyio.CancelScope() as scope:
        await make_trainer(Cancel(scope), Checkpoint(tmp_path / "cancel")).fit()
    assert scope.cancelled_caught
    assert [e["global_step"] for e in read_manifest(tmp_path / "cancel")] == [4]

    class Fail(Callback):
        def on_step_end(self, state: LoopState) -> None:
            if state.global_step == 2:
                raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await make_trainer(Fail(), Checkpoint(tmp_path / "error")).fit()
    assert not list((tmp_path / "error").glob("*.ckpt"))


class BlockTheName(Callback):
    """Before step 2, puts a directory (not empty) under the name step 2's checkpoint takes,
    so that its write fails. (A directory removed is made again: see test_checkpoint_safety.)"""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def on_step_begin(self, state: LoopState) -> None:
        if state.global_step == 1:
            (self.directory / "step-000000002.ckpt" / "in-the-way").mkdir(parents=True)


@pytest.mark.anyio
async def test_a_failing_write_is_raised_naming_the_file(tmp_path: Path) -> None:
    save_dir = tmp_path / "ckpt"
    checkpoint = Checkpoint(save_dir, every_n_steps=2, save_on_end=False)
    trainer = make_trainer(BlockTheName(save_dir), checkpoint, num_epochs=1)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*step-000000002"):
        await trainer.fit()
    # Reported at the first step end after the write failed: at the latest, the next save.
    assert trainer.state.global_step in (3, 4)


@pytest.mark.anyio
async def test_an_unusable_save_dir_is_refused_before_training(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    trainer = make_trainer(Checkpoint(blocker, every_n_steps=2), num_epochs=1)
    with pytest.raises(CheckpointError, match="not-a-directory"):
        await trainer.fit()
    assert trainer.state.global_step == 0


def make_checkpoints(directory: Path, steps: int = 6) -> None:
    anyio.run(
        make_trainer(Checkpoint(directory, every_n_steps=2, keep_last=5), num_steps=steps).fit
    )


def test_corrupt_or_truncated_newest_checkpoint_falls_back(tmp_path: Path) -> None:
    make_checkpoints(tmp_path)
    newest = tmp_path / "step-000000006.ckpt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    with pytest.warns(CheckpointWarning, match="step-000000006.ckpt does not match its manifest"):
        checkpoint, file = load_checkpoint(tmp_path)
    assert file.name == "step-000000004.ckpt" and checkpoint["progress"]["global_step"] == 4

    (tmp_path / "manifest.json").unlink()  # without a manifest, the files are tried by name
    with pytest.warns(CheckpointWarning, match="step-000000006.ckpt is not a loadable checkpoint"):
        _, file = load_checkpoint(tmp_path)
    assert file.name == "step-000000004.ckpt"


def test_resume_uses_the_previous_checkpoint_when_the_newest_is_corrupt(tmp_path: Path) -> None:
    make_checkpoints(tmp_path)
    (tmp_path / "step-000000006.ckpt").write_bytes(b"garbage")
    trainer = make_trainer(num_steps=8, resume_from=tmp_path)
    with pytest.warns(CheckpointWarning):
        state = anyio.run(trainer.fit)
    assert trainer.resumed_from == tmp_path / "step-000000004.ckpt"
    assert state.global_step == 8


@pytest.mark.parametrize("damage", ["garbage", "truncated", "gone"])
def test_a_run_resumed_past_a_damaged_newest_checkpoint_saves_on_into_its_directory(
    tmp_path: Path, damage: str
) -> None:
    """Regression: resumed from the directory it saves into (``resume_from=save_dir``, as an
    elastic job's restart does with ``resumable``), the run fell back from a damaged newest
    checkpoint to the one before, and then its Checkpoint refused it: "the directory holds
    checkpoints of a run further on than this one (step-000000006.ckpt ...). Resume from it
    (resume_from=save_dir)", which it had done; every restart was refused the same way."""
    make_checkpoints(tmp_path)
    newest = tmp_path / "step-000000006.ckpt"
    if damage == "gone":
        newest.unlink()  # (the manifest still lists it)
    else:
        newest.write_bytes(b"garbage" if damage == "garbage" else newest.read_bytes()[:1000])
    damaged = newest.read_bytes() if newest.exists() else None
    trainer = make_trainer(
        Checkpoint(tmp_path, every_n_steps=2, keep_last=5), num_steps=10, resume_from=tmp_path
    )
    with pytest.warns(CheckpointWarning) as warned:
        state = anyio.run(trainer.fit)
    assert trainer.resumed_from == tmp_path / "step-000000004.ckpt"
    assert trainer.damaged_at_resume == (newest,)
    assert state.global_step == 10
    assert sorted(p.name for p in tmp_path.glob("step-*")) == sorted(
        [f"step-0000000{step:02d}.ckpt" for step in (2, 4, 6, 8, 10)]
        + (["step-000000006.ckpt.damaged"] if damaged else [])
    )
    if damaged is not None:  # kept as it was found, out of the next resume's way
        assert (tmp_path / "step-000000006.ckpt.damaged").read_bytes() == damaged
    set_aside = [str(w.message) for w in warned if "set aside" in str(w.message)]
    assert set_aside == [
        f"Checkpoint(save_dir={str(tmp_path)!r}): step-000000006.ckpt, found damaged as this "
        f"run resumed from {tmp_path / 'step-000000004.ckpt'}, set aside as <name>.damaged "
        "(never loaded or deleted); the run goes on from global step 4"
    ]
    checkpoint, file = load_checkpoint(tmp_path)  # the new step 6 is this run's, and whole
    assert file.name == "step-000000010.ckpt" and checkpoint["progress"]["global_step"] == 10


def test_a_checkpoint_set_aside_twice_keeps_both_damaged_files(tmp_path: Path) -> None:
    make_checkpoints(tmp_path)
    newest = tmp_path / "step-000000006.ckpt"
    for damage in (b"first", b"second"):  # each run resumes at 4 and saves step 6 again
        newest.write_bytes(damage)
        trainer = make_trainer(Checkpoint(tmp_path, every_n_steps=2), num_steps=6,
                               resume_from=tmp_path)  # fmt: skip
        with pytest.warns(CheckpointWarning) as warned:
            assert anyio.run(trainer.fit).global_step == 6
        assert any("set aside as <name>.damaged" in str(w.message) for w in warned)
    assert (tmp_path / "step-000000006.ckpt.damaged").read_bytes() == b"first"
    assert (tmp_path / "step-000000006.ckpt.damaged-2").read_bytes() == b"second"
    assert load_checkpoint(newest)[0]["progress"]["global_step"] == 6


def test_no_valid_checkpoint_and_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no valid checkpoint .*holds no checkpoint"):
        load_checkpoint(tmp_path)
    weights = tmp_path / "weights.pt"
    torch.save(nn.Linear(2, 2).state_dict(), weights)
    with pytest.raises(CheckpointError, match=r"weights\.pt is not an asynchat checkpoint"):
        load_checkpoint(weights)
    # Each error names the argument the path came in (it said resume_from= everywhere).
    with pytest.raises(CheckpointError, match=r"^path='.*missing\.ckpt': no such file or"):
        load_checkpoint(tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match=r"^checkpoint='.*missing\.ckpt': no such file"):
        load_weights(nn.Linear(2, 2), tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match=r"^directory='.*': no valid checkpoint"):
        find_checkpoint(tmp_path)
    trainer = make_trainer(num_steps=2, resume_from=tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match=r"^resume_from='.*missing\.ckpt': no such file"):
        anyio.run(trainer.fit)
    trainer = make_trainer(num_steps=2, resume_from=weights)
    with pytest.raises(CheckpointError, match="not an asynchat checkpoint"):
        anyio.run(trainer.fit)


@pytest.mark.parametrize("ranks", [[], "x", [{"rng": None}], [{"rng": 0, "metrics": {}}]])
def test_a_checkpoint_with_malformed_rank_parts_is_refused_by_name(
    tmp_path: Path, ranks: Any
) -> None:
    # Crafted (its digests made to match): each rank would have resumed from a part that is
    # not one, or failed with an IndexError deep in the resume.
    make_checkpoints(tmp_path)
    file = tmp_path / "step-000000006.ckpt"
    checkpoint = torch.load(file, weights_only=True)
    file.write_bytes(serialize({**checkpoint, "ranks": ranks})[0])
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"step-000000006\.ckpt has a malformed 'ranks'"):
        load_checkpoint(file)


def test_each_rank_takes_its_own_part_and_per_rank_callbacks_only_on_as_many_ranks() -> None:
    from asynchat._resume import own_part
    from asynchat.callbacks import LossMonitor

    def part(rank: int, interval: dict[str, Any]) -> dict[str, Any]:
        return {"rng": f"rng{rank}", "metrics": {"m": rank}, "callbacks": {"LossMonitor": interval}}

    written = {
        "rng": "rng0", "metrics": {"m": 0}, "callbacks": {"LRSchedule": "shared"},
        "ranks": [part(0, {"sums": 0}), part(1, {"sums": 1})],
    }  # fmt: skip
    callbacks = [LossMonitor()]
    own = own_part(written, rank=1, world_size=2, callbacks=callbacks)
    assert "ranks" not in own and (own["rng"], own["metrics"]) == ("rng1", {"m": 1})
    assert own["callbacks"] == {"LRSchedule": "shared", "LossMonitor": {"sums": 1}}
    with pytest.warns(CheckpointWarning, match=r"2 rank\(s\) and this run has 3: .* LossMonitor"):
        beyond = own_part(written, rank=2, world_size=3, callbacks=callbacks)
    assert beyond["rng"] == "rng0" and beyond["callbacks"] == {"LRSchedule": "shared"}
    # Written before rank parts were kept: rank 0's per-rank state is rank 0's alone.
    old = {"rng": "rng0", "metrics": {}, "callbacks": {"LRSchedule": "s", "LossMonitor": "r0"}}
    assert own_part(old, rank=0, world_size=2, callbacks=callbacks) is old
    assert own_part(old, rank=1, world_size=2, callbacks=callbacks)["callbacks"] == {
        "LRSchedule": "s"
    }


def test_bad_checkpoint_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="every_n_steps must be a positive int or None, got 0"):
        Checkpoint(tmp_path, every_n_steps=0)
    with pytest.raises(ValueError, match="mode must be 'min' or 'max', got 'best'"):
        Checkpoint(tmp_path, mode="best")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="keep_last must be an int >= 0, got -1"):
        Checkpoint(tmp_path, keep_last=-1)
    with pytest.raises(ValueError, match="Checkpoint never saves"):
        Checkpoint(tmp_path, save_on_end=False)


WRITER = """
import sys, time
from pathlib import Path
import torch
from asynchat._checkpoint_io import atomic_write, serialize
directory = Path(sys.argv[1])
payload = {"format": "asynchat-checkpoint", "version": 1, "weights": torch.randn(8_000_000)}
step = 0
while True:
    step += 1
    payload["step"] = step
    data, _ = serialize(payload)
    atomic_write(directory / f"step-{step:09d}.ckpt", data)
    print(step, flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.05, 0.23, 0.61])
def test_a_writer_killed_mid_write_leaves_complete_checkpoints_only(
    tmp_path: Path, delay: float
) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    ) as process:
        wait_for_line(process, "1")  # one checkpoint is complete
        time.sleep(delay)  # then kill it somewhere inside a later write (32 MB each)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        completed = [1, *map(int, process.stdout.read().split())]
    assert process.returncode == -signal.SIGKILL
    finals = sorted(tmp_path.glob("*.ckpt"))
    steps = [int(p.stem.split("-")[1]) for p in finals]
    # Every write reported complete is there; at most one more was renamed before the kill.
    assert set(completed) <= set(steps) <= {*completed, max(completed) + 1}
    for file in finals:  # every file under a final name is complete and loadable
        data = torch.load(file, weights_only=True)
        assert data["weights"].numel() == 8_000_000
    leftovers = [p.name for p in tmp_path.iterdir() if p.suffix != ".ckpt"]
    assert all(name.startswith(".") and name.endswith(".tmp") for name in leftovers)


def test_steps_to_skip_on_another_number_of_ranks_or_batch_size() -> None:
    """An interrupted epoch resumes after the samples already trained on: the same steps on
    the same ranks and batch; rescaled when either changes; with a warning when they are
    not a whole number of the new steps, or when a batch size is unknown."""
    from asynchat._resume import steps_to_skip

    progress = {"steps_in_epoch": 7, "world_size": 2, "batch_size": 16}
    assert steps_to_skip(progress, 2, 16) == 7
    assert steps_to_skip(progress, 1, 32) == 7
    assert steps_to_skip(progress, 1, 16) == 14
    assert steps_to_skip(progress, 4, 8) == 7
    assert steps_to_skip({"steps_in_epoch": 7}, 3, 5) == 7  # written before this was recorded
    with pytest.warns(CheckpointWarning, match="224 samples are not a whole number of steps"):
        assert steps_to_skip(progress, 1, 24) == 9
    with pytest.warns(CheckpointWarning, match="without both batch sizes"):
        assert steps_to_skip(progress, 1, None) == 7


@pytest.mark.parametrize("stop_at", [1, 5, 6, 7, 12])
def test_a_resume_into_an_epoch_the_data_has_no_steps_left_of_says_so(
    tmp_path: Path, stop_at: int
) -> None:
    # Resumed 5 steps into an epoch over data of 3 steps an epoch (a smaller set), the run
    # went on to the next epoch without a word. On the data the checkpoint was trained on,
    # at any step (the epoch's last included), nothing is said.
    anyio.run(make_trainer(StopAt(stop_at), Checkpoint(tmp_path), num_epochs=3).fit)
    same = make_trainer(Checkpoint(tmp_path / "same"), num_epochs=3, resume_from=tmp_path)
    anyio.run(same.fit)
    assert same.state.global_step == 18
    if stop_at % 6 == 5:
        smaller = make_trainer(loader=make_loader(48, 16), num_epochs=3, resume_from=tmp_path)
        with pytest.warns(
            CheckpointWarning,
            match=r"5 steps into epoch 0, and the data_loader has 3 steps an epoch: epoch 0 "
            r"ends with no further step",
        ):
            anyio.run(smaller.fit)
        assert smaller.state.global_step == 5 + 2 * 3


def _saved_run(directory: Path) -> None:
    anyio.run(
        make_trainer(
            ExponentialMovingAverage(), LRSchedule(cosine(100)), Checkpoint(directory),
            num_epochs=1,
        ).fit
    )  # fmt: skip


def test_resuming_with_another_optimizer_class_is_refused_before_anything_loads(
    tmp_path: Path,
) -> None:
    # torch loads an SGD's state into an Adam without a word, and the Adam fails at
    # load_state_dict's end with KeyError: 'step', the model already overwritten.
    _saved_run(tmp_path)
    model = make_model(seed=1)
    before = [t.clone() for t in model.state_dict().values()]
    trainer = Trainer(
        model, make_loader(), lambda m: torch.optim.Adam(m.parameters()),
        loss_fn=nn.CrossEntropyLoss(), num_epochs=2, resume_from=tmp_path,
    )  # fmt: skip
    with pytest.raises(CheckpointError, match=r"a torch\.optim\.sgd\.SGD .* torch\.optim\.adam"):
        anyio.run(trainer.fit)
    weights = zip(before, model.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in weights), "the model was left as it was"


def test_a_callback_state_the_run_lacks_is_reported(tmp_path: Path) -> None:
    _saved_run(tmp_path)
    trainer = make_trainer(num_epochs=2, resume_from=tmp_path)
    with pytest.warns(
        CheckpointWarning, match="callbacks this run lacks: ExponentialMovingAverage, LRSchedule"
    ):
        anyio.run(trainer.fit)


def test_a_model_that_does_not_fit_the_checkpoint_names_it(tmp_path: Path) -> None:
    _saved_run(tmp_path)
    trainer = make_trainer(model=make_model(classes=4), num_epochs=2, resume_from=tmp_path)
    with pytest.raises(RuntimeError, match="size mismatch") as caught:
        anyio.run(trainer.fit)
    assert any("while resuming from" in note and "step-" in note for note in caught.value.__notes__)


@pytest.mark.parametrize("how", ["bound reached", "stopped before its first step"])
def test_a_resumed_run_that_takes_no_step_saves_the_position_it_loaded(
    tmp_path: Path, how: str
) -> None:
    # It saved the position of a fresh run (epoch 0, no step, a fresh RNG) over the
    # checkpoint it resumed from, at the same global step: the run that went on from there
    # trained epoch 0's order again.
    straight = make_trainer(num_steps=16, loader=make_loader(96, 16, shuffle=True))
    anyio.run(straight.fit)

    def trainer(steps: int, resume: bool) -> Any:
        return make_trainer(
            Checkpoint(tmp_path), num_steps=steps, loader=make_loader(96, 16, shuffle=True),
            resume_from=tmp_path if resume else None,
        )  # fmt: skip

    anyio.run(trainer(10, resume=False).fit)  # mid-epoch 1
    idle = trainer(10 if how == "bound reached" else 16, resume=True)
    if how != "bound reached":
        idle.stop("before the first step")
    anyio.run(idle.fit)
    assert idle.state.global_step == 10
    saved = torch.load(tmp_path / "step-000000010.ckpt", weights_only=True)["progress"]
    assert (saved["epoch"], saved["steps_in_epoch"]) == (1, 4)

    resumed = trainer(16, resume=True)
    anyio.run(resumed.fit)
    weights = zip(
        resumed.model.state_dict().values(), straight.model.state_dict().values(), strict=True
    )
    assert all(torch.equal(a, b) for a, b in weights)


def test_a_step_checkpoint_holds_what_the_steps_later_hooks_did(tmp_path: Path) -> None:
    # Listed before the LRSchedule, the Checkpoint saved step 4 before the plateau scheduler
    # acted on step 4's validation: a run resumed from it acted at step 5 instead, one
    # update late, and trained to other weights. Its hooks now run last at every phase.
    def trainer(directory: Path, resume: bool = False) -> Trainer:
        return make_trainer(
            Validation(make_loader(48, 16, seed=1), loss_fn=nn.CrossEntropyLoss(),
                       every_n_steps=2, every_n_epochs=None),
            Checkpoint(directory, every_n_steps=2, keep_last=None),
            LRSchedule(
                lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(
                    opt, factor=0.5, patience=0, threshold=10.0  # halves at every validation
                ),
                monitor="val/loss",
            ),
            num_steps=8, resume_from=directory if resume else None,
        )  # fmt: skip

    straight = trainer(tmp_path / "straight")
    anyio.run(straight.fit)
    crashed = tmp_path / "crashed"  # after step 5: its newest checkpoint is step 4's
    crashed.mkdir()
    shutil.copy(tmp_path / "straight" / "step-000000004.ckpt", crashed)
    resumed = trainer(crashed, resume=True)
    anyio.run(resumed.fit)
    assert resumed.state.optimizer is not None and straight.state.optimizer is not None
    lrs = [t.state.optimizer.param_groups[0]["lr"] for t in (resumed, straight)]  # type: ignore[union-attr]
    assert lrs[0] == lrs[1] == 0.1 * 0.5**4
    weights = zip(
        resumed.model.state_dict().values(), straight.model.state_dict().values(), strict=True
    )
    assert all(torch.equal(a, b) for a, b in weights)


def test_a_compiled_models_checkpoint_resumes_without_compiling_and_back(
    tmp_path: Path,
) -> None:
    # torch.compile(model)'s state_dict names every weight "_orig_mod.<name>": saved by those
    # names, a run could be resumed only compiled the same way, and its weights loaded only
    # into a compiled module (torch's "Missing key(s)" error). They are saved by the plain
    # names now, as DCP's sharded checkpoints always were.
    straight = make_trainer(num_steps=12)
    anyio.run(straight.fit)

    compiled = torch.compile(make_model(), backend="eager")
    anyio.run(make_trainer(Checkpoint(tmp_path), model=compiled, num_steps=6).fit)
    saved = load_checkpoint(tmp_path)[0]["model"]
    assert list(saved) == list(make_model().state_dict())

    resumed = make_trainer(Checkpoint(tmp_path), num_steps=12, resume_from=tmp_path)
    anyio.run(resumed.fit)  # compiling turned off, to debug the run, say
    assert_bitwise_equal(resumed.model.state_dict(), straight.model.state_dict())

    part = make_model(seed=1)
    part[0] = torch.compile(part[0], backend="eager")  # and now one layer compiled
    load_weights(part, tmp_path)
    assert torch.equal(part[0].weight, straight.model[0].weight)
    deployed = torch.compile(make_model(seed=2), backend="eager")
    load_weights(deployed, tmp_path)  # strict: raises if a name is left unmatched
    assert torch.equal(deployed._orig_mod[2].bias, straight.model[2].bias)
    nested = torch.compile(nn.Sequential(make_model()), backend="eager")
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "_orig_mod\.0\.0'):
        load_weights(nested, tmp_path)  # a model of another layout still does not load


def test_weights_saved_under_compiled_names_load_by_their_plain_names() -> None:
    # Checkpoints written before compiled names were made plain hold "_orig_mod." names.
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
    compiled = {"generator": torch.compile(source, backend="eager"), "critic": nn.Linear(2, 1)}
    written = nn.ModuleDict(compiled).state_dict()
    assert "generator._orig_mod.1.running_mean" in written

    generator = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
    load_weights(generator, {"model": written}, prefix="generator.")
    assert_bitwise_equal(generator.state_dict(), source.state_dict())
    versions = generator.state_dict()._metadata  # type: ignore[attr-defined]
    assert versions["1"] == {"version": 2}, "BatchNorm's version came with its weights"
    with pytest.raises(CheckpointError, match=r"the checkpoint's model has \['critic\.', 'gen"):
        load_weights(generator, {"model": written}, prefix="discriminator.")
    wider = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
    missing, unexpected = load_weights(wider, {"model": written}, prefix="generator.", strict=False)
    assert (missing, unexpected) == (["2.weight", "2.bias"], []), "torch's result is returned"
