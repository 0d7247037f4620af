"""examples/digits_lbfgs.py, run as its user runs it: full-batch L-BFGS over 2 processes
reaches scikit-learn's optimum for the same logistic regression."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits_lbfgs.py"


@pytest.mark.slow
def test_lbfgs_over_two_ranks_reaches_scikit_learns_optimum(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--ranks", "2", "--steps", "6", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.search(
        r"objective (\S+) against scikit-learn's (\S+); validation accuracy (\S+) against "
        r"scikit-learn's (\S+) \(2 ranks, 6 L-BFGS steps\)",
        done.stdout,
    )
    assert found, done.stdout
    ours, theirs, accuracy, their_accuracy = (float(found[i]) for i in range(1, 5))
    assert abs(ours - theirs) < 1e-3 * theirs, "the same optimum (scikit-learn stops at tol)"
    assert accuracy > 0.95 and abs(accuracy - their_accuracy) < 0.01
    assert "epoch 6/6 done, step 6" in done.stdout  # one step an epoch: each rank's half
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*.ckpt"))
    assert kept[-2:] == ["step-000000005.ckpt", "step-000000006.ckpt"] and len(kept) <= 3


def test_ranks_that_do_not_divide_the_training_set_are_refused() -> None:
    done = subprocess.run([sys.executable, str(EXAMPLE), "--ranks", "7"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert "argument --ranks: must divide the 1440 training samples, got 7" in done.stderr
