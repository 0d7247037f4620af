"""examples/digits_sharded.py, run as its user runs it: FSDP over 2 processes, then a
Predictor over the sharded model, then a resume on 1 process, then a run started over."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits_sharded.py"


def run(*args: str) -> tuple[float, float, str]:
    """The run's last validation accuracy, its Predictor's accuracy and what it printed."""
    done = subprocess.run([sys.executable, str(EXAMPLE), *args],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.search(r"validation accuracy (\S+); the sharded model's predictions over "
                      r"\d ranks?: (\S+) \(", done.stdout)  # fmt: skip
    assert found, done.stdout
    return float(found[1]), float(found[2]), done.stdout


@pytest.mark.slow
def test_the_sharded_digits_example_trains_predicts_and_resumes_on_fewer_ranks(
    tmp_path: Path,
) -> None:
    validated, predicted, printed = run("--epochs", "4", "--out", str(tmp_path))
    assert validated >= 0.9
    assert predicted == validated  # the same samples, the same weights, over the ranks
    assert "epoch 4/4 done, step 92" in printed  # 23 steps an epoch: each rank's half
    assert sorted((tmp_path / "checkpoints").glob("[!.]*")) == [
        tmp_path / "checkpoints" / name for name in [
        "manifest.json", "step-000000069.dcp", "step-000000092.dcp"]
    ]  # fmt: skip
    # On one process, from the 2-rank checkpoint: 45 steps an epoch, from step 92.
    validated, predicted, printed = run(
        "--ranks", "1", "--epochs", "5", "--out", str(tmp_path), "--resume"
    )
    assert "epoch 5/5 done, step 137" in printed and "epoch 4/5" not in printed
    assert predicted == validated >= 0.9
    # Started over: its sharded checkpoints replace those (before, a shutil.rmtree did, even
    # under a run still writing there).
    run("--ranks", "2", "--epochs", "1", "--out", str(tmp_path))
    assert sorted((tmp_path / "checkpoints").glob("[!.]*")) == [
        tmp_path / "checkpoints" / name for name in ["manifest.json", "step-000000023.dcp"]
    ]
