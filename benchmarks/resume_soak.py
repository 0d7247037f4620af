"""Stop or cancel, then resume, many random configurations: the long version of
tests/test_resume_soak.py.

Each trial draws a configuration (gradient accumulation, validation by step or epoch, early
stopping, schedules by step or epoch and a plateau schedule on the same optimizer, an EMA,
step checkpoints, LossMonitor, MetricUpdater, clipping, TerminateOnNaN, bf16, DataLoader
workers (persistent in half the trials with them), read-ahead; in 3 trials of 10, two models
with an optimizer each, updated one after the other in every step; in 2 of 10, validation on
the EMA; in 3 of 10, an IterableDataset without len(); in 3 of 10, random augmentations
drawn as samples are read, in the DataLoader's workers too) and one or two interruptions
(``stop()`` or a cancellation at a random step), runs it straight and interrupted-then-
resumed, and compares weights, metrics, learning rates, EMA and global step bitwise. In
half the trials the interrupted run is also held by ``pause()`` for 0.1 s after a random
step (on rank 0 alone with ``--ranks``), which must change nothing; in half, every run asks
for a save (``request_save()``, on the last rank) after a random step. It also
resumes a run from one of the straight run's checkpoints, drawn at random (the one it asked
for, if it asked: its future names it), as a run that crashed right after saving it
would, and compares that too. The table counts trials,
mismatches and trials that raised a warning, by feature; each is printed with its
configuration (rerun with ``--seed``).

With ``--ranks 2`` each run is a DistributedDataParallelTrainer (``--kind fsdp``: a
FullyShardedDataParallelTrainer) over that many gloo ranks (started with ``launch``; a
cancellation cancels rank 0 alone, and the others end with it), and every rank's outcome is
compared, each rank's own metrics too (a MetricUpdater's and a LossMonitor's states are kept
per rank); in half the trials the ranks' data are uneven (rank 1 has more batches: every
rank runs as many as rank 0, agreed each epoch, or before each step for streamed data), and
in half the trainers agree on stops and pauses pipelined (``control_lag=1``: a stop or a
cancellation ends every rank a step later).

Run: python benchmarks/resume_soak.py [--trials 100] [--seed 0] [--ranks 2 [--kind fsdp]]
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from tempfile import TemporaryDirectory

from _common import machine, table

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))  # the configurations and the comparison the test uses

from test_resume_soak import (  # noqa: E402
    KINDS,
    STEPS_PER_EPOCH,
    Config,
    Interruption,
    distributed_trial,
    draw_hold,
    draw_interruptions,
    trial,
)

FEATURES: dict[str, Callable[[Config, list[Interruption]], bool]] = {
    "every trial": lambda c, i: True,
    "gradient accumulation": lambda c, i: c.accumulate > 1,
    "a cancellation": lambda c, i: any(how == "cancel" for how, _ in i),
    "a pause (0.1 s)": lambda c, i: c.held_at > 0,
    "a save asked for (request_save)": lambda c, i: c.asked_at > 0,
    "a stop before an epoch's first step": lambda c, i: any(how == "epoch-begin" for how, _ in i),
    "two interruptions": lambda c, i: len(i) == 2,
    "validation by step": lambda c, i: c.validate_every is not None,
    "two schedules on one optimizer": lambda c, i: c.plateau and c.schedule is not None,
    "one_cycle (momentum cycles)": lambda c, i: c.cycle and c.schedule is not None,
    "EMA": lambda c, i: c.ema or c.validate_ema,
    "step checkpoints": lambda c, i: c.checkpoint_every is not None,
    "MetricUpdater": lambda c, i: c.train_metrics_every != 0,
    "bf16": lambda c, i: c.amp is not None,
    "DataLoader workers": lambda c, i: c.workers,
    "persistent workers": lambda c, i: c.workers and c.persistent_workers,
    "read inline (prefetch=0)": lambda c, i: c.prefetch == 0,
    "two models, two optimizers": lambda c, i: c.two_parts,
    "validation on the EMA": lambda c, i: c.validate_ema,
    "streamed data (no len())": lambda c, i: c.streamed,
    "async data (streamed, on the event loop)": lambda c, i: c.asynced,
    "augmentation in the dataset": lambda c, i: c.augmented and not (c.streamed or c.workers),
    "augmentation in DataLoader workers": lambda c, i: c.augmented and c.workers,
    "uneven data over the ranks": lambda c, i: c.uneven,
    "control_lag=1": lambda c, i: c.control_lag == 1,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--kind", choices=sorted(KINDS), default="ddp", help="with --ranks")
    args = parser.parse_args()
    print(f"# {machine()}")
    started = time.monotonic()
    counts = {name: [0, 0, 0] for name in FEATURES}
    for n in range(args.trials):
        rng = random.Random(f"{args.seed}-{n}")
        config = Config.draw(rng)
        # Drawn apart, so that a seed draws the same rest as before this option existed.
        extra = random.Random(f"{args.seed}-{n}-extra")
        config = dataclasses.replace(
            config,
            two_parts=extra.random() < 0.3,
            validate_ema=extra.random() < 0.2,
            persistent_workers=extra.random() < 0.5,
        )
        cycle = random.Random(f"{args.seed}-{n}-cycle").random() < 0.4  # (drawn apart, as above)
        config = dataclasses.replace(config, cycle=cycle)
        data = random.Random(f"{args.seed}-{n}-data")  # (drawn apart, as above)
        streamed, uneven = data.random() < 0.3, args.ranks > 1 and data.random() < 0.5
        config = dataclasses.replace(config, streamed=streamed, uneven=uneven)
        asynced = streamed and random.Random(f"{args.seed}-{n}-async").random() < 0.5
        config = dataclasses.replace(config, asynced=asynced)  # (drawn apart, as above)
        if args.ranks > 1:  # (drawn apart, as above)
            lag = random.Random(f"{args.seed}-{n}-lag").random() < 0.5
            config = dataclasses.replace(config, control_lag=int(lag))
        if streamed:
            config = dataclasses.replace(config, workers=False)
        hold = random.Random(f"{args.seed}-{n}-hold")  # (drawn apart, as above)
        if hold.random() < 0.5:
            config = draw_hold(config, hold)
        asked = random.Random(f"{args.seed}-{n}-asked")  # (drawn apart, as above)
        if asked.random() < 0.5:
            steps = STEPS_PER_EPOCH * config.epochs
            config = dataclasses.replace(config, asked_at=asked.randrange(1, steps))
        interruptions = draw_interruptions(config, rng)
        with TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            if args.ranks > 1:
                differ = distributed_trial(config, interruptions, Path(tmp), args.ranks, args.kind)
            else:
                differ = trial(config, interruptions, Path(tmp), crash=extra)
        if differ:
            print(f"MISMATCH trial {n}: {config} {interruptions}: {differ}", flush=True)
        if warned:
            print(f"WARNED trial {n}: {config} {interruptions}: {warned[0].message}", flush=True)
        for name, has in FEATURES.items():
            if has(config, interruptions):
                counts[name][0] += 1
                counts[name][1] += bool(differ)
                counts[name][2] += bool(warned)
        if (n + 1) % 10 == 0:
            print(f"  {n + 1} trials ({time.monotonic() - started:.0f} s)", file=sys.stderr)
    rows = [
        (name, total, total - bad, bad, warned) for name, (total, bad, warned) in counts.items()
    ]
    print(table(["with", "trials", "resumed exactly", "differed", "warned"], rows))


if __name__ == "__main__":
    main()
