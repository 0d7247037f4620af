"""Sharded checkpoints of the FSDP trainer (torch.distributed.checkpoint), with real gloo
ranks in real processes: stop and resume, resharding to another number of ranks, the files
on disk, damage."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import anyio
import pytest
import rank_jobs
import torch
from conftest import make_loader

from asynchat import Trainer, launch
from asynchat.callbacks import (
    Checkpoint,
    CheckpointError,
    CheckpointWarning,
    find_checkpoint,
    load_weights,
)

pytestmark = pytest.mark.slow


def run(tmp_path: Path, name: str, ranks: int, checkpoints: str, stop_at: int = 0,
        resume: bool = False, batch: int = 0) -> dict[str, torch.Tensor]:  # fmt: skip
    out = tmp_path / f"{name}.pt"
    launch(rank_jobs.fsdp_checkpointed, nprocs=ranks,
           args=(str(out), str(tmp_path / checkpoints), stop_at, resume, batch))  # fmt: skip
    result = torch.load(out, weights_only=True)
    assert result["global_step"] == (stop_at or 16)
    return dict(result["model"])


def test_stop_and_resume_on_the_same_ranks_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    """2 ranks stop at step 7 (inside the first epoch, Adam's state in the shards); 2 new
    ranks resume from the directory to 16: bitwise the weights of a run never stopped."""
    whole = run(tmp_path, "whole", 2, "whole")
    run(tmp_path, "part", 2, "ckpt", stop_at=7)
    directory = tmp_path / "ckpt"
    saved = sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))
    assert saved == ["manifest.json", "step-000000004.dcp", "step-000000007.dcp"]
    files = sorted(p.name for p in (directory / "step-000000007.dcp").iterdir())
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp", "asynchat.pt"]
    manifest = json.loads((directory / "manifest.json").read_text())
    assert [e["file"] for e in manifest["checkpoints"]] == saved[1:]
    assert not any(p.name.endswith(".tmp") for p in directory.iterdir())

    resumed = run(tmp_path, "resumed", 2, "ckpt", resume=True)
    assert resumed.keys() == whole.keys()
    for name, value in whole.items():
        assert torch.equal(resumed[name], value), name
    # Retention prunes whole directories: every 4 steps to 16, keep_last=2, plus the newest.
    left = sorted(p.name for p in directory.iterdir() if p.name.endswith(".dcp"))
    assert left == ["step-000000012.dcp", "step-000000016.dcp"]


def test_a_checkpoint_resumes_on_another_number_of_ranks(tmp_path: Path) -> None:
    """DCP reshards: written by 2 ranks x 16, resumed on 1 x 32 (and the other way round),
    the interrupted epoch going on after the samples already trained on; equal to a run
    never stopped on the resuming side's ranks (rtol 1e-4: the mean over 32 samples is
    reduced in another order)."""
    one = run(tmp_path, "one", 1, "one")
    two = run(tmp_path, "two", 2, "two")
    run(tmp_path, "part-two", 2, "from-two", stop_at=7)
    run(tmp_path, "part-one", 1, "from-one", stop_at=7)
    two_to_one = run(tmp_path, "two-to-one", 1, "from-two", resume=True)
    one_to_two = run(tmp_path, "one-to-two", 2, "from-one", resume=True)
    for name in one:
        torch.testing.assert_close(two_to_one[name], one[name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(one_to_two[name], two[name], rtol=1e-4, atol=1e-6)


def test_load_weights_gathers_a_sharded_checkpoint_and_damage_is_caught(tmp_path: Path) -> None:
    """Outside any job, load_weights puts a 2-rank checkpoint's weights into a plain module;
    a flipped byte in a shard makes the newest invalid and the next older is used."""
    final = run(tmp_path, "final", 2, "ckpt")
    directory = tmp_path / "ckpt"
    module = rank_jobs.ddp_model()
    load_weights(module, directory)  # the newest: step 16, the final weights
    for name, value in module.state_dict().items():
        assert torch.equal(value, final[name]), name
    assert find_checkpoint(directory).name == "step-000000016.dcp"
    # A Trainer of one process resumes from it too: the weights and Adam's state.
    trainer = Trainer(
        rank_jobs.ddp_model(), make_loader(), lambda m: torch.optim.Adam(m.parameters()),
        loss_fn=torch.nn.CrossEntropyLoss(), num_steps=16, resume_from=directory,
    )  # fmt: skip
    assert anyio.run(trainer.fit).global_step == 16
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, final[name]), name
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


def seen(tmp_path: Path, name: str, ranks: int, epoch: int) -> list[float]:
    """The samples (their first feature) the run ``name`` trained on in ``epoch``."""
    return [x for r in range(ranks) for e, x in torch.load(tmp_path / f"{name}.pt.seen{r}")
            if e == epoch]  # fmt: skip


def test_another_global_batch_resumes_after_the_samples_already_trained_on(
    tmp_path: Path,
) -> None:
    """2 ranks x 16 stop 7 steps (224 samples) into the first epoch; 1 rank x 16 resumes
    after 14 of its steps: it trains on exactly the 96 samples the first run had not."""
    run(tmp_path, "before", 2, "ckpt", stop_at=7)
    run(tmp_path, "after", 1, "ckpt", resume=True, batch=16)
    before, after = seen(tmp_path, "before", 2, 0), seen(tmp_path, "after", 1, 0)
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
