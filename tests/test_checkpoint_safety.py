"""Checkpoint directories under hostile files, typos and two writers (reliability probe 2d-2k)."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import numpy
import pytest
import rank_jobs
import torch
from conftest import (
    make_data,
    make_model,
    make_trainer,
    start_lock_holder,
    wait_until_listed,
)
from torch.utils.data import DataLoader

import asynchat._checkpoint_io
from asynchat import Callback, InUseError, LoopState, Trainer
from asynchat._checkpoint_io import LOCK, MANIFEST_LIMIT, serialize
from asynchat._worker_seeds import seeded_per_batch
from asynchat.callbacks import (
    Checkpoint,
    CheckpointError,
    CheckpointWarning,
    JSONLinesLogger,
    TensorBoardLogger,
    find_checkpoint,
    load_checkpoint,
)


def manifest(directory: Path) -> list[dict[str, Any]]:
    return json.loads((directory / "manifest.json").read_text())["checkpoints"]  # type: ignore[no-any-return]


def write_manifest(directory: Path, entries: list[Any]) -> None:
    (directory / "manifest.json").write_text(json.dumps({"checkpoints": entries}))


def train(directory: Path, *callbacks: Callback, **kwargs: Any) -> LoopState:
    kwargs.setdefault("num_steps", 6)
    checkpoint_args = kwargs.pop("checkpoint", {"every_n_steps": 2, "keep_last": 5})
    trainer = make_trainer(*callbacks, Checkpoint(directory, **checkpoint_args), **kwargs)
    return anyio.run(trainer.fit)


def steps_on_disk(directory: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in directory.glob("step-*.ckpt"))


# -- the manifest is data, not instructions ------------------------------------------------


def test_a_manifests_replaced_list_removes_only_unlisted_checkpoints_of_its_directory(
    tmp_path: Path,
) -> None:
    """The manifest's "replaced" names (a run's overwrite under way) are removed by the next
    Checkpoint there: never a file outside the directory, nor one the manifest lists."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    save_dir = tmp_path / "ckpt"
    train(save_dir)  # steps 2, 4, 6
    listed = json.loads((save_dir / "manifest.json").read_text())
    listed["replaced"] = ["../victim.txt", str(victim), "step-000000006.ckpt", 7, None]
    (save_dir / "manifest.json").write_text(json.dumps(listed))
    assert find_checkpoint(save_dir) == save_dir / "step-000000006.ckpt"
    assert train(save_dir, num_steps=8, resume_from=save_dir).global_step == 8
    assert victim.read_text() == "precious"
    assert steps_on_disk(save_dir) == [2, 4, 6, 8]


def test_a_bad_manifest_entry_is_told_of_once_beside_a_replaced_list(tmp_path: Path) -> None:
    """The "replaced" list was read with the whole manifest a second time: each unusable
    entry was warned of twice by one find_checkpoint."""
    train(tmp_path)
    listed = json.loads((tmp_path / "manifest.json").read_text())
    listed["checkpoints"].append({"file": "bogus"})
    listed["replaced"] = ["step-000000009.ckpt"]
    (tmp_path / "manifest.json").write_text(json.dumps(listed))
    with pytest.warns(CheckpointWarning) as told:
        assert find_checkpoint(tmp_path) == tmp_path / "step-000000006.ckpt"
    assert [str(w.message).count("'bogus'") for w in told] == [1]


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_manifest_entries_outside_save_dir_are_never_deleted_or_loaded(
    tmp_path: Path, where: str
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    other = tmp_path / "other"
    train(other)  # a real checkpoint elsewhere, at step 6
    save_dir = tmp_path / "run" / "ckpt"
    save_dir.mkdir(parents=True)
    foreign = [
        {"file": "../../victim.txt" if where == "relative" else str(victim),
         "global_step": 99999, "epoch": 0, "metric": None, "sha256": None, "time": 0},
        {"file": str(other / "step-000000006.ckpt"), "global_step": 6, "epoch": 0,
         "metric": None, "sha256": None, "time": 0},
    ]  # fmt: skip
    write_manifest(save_dir, foreign)
    with (
        pytest.warns(CheckpointWarning, match="not a checkpoint name"),
        pytest.raises(CheckpointError, match="no valid checkpoint"),
    ):
        load_checkpoint(save_dir)  # the other directory's checkpoint is not loaded
    with pytest.warns(CheckpointWarning, match="not a checkpoint name"):
        train(save_dir, checkpoint={"every_n_steps": 1, "keep_last": 1})
    assert victim.read_text() == "precious"
    assert (other / "step-000000006.ckpt").exists()
    assert [e["file"] for e in manifest(save_dir)] == ["step-000000006.ckpt"]


def test_a_symlink_named_like_a_checkpoint_is_neither_loaded_nor_deleted(tmp_path: Path) -> None:
    other, save_dir = tmp_path / "other", tmp_path / "ckpt"
    train(other)
    train(save_dir, num_steps=2, checkpoint={"every_n_steps": 2})
    link = save_dir / "step-000000009.ckpt"
    link.symlink_to(other / "step-000000006.ckpt")
    with pytest.warns(CheckpointWarning, match="not a regular file"):
        _, loaded = load_checkpoint(save_dir)
    assert loaded.name == "step-000000002.ckpt"
    with pytest.warns(CheckpointWarning, match="not a regular file"):
        train(save_dir, num_steps=4, resume_from=save_dir,
              checkpoint={"every_n_steps": 1, "keep_last": 1})  # fmt: skip
    assert link.is_symlink() and (other / "step-000000006.ckpt").exists()


@pytest.mark.parametrize("what", ["link", "fifo", "dangling link"])
def test_a_lock_file_that_is_a_link_or_no_file_is_refused_and_never_written_through(
    tmp_path: Path, what: str
) -> None:
    """Regression: the lock was opened following links, so a ``.asynchat.lock`` linking to
    a file outside the directory had that file truncated and overwritten with the holder's
    pid (measured: any file the process could write)."""
    save_dir, victim = tmp_path / "ckpt", tmp_path / "precious.txt"
    save_dir.mkdir()
    victim.write_text("precious")
    lock = save_dir / LOCK
    if what == "fifo":
        os.mkfifo(lock)
    else:
        lock.symlink_to(victim if what == "link" else tmp_path / "nowhere")
    kind = "not a regular file" if what == "fifo" else "a symbolic link"
    with pytest.raises(CheckpointError, match=rf"lock .* is {kind}"):
        train(save_dir)
    assert victim.read_text() == "precious" and not (tmp_path / "nowhere").exists()
    assert steps_on_disk(save_dir) == []


def test_sharded_names_that_are_links_or_leftovers(tmp_path: Path) -> None:
    """A link named like a sharded checkpoint (step-*.dcp) is never loaded nor deleted, nor
    is a link named like a sharded save's temporary directory (nor what it points to); a real
    temporary directory a killed save left is removed when the next run begins."""
    outside, save_dir = tmp_path / "outside", tmp_path / "ckpt"
    outside.mkdir()
    (outside / "precious").write_text("precious")
    train(save_dir, num_steps=2, checkpoint={"every_n_steps": 2})
    link = save_dir / "step-000000009.dcp"
    link.symlink_to(outside, target_is_directory=True)
    leftover = save_dir / ".step-000000004.dcp.3.tmp"
    leftover.mkdir()
    (leftover / "__0_0.distcp").write_bytes(b"half")
    temporary_link = save_dir / ".step-000000005.dcp.1.tmp"
    temporary_link.symlink_to(outside, target_is_directory=True)
    with pytest.warns(CheckpointWarning, match=r"step-000000009\.dcp is not a directory"):
        assert load_checkpoint(save_dir)[1].name == "step-000000002.ckpt"
    with pytest.warns(CheckpointWarning, match="is not a directory"):
        train(save_dir, num_steps=4, resume_from=save_dir,
              checkpoint={"every_n_steps": 1, "keep_last": 1})  # fmt: skip
    assert link.is_symlink() and (outside / "precious").read_text() == "precious"
    assert not leftover.exists() and temporary_link.is_symlink()
    # A sharded checkpoint whose asynchat.pt is a link (to another checkpoint) is not read.
    borrowed = save_dir / "step-000000099.dcp"
    borrowed.mkdir()
    (borrowed / "asynchat.pt").symlink_to(save_dir / "step-000000004.ckpt")
    with pytest.warns(CheckpointWarning) as caught:
        assert load_checkpoint(save_dir)[1].name == "step-000000004.ckpt"
    assert any("asynchat.pt is a symbolic link" in str(w.message) for w in caught)


def flip_tensor_bytes(file: Path) -> None:
    """Flip 16 bytes inside the largest tensor record of a torch zip file."""
    data = bytearray(file.read_bytes())
    weights = torch.load(file, weights_only=True)["model"]["0.weight"]
    raw = weights.numpy().tobytes()
    at = data.find(raw[:64])
    assert at > 0, "tensor bytes not found in the file"
    for i in range(at + 32, at + 48):
        data[i] ^= 0xFF
    file.write_bytes(bytes(data))


def test_bit_flipped_weights_are_caught_without_the_manifest(tmp_path: Path) -> None:
    train(tmp_path)
    (tmp_path / "manifest.json").unlink()
    flip_tensor_bytes(tmp_path / "step-000000006.ckpt")
    with pytest.raises(CheckpointError, match="content digest"):
        load_checkpoint(tmp_path / "step-000000006.ckpt")
    with pytest.warns(CheckpointWarning, match="content digest"):
        checkpoint, path = load_checkpoint(tmp_path)
    assert path.name == "step-000000004.ckpt"
    assert checkpoint["progress"]["global_step"] == 4


@pytest.mark.parametrize(
    "entries",
    [
        [{"file": "step-000000006.ckpt"}],  # keys missing
        ["step-000000006.ckpt"],  # entries are strings
        [{"file": "step-000000006.ckpt", "global_step": "6", "sha256": None}],  # wrong types
    ],
    ids=["missing-keys", "strings", "wrong-types"],
)
def test_a_malformed_manifest_falls_back_to_the_files(tmp_path: Path, entries: list[Any]) -> None:
    train(tmp_path)
    write_manifest(tmp_path, entries)
    with pytest.warns(CheckpointWarning, match="ignored"):
        _, path = load_checkpoint(tmp_path)
    assert path.name == "step-000000006.ckpt"
    with pytest.warns(CheckpointWarning):  # and a trainer resumes from it, no KeyError
        state = anyio.run(make_trainer(num_steps=8, resume_from=tmp_path).fit)
    assert state.global_step == 8


@pytest.mark.parametrize("manifest", [[], "text", 12, None], ids=["list", "str", "int", "null"])
def test_a_manifest_that_is_not_an_object_ranks_nothing(tmp_path: Path, manifest: Any) -> None:
    # find_checkpoint(best=True) raised AttributeError ('list' object has no attribute 'get').
    train(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="its manifest ranks no checkpoint"):
        find_checkpoint(tmp_path, best=True)
    with pytest.warns(CheckpointWarning, match="unreadable|ignored"):
        assert find_checkpoint(tmp_path).name == "step-000000006.ckpt"


def test_a_manifest_that_is_a_directory_falls_back_with_a_warning(tmp_path: Path) -> None:
    train(tmp_path)
    (tmp_path / "manifest.json").unlink()
    (tmp_path / "manifest.json").mkdir()
    with pytest.warns(CheckpointWarning, match="unreadable"):
        _, path = load_checkpoint(tmp_path)
    assert path.name == "step-000000006.ckpt"


@pytest.mark.parametrize(
    "content",
    ['{"name": "my app", "icons": []}', "[1, 2]"],
    ids=["another-tools-object", "a-list"],
)
def test_a_manifest_no_checkpoint_wrote_is_refused_not_replaced(
    tmp_path: Path, content: str
) -> None:
    """Regression: a ``manifest.json`` of another tool's in the save_dir (a web app's, a
    model registry's) was taken for a damaged one of ours, with a warning, and replaced by
    the run's at its first save: the user's file gone. Refused before training now."""
    (tmp_path / "manifest.json").write_text(content)
    trainer = make_trainer(Checkpoint(tmp_path, every_n_steps=2), num_steps=4)
    with pytest.raises(CheckpointError, match=r"its manifest.json is no Checkpoint's \("):
        anyio.run(trainer.fit)
    assert trainer.state.global_step == 0, "refused before training"
    assert (tmp_path / "manifest.json").read_text() == content
    assert steps_on_disk(tmp_path) == []


def test_a_manifest_that_is_no_json_is_set_aside_not_replaced(tmp_path: Path) -> None:
    """Regression: one that was no JSON at all (damaged, or not ours) was replaced without
    a trace; it is set aside as manifest.json.unreadable (never loaded or deleted), a
    second one beside it, and the run saves on from the checkpoint files."""
    train(tmp_path)
    for n, content in enumerate([b"\x00damaged\xff", b"name: not json"]):
        (tmp_path / "manifest.json").write_bytes(content)
        with pytest.warns(CheckpointWarning, match="unreadable") as told:  # (the resume too)
            assert train(tmp_path, num_steps=8 + 2 * n, resume_from=tmp_path).global_step
        assert any("; set aside as manifest.json.unreadable" in str(w.message) for w in told)
        aside = "manifest.json.unreadable" + ("-2" if n else "")
        assert (tmp_path / aside).read_bytes() == content
        assert [e["global_step"] for e in manifest(tmp_path)][-1] == 8 + 2 * n


class EndOfFileWhenRead:
    """Gives ``fifo`` an end of file whenever someone opens it to read, until the block
    ends: code that waits on a FIFO then reads nothing, and its test fails instead of
    hanging."""

    def __init__(self, fifo: Path) -> None:
        os.mkfifo(fifo)
        self.fifo, self.done = fifo, threading.Event()
        self.thread = threading.Thread(target=self._feed, daemon=True)

    def __enter__(self) -> None:
        self.thread.start()

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()

    def _feed(self) -> None:
        while not self.done.wait(0.02):
            with contextlib.suppress(OSError):  # ENXIO: nobody reads it yet
                os.close(os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK))


def nested_too_deep(directory: Path) -> None:
    (directory / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)


def larger_than_a_manifest_is(directory: Path) -> None:
    with (directory / "manifest.json").open("wb") as file:
        file.truncate(MANIFEST_LIMIT + 1)  # sparse: no disk space taken


def a_link_to_dev_zero(directory: Path) -> None:
    (directory / "manifest.json").symlink_to("/dev/zero")  # its read would never end


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (nested_too_deep, "RecursionError"),
        (larger_than_a_manifest_is, f"larger than {MANIFEST_LIMIT} bytes"),
        (a_link_to_dev_zero, "is a character device, not a regular file"),
        (None, "is a FIFO, not a regular file"),
    ],
    ids=["nested-too-deep", "larger-than-64MiB", "link-to-dev-zero", "fifo"],
)
def test_a_manifest_that_cannot_be_read_safely_falls_back_to_the_files(
    tmp_path: Path, make: Callable[[Path], None] | None, why: str
) -> None:
    # Regression: a FIFO named manifest.json left every load and every Checkpoint in the
    # directory waiting forever for a writer (a service's job uncancellable); /dev/zero
    # filled the memory; a manifest nested too deep let json's RecursionError end the run.
    train(tmp_path)
    (tmp_path / "manifest.json").unlink()
    fifo = tmp_path / "manifest.json"
    with contextlib.nullcontext() if make else EndOfFileWhenRead(fifo):
        if make is not None:
            make(tmp_path)
        with pytest.warns(CheckpointWarning, match=f"unreadable .*{re.escape(why)}"):
            assert load_checkpoint(tmp_path)[1].name == "step-000000006.ckpt"
        with pytest.warns(CheckpointWarning, match=re.escape(why)):
            state = train(tmp_path, num_steps=8, resume_from=tmp_path)
    assert state.global_step == 8
    assert [e["global_step"] for e in manifest(tmp_path)] == [2, 4, 6, 8]  # from the files


def test_a_checkpoint_that_is_a_fifo_is_refused_unread(tmp_path: Path) -> None:
    # Regression: a FIFO under a checkpoint's name that the manifest lists (or given as
    # resume_from) was read, which waited forever for a writer.
    train(tmp_path)
    fifo = tmp_path / "step-000000008.ckpt"
    entry = dict(manifest(tmp_path)[-1], file=fifo.name, global_step=8, sha256=None)
    write_manifest(tmp_path, [*manifest(tmp_path), entry])
    with EndOfFileWhenRead(fifo):
        with pytest.warns(CheckpointWarning) as warned:  # (also: never deleted)
            assert load_checkpoint(tmp_path)[1].name == "step-000000006.ckpt"
        assert any("is a FIFO, not a regular file; trying" in str(w.message) for w in warned)
        with pytest.raises(CheckpointError, match="is a FIFO, not a regular file"):
            load_checkpoint(fifo)


def test_a_newest_checkpoint_without_progress_falls_back(tmp_path: Path) -> None:
    train(tmp_path)
    newest = tmp_path / "step-000000006.ckpt"
    content = torch.load(newest, weights_only=True)
    del content["progress"]
    newest.write_bytes(serialize(content)[0])  # valid digest, incomplete content
    (tmp_path / "manifest.json").unlink()
    with pytest.warns(CheckpointWarning, match="progress"):
        _, path = load_checkpoint(tmp_path)
    assert path.name == "step-000000004.ckpt"


@pytest.mark.parametrize(
    ("key", "value"),
    [("global_step", -6), ("global_step", "6"), ("global_step", 6.5), ("epoch", True),
     ("steps_in_epoch", None), ("epoch_exhausted", "yes"), ("world_size", 0),
     ("batch_size", -4)],
)  # fmt: skip
def test_a_checkpoint_whose_progress_is_no_count_falls_back(
    tmp_path: Path, key: str, value: Any
) -> None:
    # Regression: it was resumed from as it was: global step "6" failed the run with a
    # TypeError, 6.5 or -6 trained on at fractional or negative steps.
    train(tmp_path)
    newest = tmp_path / "step-000000006.ckpt"
    content = torch.load(newest, weights_only=True)
    content["progress"][key] = value
    newest.write_bytes(serialize(content)[0])  # a valid digest
    (tmp_path / "manifest.json").unlink()
    with pytest.warns(CheckpointWarning, match=f"its progress has {key}={re.escape(repr(value))}"):
        assert load_checkpoint(tmp_path)[1].name == "step-000000004.ckpt"


def test_a_checkpoint_renamed_by_hand_is_not_taken_for_the_step_its_name_says(
    tmp_path: Path,
) -> None:
    # Regression: step 4's checkpoint copied to step-000000008.ckpt was taken for the newest.
    train(tmp_path)
    shutil.copy(tmp_path / "step-000000004.ckpt", tmp_path / "step-000000008.ckpt")
    with pytest.warns(CheckpointWarning, match=r"holds global step 4, not the step its name"):
        assert load_checkpoint(tmp_path)[1].name == "step-000000006.ckpt"
    with pytest.raises(CheckpointError, match=r"holds global step 4, not the step its name"):
        load_checkpoint(tmp_path / "step-000000008.ckpt")
    shutil.copy(tmp_path / "step-000000004.ckpt", tmp_path / "chosen.ckpt")
    assert load_checkpoint(tmp_path / "chosen.ckpt")[0]["progress"]["global_step"] == 4


# -- retention never loses the checkpoints that matter ------------------------------------


class Publish(Callback):
    """Publishes ``values[i]`` as ``name`` at the i-th step end (before Checkpoint)."""

    def __init__(self, name: str, values: list[float]) -> None:
        self.name, self.values = name, values

    def on_step_end(self, state: LoopState) -> None:
        state.metrics[self.name] = self.values[state.global_step - 1]


def test_a_typo_in_monitor_is_an_error_and_the_checkpoint_is_kept(tmp_path: Path) -> None:
    publish = Publish("val/accuracy", [0.5] * 6)
    checkpoint = {"every_n_steps": 2, "keep_last": 0, "monitor": "val/acc", "mode": "max"}
    with pytest.raises(CheckpointError, match=r"monitor='val/acc'.*val/accuracy"):
        train(tmp_path, publish, checkpoint=checkpoint)
    assert steps_on_disk(tmp_path) == [2]  # the first save is written, not pruned


def test_keep_last_0_with_a_monitor_never_published_is_an_error(tmp_path: Path) -> None:
    checkpoint = {"every_n_steps": 2, "keep_last": 0, "monitor": "val/acc"}
    with pytest.raises(CheckpointError, match="no such metric"):
        train(tmp_path, checkpoint=checkpoint)
    assert steps_on_disk(tmp_path) == [2]


def test_a_monitor_not_yet_published_warns_once_and_keeps_by_keep_last(tmp_path: Path) -> None:
    late = Publish("val/loss", [float("nan")] * 3 + [0.4, 0.3, 0.5])
    late.on_step_end = lambda state: (  # type: ignore[method-assign]
        state.metrics.update({"val/loss": late.values[state.global_step - 1]})
        if state.global_step > 3
        else None
    )
    checkpoint = {"every_n_steps": 1, "keep_last": 1, "monitor": "val/loss"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tmp_path, late, checkpoint=checkpoint)
    unranked = [w for w in caught if "not published yet" in str(w.message)]
    assert len(unranked) == 1
    assert steps_on_disk(tmp_path) == [5, 6]  # best (0.3 at step 5) and the newest


def test_nan_and_inf_never_rank_as_best(tmp_path: Path) -> None:
    publish = Publish("val/loss", [float("nan"), 0.5, 0.3, float("-inf"), 0.9, float("nan")])
    checkpoint = {"every_n_steps": 1, "keep_last": 1, "monitor": "val/loss", "keep_best": 1}
    train(tmp_path, publish, checkpoint=checkpoint)
    assert steps_on_disk(tmp_path) == [3, 6]  # 0.3 is the best; 6 is the newest
    # The manifest is strict JSON (it held a bare NaN, which JSON has not: JSON.parse, Go's
    # and Rust's parsers refused it); a metric that is not finite is null there.
    text = (tmp_path / "manifest.json").read_text()
    manifest = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in {text}"))
    assert [entry["metric"] for entry in manifest["checkpoints"]] == [0.3, None]


@dataclasses.dataclass
class Best:
    """A callback state's value that torch.load(weights_only=True) refuses unless allowed."""

    value: float


class Holding(Callback):
    """A callback whose state_dict() holds ``value`` (from step 3 on, as a "best so far"
    set during training), under ``{"history": [..., {"best": value}]}``."""

    def __init__(self, value: Any) -> None:
        self.value = value
        self.state: dict[str, Any] = {"history": [1.0]}

    def on_step_end(self, state: LoopState) -> None:
        if state.global_step == 3:
            self.state = {"history": [1.0, {"best": self.value}]}

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state


@pytest.mark.parametrize(
    ("value", "kind"),
    [(numpy.float64(0.5), "numpy.float64"), (Best(0.5), "test_checkpoint_safety.Best")],
    ids=["numpy", "dataclass"],
)
def test_a_state_that_resuming_could_not_load_is_refused_at_the_save(
    tmp_path: Path, value: Any, kind: str
) -> None:
    # Every save succeeded and none could be resumed: "no valid checkpoint (... is not a
    # loadable checkpoint (UnpicklingError: Weights only load failed ...".
    with pytest.raises(CheckpointError) as caught:
        train(tmp_path, Holding(value), checkpoint={"every_n_steps": 2})
    assert str(caught.value).startswith(
        f"checkpoint['callbacks']['Holding']['history'][1]['best'] is a {kind}, which a "
        "checkpoint cannot hold"
    )
    assert "add_safe_globals" in str(caught.value)
    assert steps_on_disk(tmp_path) == [2]  # saved before the value; the one after refused


@pytest.mark.parametrize("content", ["garbage", "a class"])
def test_a_file_a_weights_only_load_refuses_is_named_without_torchs_advice(
    tmp_path: Path, content: str
) -> None:
    # The error quoted torch's message whole, which advises loading the file again with
    # weights_only=False ("will likely succeed, but it can result in arbitrary code
    # execution"): for a crafted file, the advice that runs its code.
    file = tmp_path / "step-000000002.ckpt"
    if content == "garbage":
        file.write_bytes(b"garbage")
    else:
        torch.save({"format": "asynchat-checkpoint", "best": Best(0.5)}, file)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(file)
    message = str(caught.value)
    assert message.startswith(f"{file} is not a loadable checkpoint (a weights-only load refused")
    assert "weights_only` set to `False`" not in message and "\n" not in message
    if content == "garbage":
        assert "Unsupported operand" in message
    else:
        assert "test_checkpoint_safety.Best" in message and "add_safe_globals" in message


def test_a_type_allowed_with_add_safe_globals_is_saved_and_resumed(tmp_path: Path) -> None:
    with torch.serialization.safe_globals([Best]):
        train(tmp_path, Holding(Best(0.5)), checkpoint={"every_n_steps": 2})
        resumed = Holding(None)
        train(tmp_path, resumed, num_steps=8, resume_from=tmp_path)
    assert resumed.state == {"history": [1.0, {"best": Best(0.5)}]}


def test_keep_last_none_keeps_every_checkpoint(tmp_path: Path) -> None:
    train(tmp_path, checkpoint={"every_n_steps": 1, "keep_last": None})
    assert steps_on_disk(tmp_path) == [1, 2, 3, 4, 5, 6]


def test_a_checkpoint_a_crash_kept_out_of_the_manifest_is_pruned_later(tmp_path: Path) -> None:
    train(tmp_path, checkpoint={"every_n_steps": 2, "keep_last": 2})
    entries = manifest(tmp_path)
    write_manifest(tmp_path, entries[:-1])  # the crash came between file and manifest
    assert steps_on_disk(tmp_path) == [4, 6]
    train(tmp_path, num_steps=10, resume_from=tmp_path,
          checkpoint={"every_n_steps": 2, "keep_last": 2})  # fmt: skip
    assert steps_on_disk(tmp_path) == [8, 10]  # step 6 adopted, then pruned like the others
    assert sorted(e["global_step"] for e in manifest(tmp_path)) == [8, 10]


# -- one live writer per directory ----------------------------------------------------------


class Gate(Callback):
    """Holds the loop at global step ``at`` until ``release`` is set."""

    def __init__(self, at: int = 0) -> None:
        self.at = at
        self.reached = anyio.Event()
        self.release = anyio.Event()

    async def on_step_begin(self, state: LoopState) -> None:
        if state.global_step == self.at:
            self.reached.set()
            await self.release.wait()


@pytest.mark.anyio
async def test_a_second_writer_in_the_same_process_is_refused_before_training(
    tmp_path: Path,
) -> None:
    gate = Gate()
    first = make_trainer(gate, Checkpoint(tmp_path, every_n_steps=1), num_steps=4)
    second = make_trainer(Checkpoint(tmp_path, every_n_steps=1), num_steps=4)
    async with anyio.create_task_group() as tg:
        tg.start_soon(first.fit)
        await gate.reached.wait()
        with pytest.raises(CheckpointError, match=r"in use by another live Checkpoint writer"):
            await second.fit()
        assert second.state.global_step == 0
        third = make_trainer(Checkpoint(tmp_path, every_n_steps=1), num_steps=4)
        with pytest.raises(InUseError, match=r"in use by another live Checkpoint writer"):
            await third.fit()  # (an InUseError too, as every refusal of a run in use)
        gate.release.set()
    assert steps_on_disk(tmp_path) == [2, 3, 4]
    resumed = make_trainer(Checkpoint(tmp_path, every_n_steps=1), num_steps=5, resume_from=tmp_path)
    assert (await resumed.fit()).global_step == 5  # released at the end of the first run


@pytest.mark.anyio
async def test_two_checkpoints_of_one_loop_on_one_directory_are_named_as_such(
    tmp_path: Path,
) -> None:
    # One Checkpoint to save every 2 steps and another each epoch, into one directory: the
    # second was refused as "in use by another live Checkpoint writer ... two runs sharing a
    # directory", naming this process, as if another run held it.
    twins = make_trainer(
        Checkpoint(tmp_path, every_n_steps=2), Checkpoint(f"{tmp_path}/.", every_n_epochs=1)
    )
    twin = r"two Checkpoint callbacks save into save_dir=.* One Checkpoint takes every_n_steps"
    with pytest.raises(ValueError, match=twin):
        await twins.fit()
    assert twins.state.global_step == 0 and not list(tmp_path.iterdir())
    both = make_trainer(Checkpoint(tmp_path, every_n_steps=4, every_n_epochs=1, keep_last=None))
    assert (await both.fit()).global_step == 18
    assert steps_on_disk(tmp_path) == [4, 6, 8, 12, 16, 18]


def test_a_forked_data_worker_does_not_keep_the_lock_of_a_finished_run(tmp_path: Path) -> None:
    # DataLoader workers forked while the lock was held shared its open file; kept alive by
    # persistent_workers, they held the flock after the run released it, and the next run
    # of this process (a resume) was refused: "in use by another live Checkpoint writer".
    loader = DataLoader(
        make_data(96), batch_size=16, num_workers=1, persistent_workers=True,
        multiprocessing_context="fork",
    )  # fmt: skip
    first = make_trainer(Checkpoint(tmp_path), loader=loader, num_steps=3, num_epochs=None)
    anyio.run(first.fit)
    # Its worker process lives on, for the next run (in the copy the engine iterates, which
    # seeds the workers batch by batch).
    assert seeded_per_batch(loader)._iterator is not None  # type: ignore[attr-defined]
    resumed = make_trainer(
        Checkpoint(tmp_path), loader=loader, num_steps=6, num_epochs=None, resume_from=tmp_path
    )
    assert anyio.run(resumed.fit).global_step == 6  # the workers of `loader` still live


def test_a_writer_in_another_process_is_refused_and_its_lock_taken_over_when_it_dies(
    tmp_path: Path,
) -> None:
    with start_lock_holder(tmp_path) as holder:
        with pytest.raises(CheckpointError, match=rf"pid {holder.pid}"):
            train(tmp_path)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    state = train(tmp_path)  # the dead holder's lock is taken over
    assert state.global_step == 6 and steps_on_disk(tmp_path) == [2, 4, 6]


EVERY_STEP = {"every_n_steps": 1, "keep_last": 5}


class RemoveLock(Callback):
    """At global step ``at`` (before that step's save), once the last step's checkpoint is
    written, removes the checkpoint directory's lock file (an operator clearing a "stale"
    lock) and, with ``take``, has another process lock the directory."""

    def __init__(self, directory: Path, at: int, take: bool = False) -> None:
        self.directory, self.at, self.take = directory, at, take
        self.holder: subprocess.Popen[str] | None = None

    def on_step_end(self, state: LoopState) -> None:
        if state.global_step != self.at:
            return
        wait_until_listed(self.directory, self.at - 1)
        (self.directory / LOCK).unlink()
        if self.take:
            self.holder = start_lock_holder(self.directory)


def test_a_lock_file_removed_mid_run_is_taken_again(tmp_path: Path) -> None:
    """Regression: the run went on locking a file that no longer had a name, so a second
    writer could take the directory and the two would prune each other's checkpoints."""
    with pytest.warns(CheckpointWarning, match=r"lock file .* was removed while this run held"):
        state = train(tmp_path, RemoveLock(tmp_path, at=3), checkpoint=EVERY_STEP)
    assert state.global_step == 6 and steps_on_disk(tmp_path) == [2, 3, 4, 5, 6]
    assert f"pid {os.getpid()}" in (tmp_path / LOCK).read_text()
    resumed = train(tmp_path, num_steps=8, resume_from=tmp_path, checkpoint=EVERY_STEP)
    assert resumed.global_step == 8  # the lock taken again was released at the end


class RemoveFiles(Callback):
    """At global step ``at`` (before that step's save), once the last step's checkpoint is
    listed, removes ``path`` (an operator's ``rm -rf``: a directory with all it holds)."""

    def __init__(self, directory: Path, path: Path, at: int) -> None:
        self.directory, self.path, self.at = directory, path, at

    def on_step_end(self, state: LoopState) -> None:
        if state.global_step == self.at:
            wait_until_listed(self.directory, self.at - 1)
            if self.path.is_dir():
                shutil.rmtree(self.path)
            else:
                self.path.unlink()


def test_a_directory_removed_mid_run_is_made_again_and_the_run_saves_on(tmp_path: Path) -> None:
    """Regression: the next save failed (no such file or directory), and with it the run:
    everything it had trained was lost with the checkpoints the removal took."""
    directory = tmp_path / "run" / "checkpoints"
    with pytest.warns(CheckpointWarning, match="the directory was removed while this run wrote"):
        state = train(
            directory, RemoveFiles(directory, tmp_path / "run", at=4), checkpoint=EVERY_STEP
        )
    assert state.global_step == 6 and steps_on_disk(directory) == [4, 5, 6]
    assert [e["global_step"] for e in manifest(directory)] == [4, 5, 6], "only what is there"
    assert f"pid {os.getpid()}" in (directory / LOCK).read_text(), "the lock taken again"
    resumed = train(directory, num_steps=8, resume_from=directory, checkpoint=EVERY_STEP)
    assert resumed.global_step == 8


def test_a_checkpoint_removed_by_hand_leaves_the_manifest_and_counts_for_nothing(
    tmp_path: Path,
) -> None:
    """The manifest listed it until pruned, and it took a place in ``keep_last``."""
    removal = RemoveFiles(tmp_path, tmp_path / "step-000000002.ckpt", at=4)
    state = train(tmp_path, removal, checkpoint=EVERY_STEP)
    assert state.global_step == 6 and steps_on_disk(tmp_path) == [1, 3, 4, 5, 6]
    assert [e["global_step"] for e in manifest(tmp_path)] == [1, 3, 4, 5, 6]


class Diverge(Callback):
    """At step ``at``'s begin, puts a NaN into the model's first trainable parameter (as a
    diverging update would): every later step's weights are NaN."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_begin(self, state: LoopState) -> None:
        if state.global_step == self.at - 1:
            with torch.no_grad():
                next(state.loop.model.parameters()).fill_(float("nan"))


def test_a_run_that_diverged_is_not_saved_and_prunes_no_checkpoint_it_could_resume_from(
    tmp_path: Path,
) -> None:
    """Regression: each save of the diverged weights pruned a good checkpoint; with the NaN
    found by TerminateOnNaN 20 steps late (or not at all), keep_last=3 kept only NaNs."""
    long_epochs = DataLoader(make_data(480), batch_size=16)  # 30 steps an epoch
    with pytest.raises(CheckpointError, match=r"not saved at global step 6: parameter '0.weig"):
        train(tmp_path, Diverge(at=5), loader=long_epochs, num_steps=30,
              checkpoint={"every_n_steps": 2, "keep_last": 2})  # fmt: skip
    assert steps_on_disk(tmp_path) == [2, 4]
    for file in tmp_path.glob("*.ckpt"):
        weights = torch.load(file, weights_only=True)["model"]
        assert all(torch.isfinite(w).all() for w in weights.values()), file.name
    assert train(tmp_path, num_steps=8, resume_from=tmp_path).global_step == 8


def test_a_frozen_parameter_may_hold_infinities(tmp_path: Path) -> None:
    """Only what trains is checked: a frozen parameter used as a mask may hold -inf."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 3))
    model.register_parameter("mask", torch.nn.Parameter(torch.full((3,), -torch.inf), False))
    assert train(tmp_path, model=model).global_step == 6 and steps_on_disk(tmp_path) == [2, 4, 6]


class OverflowStatistics(Callback):
    """At step ``at``'s end, makes a BatchNorm's running variance NaN, as an activation that
    overflowed does, while the parameters stay finite."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, state: LoopState) -> None:
        if state.global_step == self.at:
            with torch.no_grad():
                state.loop.model[1].running_var[0] = float("nan")


def test_a_run_whose_batchnorm_statistics_went_nan_is_not_saved(tmp_path: Path) -> None:
    """Regression: only the trainable parameters were checked, and a checkpoint whose running
    variance was NaN was saved (the resumed model's every eval output NaN), pruning good
    ones. A buffer may hold infinities: a quantization observer's start values pass."""
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3)
    )
    model.register_buffer("observed", torch.tensor([torch.inf, -torch.inf]))  # min, max
    with pytest.raises(CheckpointError, match=r"global step 4: buffer '1.running_var' holds NaN"):
        train(tmp_path, OverflowStatistics(at=3), model=model, checkpoint={"every_n_steps": 2})
    assert steps_on_disk(tmp_path) == [2]
    model[1].reset_running_stats()
    assert train(tmp_path / "again", model=model).global_step == 6


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_a_distributed_run_diverged_on_one_rank_is_saved_by_none(tmp_path: Path, kind: str) -> None:
    from asynchat import LaunchError, launch

    with pytest.raises(LaunchError) as info:
        launch(rank_jobs.diverged_on_rank_one, nprocs=2, args=(str(tmp_path), kind))
    text = str(info.value)
    assert "not saved at global step 4: the weights of rank 1" in text
    assert "hold NaN or infinite values" in text
    assert [e["global_step"] for e in manifest(tmp_path)] == [2]


def test_a_run_whose_directory_another_writer_took_stops_saving_there(tmp_path: Path) -> None:
    saboteur = RemoveLock(tmp_path, at=3, take=True)
    try:
        with pytest.raises(CheckpointError, match=r"another writer has taken") as info:
            train(tmp_path, saboteur, checkpoint=EVERY_STEP)
        assert saboteur.holder is not None and f"pid {saboteur.holder.pid}" in str(info.value)
        # Steps 1-2 were written before, and 3 was not: nothing written or pruned after.
        assert steps_on_disk(tmp_path) == [1, 2]
        assert [e["global_step"] for e in manifest(tmp_path)] == [1, 2]
    finally:
        if saboteur.holder is not None:
            saboteur.holder.kill()
            saboteur.holder.communicate()


def test_temporary_names_are_unique_per_writer(tmp_path: Path) -> None:
    from asynchat._checkpoint_io import atomic_write

    seen: list[str] = []
    original = os.replace

    def spy(src: Any, dst: Any) -> None:
        seen.append(Path(src).name)
        original(src, dst)

    os.replace = spy  # type: ignore[assignment]
    try:
        atomic_write(tmp_path / "step-000000001.ckpt", b"a")
        atomic_write(tmp_path / "step-000000001.ckpt", b"b")
    finally:
        os.replace = original
    assert len(set(seen)) == 2 and all(str(os.getpid()) in name for name in seen)


def test_a_checkpoint_is_hashed_as_it_is_streamed_to_disk(tmp_path: Path) -> None:
    # torch.save now writes into the file through a hashing writer (built in memory first,
    # the bytes were copied there with the GIL held: the event loop paused 284 ms while a
    # 512 MiB weight was saved): the manifest's size and SHA-256 are the file's on disk.
    train(tmp_path, num_steps=4)
    for entry in manifest(tmp_path):
        data = (tmp_path / entry["file"]).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    checkpoint, _ = load_checkpoint(tmp_path / "step-000000004.ckpt")
    assert checkpoint["progress"]["global_step"] == 4


WRITE_PAST_A_LIMIT = """
import resource, signal, sys
import anyio, torch
from torch import nn
from asynchat import Trainer
from asynchat.callbacks import Checkpoint

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # (else the write past the limit kills us)
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
data = [(torch.randn(4, 64), torch.randn(4, 64)) for _ in range(2)]
trainer = Trainer(nn.Linear(64, 64), data, lambda m: torch.optim.Adam(m.parameters()),
                  loss_fn=nn.MSELoss(), num_steps=2,
                  callbacks=[Checkpoint(sys.argv[1], every_n_steps=1)])
anyio.run(trainer.fit)
"""


def test_a_checkpoint_that_cannot_be_written_says_what_the_disk_said(tmp_path: Path) -> None:
    # A write past the process's file-size limit fails with EFBIG as one on a full disk
    # fails with ENOSPC. Streamed by torch.save, the failure reached it inside its writer,
    # which raised "RuntimeError: ... unexpected pos" instead: the disk's own words are kept.
    save_dir = tmp_path / "checkpoints"
    run = subprocess.run(
        [sys.executable, "-c", WRITE_PAST_A_LIMIT, str(save_dir)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 1, run.stderr[-2000:]
    assert re.search(
        r"CheckpointError: could not write checkpoint .*step-000000001\.ckpt: "
        r"\[Errno 27\] File too large", run.stderr
    ), run.stderr[-2000:]  # fmt: skip
    assert sorted(p.name for p in save_dir.iterdir()) == [LOCK]  # no temporary file left


def test_checkpoints_are_written_when_no_writer_thread_can_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Python 3.12 refuses new threads once the interpreter shuts down: then a loop cut short
    # by a second Ctrl-C saves its last checkpoint (failed there: no file, no error shown).
    import threading

    start = threading.Thread.start
    refused: list[str] = []

    def start_unless_writer(thread: threading.Thread) -> None:
        if thread.name == "asynchat-checkpoint-writer":
            refused.append(threading.current_thread().name)
            raise RuntimeError("can't create new thread at interpreter shutdown")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", start_unless_writer)
    state = train(tmp_path, num_steps=6)
    assert state.global_step == 6 and steps_on_disk(tmp_path) == [2, 4, 6]
    assert [e["global_step"] for e in manifest(tmp_path)] == [2, 4, 6]
    checkpoint, _ = load_checkpoint(tmp_path / "step-000000006.ckpt")
    assert checkpoint["progress"]["global_step"] == 6
    assert len(refused) == 3  # each write was asked of a thread, and done where it was asked


@pytest.mark.anyio
async def test_a_run_further_back_than_the_directory_is_refused_before_training(
    tmp_path: Path,
) -> None:
    """A fresh run into a used directory ranked its checkpoints below the other run's and
    pruned each as it was written (a 2-epoch run into a 3-epoch run's directory kept none of
    its own); it is refused before training, and the directory is left as it was."""

    def run(epochs: int, **kwargs: Any) -> Any:
        return make_trainer(
            Checkpoint(tmp_path, every_n_epochs=1, keep_last=2), num_epochs=epochs, **kwargs
        )

    await run(3).fit()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    fresh = run(2)
    with pytest.raises(CheckpointError, match=r"a run further on than this one "
                       r"\(step-000000018\.ckpt, global step 18; this run is at 0\)"):  # fmt: skip
        await fresh.fit()
    assert fresh.state.global_step == 0, "refused before any step"
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    # The lock file names its holder and since when (to the second): the refused run held it.
    assert after.keys() == before.keys()
    assert all(after[name] == before[name] for name in before if name != LOCK)
    resumed = run(4, resume_from=tmp_path)
    assert (await resumed.fit()).global_step == 24, "continuing it is fine"


def saved_weights(path: Path) -> dict[str, torch.Tensor]:
    checkpoint, _ = load_checkpoint(path)
    return checkpoint["model"]  # type: ignore[no-any-return]


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.anyio
async def test_overwrite_starts_a_used_directory_over(tmp_path: Path) -> None:
    """A fresh run given overwrite=True removes the other run's checkpoints, where it would
    be refused, and keeps its own (step 12 of each run has the same name: the file left is
    the fresh run's)."""

    def run(epochs: int, seed: int, **kwargs: Any) -> Any:
        return make_trainer(
            Checkpoint(tmp_path, every_n_epochs=1, keep_last=2, **kwargs),
            model=make_model(seed), num_epochs=epochs,
        )  # fmt: skip

    await run(3, seed=1).fit()
    assert steps_on_disk(tmp_path) == [12, 18]
    old_12 = saved_weights(tmp_path / "step-000000012.ckpt")
    fresh = run(2, seed=2, overwrite=True)
    assert (await fresh.fit()).global_step == 12
    assert steps_on_disk(tmp_path) == [6, 12]
    assert [e["global_step"] for e in manifest(tmp_path)] == [6, 12]
    new_12 = saved_weights(tmp_path / "step-000000012.ckpt")
    assert same_weights(new_12, {k: v.detach() for k, v in fresh.model.state_dict().items()})
    assert not same_weights(new_12, old_12)
    assert find_checkpoint(tmp_path) == tmp_path / "step-000000012.ckpt"


@pytest.mark.anyio
async def test_overwrite_after_an_older_file_removes_only_what_came_after_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def checkpoint(**kwargs: Any) -> Checkpoint:
        return Checkpoint(tmp_path, every_n_epochs=1, keep_last=None, **kwargs)

    await make_trainer(checkpoint(), num_epochs=3).fit()
    assert steps_on_disk(tmp_path) == [6, 12, 18]
    first = saved_weights(tmp_path / "step-000000006.ckpt")
    again = make_trainer(
        checkpoint(overwrite=True), num_epochs=2, resume_from=tmp_path / "step-000000006.ckpt"
    )
    with caplog.at_level("INFO", logger="asynchat.checkpoint"):
        assert (await again.fit()).global_step == 12
    assert steps_on_disk(tmp_path) == [6, 12]
    assert same_weights(saved_weights(tmp_path / "step-000000006.ckpt"), first)
    assert "removed 2 checkpoint(s) of a run further on than this one " \
        "(step-000000012.ckpt to step-000000018.ckpt)" in caplog.text  # fmt: skip


@pytest.mark.anyio
async def test_overwrite_never_removes_the_checkpoints_of_a_live_run(tmp_path: Path) -> None:
    """Regression: the examples started over with shutil.rmtree(save_dir), which removed
    the checkpoints of a run still writing there (a second `digits.py` on the same --out)."""
    await make_trainer(Checkpoint(tmp_path, every_n_steps=2), num_steps=4).fit()
    gate = Gate(at=4)
    live = make_trainer(
        gate, Checkpoint(tmp_path, every_n_steps=2), num_steps=6, resume_from=tmp_path
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(live.fit)
        await gate.reached.wait()
        fresh = make_trainer(Checkpoint(tmp_path, overwrite=True), num_steps=2)
        with pytest.raises(CheckpointError, match=r"in use by another live Checkpoint writer"):
            await fresh.fit()
        assert steps_on_disk(tmp_path) == [2, 4]
        gate.release.set()
    assert steps_on_disk(tmp_path) == [2, 4, 6]


class BrokenAt(torch.nn.Module):
    """The test model, changed by a bug that raises in its ``at``-th forward."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.inner, self.at, self.calls = make_model(), at, 0

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.at:
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (16x8 and 16x3)")
        return self.inner(inputs)  # type: ignore[no-any-return]


@pytest.mark.anyio
@pytest.mark.parametrize("broken_at", [1, 3])
async def test_a_run_that_starts_over_and_fails_before_its_first_save_loses_nothing(
    tmp_path: Path, broken_at: int
) -> None:
    """Regression: overwrite=True removed the directory's checkpoints at the loop's begin,
    so the demo run again after a change that broke its model (an error at the first step)
    left no checkpoint to resume from, and emptied its logs (given overwrite=True too).
    The checkpoints now give way at the new run's first save, the logs at its first write:
    failed at its first step, the run changed no file; at its third, only the log, which
    holds the two steps it ran (to look into), no longer the old run's: logged, the run
    replaced it."""
    checkpoints, log = tmp_path / "checkpoints", tmp_path / "log.jsonl"

    def run(**kwargs: Any) -> Trainer:
        return make_trainer(
            JSONLinesLogger(log, every_n_steps=1, overwrite=True),
            TensorBoardLogger(tmp_path / "tb", every_n_steps=1, overwrite=True),
            Checkpoint(checkpoints, every_n_epochs=1, overwrite=True), num_epochs=2, **kwargs,
        )  # fmt: skip

    def files() -> dict[Path, bytes]:  # (but the locks, which say since when they are held)
        paths = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".lock"]
        return {p: p.read_bytes() for p in paths}

    await run().fit()
    before = files()
    broken = run(model=BrokenAt(broken_at))
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        await broken.fit()
    changed = {path for path, content in files().items() if content != before.get(path)}
    if broken_at == 1:
        assert changed == set()
    else:  # (and an event file of its own, which hides the old run's steps in TensorBoard)
        (events,) = (tmp_path / "tb").glob(f"events.out.tfevents.*.{broken.run_id}")
        assert changed == {log, events}
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        assert [(row["run"], row["step"]) for row in rows] == [(broken.run_id, s) for s in (1, 2)]
    assert steps_on_disk(checkpoints) == [6, 12]
    assert find_checkpoint(checkpoints) == checkpoints / "step-000000012.ckpt"


KILLED_AS_IT_REPLACES = """
import os, sys
sys.path.insert(0, sys.argv[2])
import anyio
from conftest import make_trainer
import asynchat.callbacks._checkpoint as checkpoint
from asynchat.callbacks import Checkpoint

removed = checkpoint.remove
def killed(path):  # the process dies as the first of the other run's checkpoints goes
    if path.name == "step-000000012.ckpt":
        os._exit(9)
    removed(path)
checkpoint.remove = killed
anyio.run(make_trainer(Checkpoint(sys.argv[1], every_n_epochs=1, overwrite=True),
                       num_epochs=1).fit)
"""


def test_a_run_killed_as_it_removes_what_it_replaces_resumes_as_itself(tmp_path: Path) -> None:
    """Regression: killed after its first save (step 6) while it removed the checkpoints it
    replaced (overwrite=True), a run left the other run's steps 12 and 18 beside its own:
    the next resume went on from the other run's step 18. The manifest that lists the
    run's first checkpoint now names those it replaces: they are never loaded, and the
    next Checkpoint there removes them."""
    first = make_trainer(Checkpoint(tmp_path, every_n_epochs=1, keep_last=None), num_epochs=3)
    anyio.run(first.fit)
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AS_IT_REPLACES, str(tmp_path), str(Path(__file__).parent)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert killed.returncode == 9, killed.stderr[-2000:]
    assert steps_on_disk(tmp_path) == [6, 12, 18]
    (ours, _), (theirs, _) = (load_checkpoint(tmp_path / f"step-{s:09d}.ckpt") for s in (6, 18))
    assert ours["progress"]["run"] != theirs["progress"]["run"] == first.run_id
    assert find_checkpoint(tmp_path) == tmp_path / "step-000000006.ckpt"
    assert json.loads((tmp_path / "manifest.json").read_text())["replaced"] == [
        "step-000000012.ckpt", "step-000000018.ckpt"
    ]  # fmt: skip
    resumed = make_trainer(Checkpoint(tmp_path, every_n_epochs=1), num_epochs=2,
                           resume_from=tmp_path)  # fmt: skip
    assert anyio.run(resumed.fit).global_step == 12
    assert resumed.run_id == ours["progress"]["run"]
    assert steps_on_disk(tmp_path) == [6, 12]
    assert {e["run"] for e in manifest(tmp_path)} == {resumed.run_id}


def test_the_checkpoints_replaced_are_named_no_more_once_they_are_gone(tmp_path: Path) -> None:
    """Regression: the manifest went on naming the replaced checkpoints after they were
    removed, until the run's next save: a crash between that save's file and its entry
    (one of their names, step 12) left the run's newest checkpoint taken for a replaced
    one, skipped by the resume and removed by the next Checkpoint."""
    anyio.run(make_trainer(Checkpoint(tmp_path, every_n_epochs=1), num_epochs=3).fit)
    started_over = make_trainer(
        Checkpoint(tmp_path, every_n_epochs=1, overwrite=True), num_epochs=1
    )
    anyio.run(started_over.fit)
    assert steps_on_disk(tmp_path) == [6]
    assert "replaced" not in json.loads((tmp_path / "manifest.json").read_text())


@pytest.mark.anyio
@pytest.mark.parametrize("resumed", [False, True], ids=["fresh", "resumed"])
async def test_a_run_stopped_before_its_first_step_saves_nothing(
    tmp_path: Path, resumed: bool
) -> None:
    """Regression: save_on_end saved a run stopped before its first step (a service shut
    down as the job began): an untrained step-0 checkpoint, which with overwrite=True
    replaced the last run's; resumed, it wrote the file it resumed from again."""
    await make_trainer(Checkpoint(tmp_path, every_n_epochs=1), num_epochs=2).fit()
    files = {p.name: (p.stat().st_ino, p.read_bytes()) for p in tmp_path.glob("step-*")}
    stopped = make_trainer(
        Checkpoint(tmp_path, every_n_epochs=1, overwrite=True), num_epochs=3,
        resume_from=tmp_path if resumed else None,
    )  # fmt: skip
    stopped.stop()
    assert (await stopped.fit()).global_step == (12 if resumed else 0)
    assert {p.name: (p.stat().st_ino, p.read_bytes()) for p in tmp_path.glob("step-*")} == files
    assert [e["global_step"] for e in manifest(tmp_path)] == [6, 12]


# -- a machine crash -------------------------------------------------------------------------


# -- one run per directory: another run's checkpoints, by run_id -------------------------


@pytest.mark.anyio
async def test_a_run_resumed_from_elsewhere_never_prunes_another_runs_checkpoints(
    tmp_path: Path,
) -> None:
    """Regression: a run resumed from its own directory at step 36 and saving into one that
    held another run's checkpoints of steps 6-18 pruned them as its own older ones (two of
    three gone at its first save; the third kept as if it were its own). Refused before
    training now, the directory as it was; told apart by the runs' ids."""
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    other = make_trainer(Checkpoint(theirs, every_n_epochs=1), num_epochs=3)
    await other.fit()
    await make_trainer(Checkpoint(mine, every_n_epochs=1), num_epochs=6).fit()
    before = {p.name: p.read_bytes() for p in theirs.iterdir() if p.name != LOCK}
    resumed = make_trainer(Checkpoint(theirs, every_n_epochs=1), num_epochs=8, resume_from=mine)
    with pytest.raises(CheckpointError) as refused:
        await resumed.fit()
    assert str(refused.value).startswith(
        f"Checkpoint(save_dir={str(theirs)!r}): the directory holds checkpoints of another run "
        f"(step-000000018.ckpt, global step 18, run_id {other.run_id}; this run is at 36, "
        f"run_id {resumed.run_id}). Save into another directory, or pass overwrite=True"
    )
    assert resumed.state.global_step == 36, "refused before any step"
    assert {p.name: p.read_bytes() for p in theirs.iterdir() if p.name != LOCK} == before


@pytest.mark.anyio
async def test_overwrite_removes_another_runs_checkpoints(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    await make_trainer(Checkpoint(theirs, every_n_epochs=1), num_epochs=3).fit()
    await make_trainer(Checkpoint(mine, every_n_epochs=1), num_epochs=6).fit()
    resumed = make_trainer(
        Checkpoint(theirs, every_n_epochs=1, overwrite=True), num_epochs=8, resume_from=mine
    )
    with caplog.at_level("INFO", logger="asynchat.checkpoint"):
        assert (await resumed.fit()).global_step == 48
    assert steps_on_disk(theirs) == [42, 48]
    assert {e["run"] for e in manifest(theirs)} == {resumed.run_id}
    assert "removed 3 checkpoint(s) of another run (step-000000006.ckpt to " \
        "step-000000018.ckpt)" in caplog.text  # fmt: skip


@pytest.mark.anyio
async def test_a_run_keeps_its_run_id_through_resumes_wherever_it_saves(tmp_path: Path) -> None:
    """The same run, resumed from a copy of its checkpoint elsewhere, saves on into its own
    directory: its id came with the checkpoint."""
    first = make_trainer(Checkpoint(tmp_path / "a", every_n_epochs=1, keep_last=None))
    await first.fit()
    copy = tmp_path / "copy" / "step-000000018.ckpt"
    copy.parent.mkdir()
    shutil.copy(tmp_path / "a" / copy.name, copy)
    again = make_trainer(
        Checkpoint(tmp_path / "a", every_n_epochs=1, keep_last=None), num_epochs=5,
        resume_from=copy,
    )  # fmt: skip
    assert again.run_id != first.run_id, "a new loop draws its own"
    await again.fit()
    assert again.run_id == first.run_id
    assert steps_on_disk(tmp_path / "a") == [6, 12, 18, 24, 30]
    assert {e["run"] for e in manifest(tmp_path / "a")} == {first.run_id}


@pytest.mark.anyio
async def test_checkpoints_without_a_run_id_are_of_any_run(tmp_path: Path) -> None:
    """Checkpoints written before runs had ids (and files a crash kept out of the manifest)
    belong to no run in particular: a run resumed from elsewhere saves beside them, as
    before."""
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    await make_trainer(Checkpoint(theirs, every_n_epochs=1, keep_last=None)).fit()
    write_manifest(theirs, [{k: v for k, v in e.items() if k != "run"} for e in manifest(theirs)])
    await make_trainer(Checkpoint(mine, every_n_epochs=1), num_epochs=4).fit()
    resumed = make_trainer(
        Checkpoint(theirs, every_n_epochs=1, keep_last=None), num_epochs=5, resume_from=mine
    )
    assert (await resumed.fit()).global_step == 30
    assert steps_on_disk(theirs) == [6, 12, 18, 30]


def test_a_manifest_entry_with_a_bad_run_id_is_ignored(tmp_path: Path) -> None:
    train(tmp_path)
    entries = manifest(tmp_path)
    entries[0]["run"] = ["../x"]
    write_manifest(tmp_path, entries)
    with pytest.warns(CheckpointWarning, match=r"run \['\.\./x'\] of 'step-000000002\.ckpt' "
                      r"is not a run id; ignored"):  # fmt: skip
        assert asynchat._checkpoint_io.read_manifest(tmp_path) == entries[1:]


@pytest.mark.parametrize(
    "metrics", ["0.9", [0.9], {"val/a": "0.9"}, {"val/a": True}, {"val/a": {"deep": 1}}]
)
def test_a_manifest_entry_whose_metrics_are_no_numbers_is_ignored(
    tmp_path: Path, metrics: Any
) -> None:
    """An entry's ``metrics`` (a resumed run with another monitor ranks by them, reading no
    file) must be numbers by name, or the entry is no Checkpoint's."""
    train(tmp_path)
    entries = manifest(tmp_path)
    entries[0]["metrics"] = metrics
    write_manifest(tmp_path, entries)
    with pytest.warns(CheckpointWarning, match=r"metrics .* of 'step-000000002\.ckpt' is not "
                      r"an object of numbers; ignored"):  # fmt: skip
        assert asynchat._checkpoint_io.read_manifest(tmp_path) == entries[1:]


@pytest.mark.parametrize("run", [7, "x" * 32, "../../etc"])
def test_a_checkpoint_whose_run_id_is_no_run_id_is_refused(tmp_path: Path, run: Any) -> None:
    train(tmp_path / "run")
    checkpoint, _ = load_checkpoint(tmp_path / "run" / "step-000000006.ckpt")
    checkpoint["progress"]["run"] = run
    path = tmp_path / "step-000000006.ckpt"  # (no manifest: its own digest checked)
    path.write_bytes(serialize(checkpoint)[0])
    with pytest.raises(CheckpointError, match=re.escape(f"its progress has run={run!r}, which "
                       "is no run id")):  # fmt: skip
        load_checkpoint(path)


def test_the_logs_are_on_disk_before_a_checkpoint_that_covers_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Flushed at each checkpoint, the logs stayed in the operating system's memory: after a
    # machine crash (power, a VM stopped) the checkpoint, synced, survived and the log lines
    # of up to its last 30 s did not, and the run resumed from it logs after its step only.
    synced: list[tuple[Path, str]] = []
    fsync = os.fsync

    def recorded(fd: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        synced.append((path, threading.current_thread().name))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recorded)
    log, tensorboard = tmp_path / "log.jsonl", tmp_path / "tb"
    loggers = JSONLinesLogger(log, every_n_steps=1), TensorBoardLogger(tensorboard, every_n_steps=1)
    train(tmp_path / "ckpt", *loggers)
    (events,) = (p.resolve() for p in tensorboard.glob("events.out.tfevents.*"))
    checkpoints = [i for i, (path, _) in enumerate(synced) if path.name.startswith(".step-")]
    assert len(checkpoints) == 3  # steps 2, 4, 6
    since = 0
    for at in checkpoints:  # each checkpoint's logs were synced before it was written
        assert {log.resolve(), events} <= {path for path, _ in synced[since:at]}
        since = at + 1
    # On the checkpoint's writer thread, not the compute thread (a sync can take long).
    assert {thread for path, thread in synced if path in (log.resolve(), events)} == {
        "asynchat-checkpoint-writer"
    }
    assert len(log.read_text().splitlines()) == 6


def test_a_callbacks_file_that_cannot_be_synced_costs_no_checkpoint(tmp_path: Path) -> None:
    # Gone (removed by hand), or a FIFO (an open for reading would wait for a writer): the
    # checkpoint is written all the same, and only what could not be synced is told of.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    class OwnFiles(Callback):
        def on_checkpoint(self, state: LoopState) -> list[Path]:
            return [tmp_path / "gone.log", fifo]

    with pytest.warns(CheckpointWarning, match=rf"could not sync {fifo} to disk") as caught:
        train(tmp_path / "ckpt", OwnFiles())
    assert steps_on_disk(tmp_path / "ckpt") == [2, 4, 6]
    assert all("gone.log" not in str(w.message) for w in caught)


@pytest.mark.parametrize("error", [errno.EINVAL, errno.EIO], ids=["EINVAL", "EIO"])
def test_a_filesystem_that_cannot_sync_a_directory_costs_no_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: int
) -> None:
    # Regression (EINVAL): some network and FUSE filesystems refuse to sync a directory;
    # every checkpoint there failed, and the run with it. An error of the disk (EIO) still
    # fails the write.
    fsync = os.fsync

    def refused_for_directories(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(error, os.strerror(error))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", refused_for_directories)
    monkeypatch.setattr(asynchat._checkpoint_io, "_UNSYNCABLE", set())  # none told of yet
    directory = tmp_path / "ckpt"
    if error == errno.EIO:
        with pytest.raises(CheckpointError, match=r"could not write checkpoint .*Input/output"):
            train(directory)
        return
    with pytest.warns(CheckpointWarning, match="cannot sync a directory") as warned:
        train(directory)
    assert sum("cannot sync a directory" in str(w.message) for w in warned) == 1  # once
    assert steps_on_disk(directory) == [2, 4, 6]
    assert load_checkpoint(directory)[1].name == "step-000000006.ckpt"


def test_on_checkpoint_may_return_one_path_and_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A str is a path, not the paths of its characters (they were skipped as gone, and the
    # file went unsynced); anything but paths names the callback.
    own = tmp_path / "own.log"
    own.write_text("a line\n")
    synced: list[Path] = []
    fsync = os.fsync

    def recorded(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    class OneFile(Callback):
        def on_checkpoint(self, state: LoopState) -> str:
            return str(own)

    monkeypatch.setattr(os, "fsync", recorded)
    train(tmp_path / "ckpt", OneFile())
    assert synced.count(own.resolve()) == 3  # at steps 2, 4, 6

    class Confused(Callback):
        def on_checkpoint(self, state: LoopState) -> int:
            return 42

    with pytest.raises(TypeError, match=r"Confused.on_checkpoint returned 42: it may return"):
        train(tmp_path / "other", Confused())


# -- logs removed, and two runs on one log ---------------------------------------------------


@pytest.mark.parametrize("what", ["directory", "file", "directory before a line"])
def test_a_log_removed_mid_run_is_begun_anew_and_the_run_logs_on(tmp_path: Path, what: str) -> None:
    """Regression: the logger went on writing into the file that no longer had a name, so
    every later line was lost without a word (after an ``rm -rf`` of the run directory the
    checkpoints came back, the log did not). And once logs were opened at their first
    line: a directory removed before it was never made again, every line lost."""
    log, checkpoints = tmp_path / "logs" / "log.jsonl", tmp_path / "checkpoints"
    before_a_line = what == "directory before a line"
    removed = log.parent if what.startswith("directory") else log
    removal = RemoveFiles(checkpoints, removed, at=2 if before_a_line else 4)
    expected = (
        (CheckpointWarning, "the directory was removed while this run wrote")
        if what != "file"
        else (RuntimeWarning, "the log was removed while this run wrote it")
    )
    logger = JSONLinesLogger(log, every_n_steps=3 if before_a_line else 1)
    with pytest.warns(expected[0], match=expected[1]):
        train(checkpoints, removal, logger, checkpoint=EVERY_STEP)
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    if before_a_line:
        assert steps == [3, 6]
    else:
        assert steps[-2:] == [5, 6] and set(steps) <= {4, 5, 6}, steps


def test_a_tensorboard_log_dir_removed_mid_run_is_made_again_and_logged_on(tmp_path: Path) -> None:
    """Regression: its writer's next write failed (FileNotFoundError), and the run with it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir, checkpoints = tmp_path / "tb", tmp_path / "checkpoints"
    with pytest.warns(CheckpointWarning, match="the directory was removed while this run wrote"):
        removal, logger = (
            RemoveFiles(checkpoints, log_dir, at=4),
            TensorBoardLogger(log_dir, every_n_steps=1),
        )
        state = train(checkpoints, removal, logger, checkpoint=EVERY_STEP)
    assert state.global_step == 6
    events = EventAccumulator(str(log_dir))
    events.Reload()
    steps = [event.step for event in events.Scalars("train/loss")]
    assert steps[-2:] == [5, 6] and set(steps) <= {4, 5, 6}, steps


@pytest.mark.parametrize("kind", ["jsonl", "tensorboard"])
def test_a_second_live_logger_on_one_log_is_refused_and_the_first_logs_on(
    tmp_path: Path, kind: str
) -> None:
    # Two runs given one log wrote their lines into it interleaved, each indistinguishable
    # from the other's, and a resumed one dropped the other's lines after its checkpoint
    # step. The checkpoints of both may share the log's directory. The second run, begun
    # anew with overwrite=True, drops nothing of the live run's.
    where = tmp_path / ("log.jsonl" if kind == "jsonl" else "tb")

    def logger(overwrite: bool = False) -> Callback:
        if kind == "jsonl":
            return JSONLinesLogger(where, every_n_steps=1, overwrite=overwrite)
        return TensorBoardLogger(where, every_n_steps=1, overwrite=overwrite)

    refused: list[BaseException] = []

    class SecondRun(Callback):
        async def on_step_end(self, state: LoopState) -> None:
            if state.global_step == 2:
                second = make_trainer(
                    logger(overwrite=True), Checkpoint(tmp_path / "second"), num_steps=2
                )
                try:
                    await second.fit()
                except InUseError as exc:
                    refused.append(exc)

    state = train(tmp_path, SecondRun(), logger())  # its checkpoints beside the log
    assert state.global_step == 6 and steps_on_disk(tmp_path) == [2, 4, 6]
    (exc,) = refused
    subject = f"path={str(where)!r}" if kind == "jsonl" else f"log_dir={str(where)!r}"
    assert str(exc).startswith(f"{type(logger()).__name__}({subject}) is in use by another ")
    assert f"live logger (pid {os.getpid()} on " in str(exc)
    assert "Give each run a log of its own" in str(exc)
    if kind == "jsonl":  # the first run's lines only, one per step
        steps = [json.loads(line)["step"] for line in where.read_text().splitlines()]
    else:  # (and no purge of them by the second)
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(where))
        events.Reload()
        steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert not list((tmp_path / "second").glob("step-*.ckpt")), "refused before a step"
    train(tmp_path / "after", logger())  # the first run has ended: its log is free
