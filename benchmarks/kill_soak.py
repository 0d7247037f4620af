"""SIGKILL a job at a random step, resume it in a new process, compare it with a straight run:
the long version of the SIGKILL tests (tests/test_faults.py, and tests/test_callbacks.py for
the logs).

Each trial draws one of tests/test_resume_soak.py's configurations (gradient accumulation,
validation by step or epoch, schedules, an EMA, MetricUpdater, LossMonitor, clipping,
TerminateOnNaN, bf16, DataLoader workers, read-ahead, two models with two optimizers,
validation on the EMA; in 3 trials of 10 an IterableDataset without len()), with a
checkpoint every step and a JSON Lines and a TensorBoard
logger. It runs the job straight in one process; then again in another, SIGKILLed a few
milliseconds after a random step; then resumed from the directory in a third. The resumed
job's weights, metrics, learning rates, EMA and global step must equal the straight run's
bitwise, and so must its logs: every JSON Lines row (but its time) and every TensorBoard
scalar, each once.

With ``--ranks 2`` each trial is a DistributedDataParallelTrainer over that many gloo ranks
(started with ``launch``): one rank, drawn, SIGKILLs itself a few milliseconds after a random
step, the launcher ends the others, and the job is resumed from its directory; every rank's
weights, metrics (each rank's own too: a MetricUpdater's and a LossMonitor's states are
kept per rank), learning rates, EMA and global step must equal the straight run's (no
loggers here); in half the trials the ranks' data are uneven (rank 1 has more batches), and
in half the trainers agree pipelined (``control_lag=1``).

Run: python benchmarks/kill_soak.py [--trials 30] [--seed 0] [--ranks 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from _common import machine, table

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))  # the soak's configurations and helpers

import anyio  # noqa: E402
import test_resume_soak as soak  # noqa: E402
import torch  # noqa: E402

from asynchat import Callback, LoopState  # noqa: E402
from asynchat.callbacks import JSONLinesLogger, TensorBoardLogger  # noqa: E402


class Announce(Callback):
    """Prints each step, for the killer to aim at, and slows the job down a little."""

    def on_step_end(self, state: LoopState) -> None:
        print(f"step {state.global_step}", flush=True)
        time.sleep(0.005)


def job(config: soak.Config, directory: Path, out: Path, resume: bool) -> None:
    """One run of ``config`` in this process (straight, killed, or resumed)."""
    loggers = [
        JSONLinesLogger(directory / "log.jsonl", every_n_steps=2),
        TensorBoardLogger(directory / "tb", every_n_steps=2),
    ]
    run = soak.trainer(config, directory / "checkpoints", Announce(), *loggers, resume=resume)
    anyio.run(run.fit)
    torch.save(soak.outcome(run), out)


def rows(directory: Path) -> tuple[list[dict[str, Any]], set[str]]:
    """The log's lines but their time and run, and the runs they name."""
    lines = [json.loads(line) for line in (directory / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("time", "run")} for r in lines], {
        r["run"] for r in lines
    }


def scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory / "tb"))
    events.Reload()
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}


def trial(config: soak.Config, kill_at: int, delay: float, tmp: Path) -> tuple[list[str], str]:
    """What differs after a kill ``delay`` s after step ``kill_at``, and the newest checkpoint
    the killed job's manifest listed."""
    command = [sys.executable, __file__, "--job", json.dumps(dataclasses.asdict(config))]

    def process(name: str, resume: bool) -> list[str]:
        return [*command, str(tmp / name), str(tmp / f"{name}.pt"), str(int(resume))]

    subprocess.run(process("straight", False), check=True, capture_output=True)
    killed = subprocess.Popen(
        process("killed", False), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert killed.stdout is not None
    for line in killed.stdout:
        if line.strip() == f"step {kill_at}":
            time.sleep(delay)
            killed.kill()
            break
    killed.wait()
    killed.stdout.close()
    listed = tmp / "killed" / "checkpoints" / "manifest.json"
    newest = str(json.loads(listed.read_text())["checkpoints"][-1]["global_step"]) if (
        listed.exists()
    ) else "none"  # fmt: skip
    time.sleep(1.05)  # TensorBoard orders a run's event files by the second they were opened
    resumed = subprocess.run(process("killed", True), capture_output=True, text=True)
    if resumed.returncode:
        if newest == "none" and "CheckpointError" in resumed.stderr:
            return [], "none (the resume was refused, as it must be)"
        return [f"the resume failed: {resumed.stderr[-1000:]}"], newest
    expected = torch.load(tmp / "straight.pt", weights_only=False)
    differ = soak.differences(torch.load(tmp / "killed.pt", weights_only=False), expected)
    (killed_rows, runs), (straight_rows, _) = rows(tmp / "killed"), rows(tmp / "straight")
    if killed_rows != straight_rows:
        differ.append("JSON Lines log")
    if len(runs) != 1:  # (the resumed run is the killed one: its id came with the checkpoint)
        differ.append(f"JSON Lines log of {len(runs)} runs")
    if scalars(tmp / "killed") != scalars(tmp / "straight"):
        differ.append("TensorBoard scalars")
    return differ, newest


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--job", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        config, directory, out, resume = args.job
        job(soak.Config(**json.loads(config)), Path(directory), Path(out), resume == "1")
        return
    rng = random.Random(args.seed)
    results = []
    start = time.perf_counter()
    for n in range(args.trials):
        config = dataclasses.replace(
            soak.Config.draw(rng),
            checkpoint_every=1,
            two_parts=rng.random() < 0.3,
            validate_ema=rng.random() < 0.3,
        )
        cycle = random.Random(f"{args.seed}-{n}-cycle").random() < 0.4  # (drawn apart, too)
        config = dataclasses.replace(config, cycle=cycle)
        data = random.Random(f"{args.seed}-{n}-data")  # drawn apart: a seed's rest is as before
        streamed, uneven = data.random() < 0.3, args.ranks > 1 and data.random() < 0.5
        config = dataclasses.replace(config, streamed=streamed, uneven=uneven)
        if args.ranks > 1:  # (drawn apart, as above)
            lag = random.Random(f"{args.seed}-{n}-lag").random() < 0.5
            config = dataclasses.replace(config, control_lag=int(lag))
        if streamed:
            config = dataclasses.replace(config, workers=False)
        steps = soak.STEPS_PER_EPOCH * config.epochs // args.ranks
        kill_at, delay = rng.randrange(1, steps), rng.random() * 0.01
        with TemporaryDirectory() as tmp:
            if args.ranks > 1:
                victim = rng.randrange(args.ranks)
                differ, listed = soak.distributed_kill_trial(
                    config, Path(tmp), args.ranks, "ddp", victim, soak.KillAt(kill_at, delay)
                )
                newest = f"{listed} (rank {victim} killed)" if listed is not None else "none"
            else:
                differ, newest = trial(config, kill_at, delay, Path(tmp))
        results.append(differ)
        print(f"trial {n}: killed after step {kill_at} (+{delay * 1e3:.1f} ms), newest "
              f"checkpoint listed {newest}: {'differs: ' + ', '.join(differ) if differ else 'same'}"
              + (f"  {config}" if differ else ""), flush=True)  # fmt: skip
    print(f"machine: {machine()}")
    print(table(
        ["trials", "differed", "seconds"],
        [(len(results), sum(bool(d) for d in results), f"{time.perf_counter() - start:.0f}")],
    ))  # fmt: skip


if __name__ == "__main__":
    main()
