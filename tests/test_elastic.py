"""Elastic restarts under torchrun: a rank killed mid-run, the group restarted by the agent,
and the restarted workers resuming from the newest checkpoint by themselves, to the bit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from test_checkpoint import assert_bitwise_equal

from asynchat._launch import free_port
from asynchat.callbacks import resumable

HERE = Path(__file__).resolve().parent
TOTAL, KILL_AT = 16, 10  # 4 steps an epoch: killed inside the third


def torchrun(directory: Path, kill_at: int, restarts: int, kind: str = "ddp") -> dict[str, Any]:
    directory.mkdir()
    out = directory / "result.pt"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
         f"--max-restarts={restarts}", "--monitor-interval=0.2", "--master-addr=127.0.0.1",
         f"--master-port={free_port()}", str(HERE / "elastic_job.py"), str(directory),
         str(out), str(TOTAL), str(kill_at), kind],
        cwd=HERE, capture_output=True, text=True, timeout=240,
        env={**os.environ, "TMPDIR": str(directory)},  # the agent's logs: not left in /tmp
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result: dict[str, Any] = torch.load(out, weights_only=True)
    result["starts"] = len((directory / "starts").read_text().split())
    return result


@pytest.mark.slow
def test_a_killed_rank_is_restarted_and_the_job_resumes_by_itself_bitwise(
    tmp_path: Path,
) -> None:
    straight = torchrun(tmp_path / "straight", kill_at=0, restarts=0)
    elastic = torchrun(tmp_path / "elastic", kill_at=KILL_AT, restarts=1)
    assert (tmp_path / "elastic" / "killed").exists(), "rank 1 did die"
    assert (straight["starts"], elastic["starts"]) == (1, 2)
    assert straight["resumed_from"] == "None"
    # The newest checkpoint written when rank 1 died: step 9 (step 10's save gathers every
    # rank's own state, and rank 1 died at step 10's end before its part was handed over).
    assert Path(elastic["resumed_from"]).name == f"step-{KILL_AT - 1:09d}.ckpt"
    assert elastic["global_step"] == straight["global_step"] == TOTAL
    assert_bitwise_equal(elastic["model"], straight["model"], "model")
    assert_bitwise_equal(elastic["optimizer"], straight["optimizer"], "optimizer")


@pytest.mark.slow
def test_a_sharded_job_is_restarted_and_resumes_from_its_sharded_checkpoints(
    tmp_path: Path,
) -> None:
    """The same with FSDP: both ranks write each checkpoint (step-*.dcp); rank 1 dies with
    rank 0's last save unfinished (it needs rank 1's shards), so the job resumes from the
    newest complete one, at or before step 10, and still ends bitwise where it would have."""
    straight = torchrun(tmp_path / "straight", kill_at=0, restarts=0, kind="fsdp")
    elastic = torchrun(tmp_path / "elastic", kill_at=KILL_AT, restarts=1, kind="fsdp")
    assert (tmp_path / "elastic" / "killed").exists(), "rank 1 did die"
    assert (straight["starts"], elastic["starts"]) == (1, 2)
    resumed = Path(elastic["resumed_from"]).name
    assert resumed.endswith(".dcp") and 1 <= int(resumed[5:14]) <= KILL_AT, resumed
    assert elastic["global_step"] == straight["global_step"] == TOTAL
    assert_bitwise_equal(elastic["model"], straight["model"], "model")


def test_resumable_says_whether_there_is_anything_to_resume(tmp_path: Path) -> None:
    assert resumable(tmp_path / "not-yet") is None
    assert resumable(tmp_path) is None  # exists, no checkpoint in it
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / ".step-000000001.ckpt.abc.tmp").write_bytes(b"partial")
    assert resumable(tmp_path) is None, "a manifest or a temporary file is not a checkpoint"
    (tmp_path / "step-000000003.ckpt").write_bytes(b"x")
    assert resumable(tmp_path) == tmp_path
    (tmp_path / "file").write_text("")
    with pytest.raises(Exception, match="not a directory"):
        resumable(tmp_path / "file")
