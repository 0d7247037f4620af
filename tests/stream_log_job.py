"""Logs JSON lines to a stream: four steps checkpointed every two, then a run resumed from
step 2 to step 6 (a stream is not trimmed: steps 3 and 4 come twice).

python stream_log_job.py PATH CHECKPOINTS   # PATH: /dev/stdout, a FIFO, ...
"""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
from conftest import make_trainer

from asynchat.callbacks import Checkpoint, JSONLinesLogger

if __name__ == "__main__":
    path, checkpoints = sys.argv[1], Path(sys.argv[2])
    first = make_trainer(
        JSONLinesLogger(path, every_n_steps=1), Checkpoint(checkpoints, every_n_steps=2),
        num_steps=4,
    )  # fmt: skip
    anyio.run(first.fit)
    resumed = make_trainer(
        JSONLinesLogger(path, every_n_steps=1), num_steps=6,
        resume_from=checkpoints / "step-000000002.ckpt",
    )  # fmt: skip
    anyio.run(resumed.fit)
