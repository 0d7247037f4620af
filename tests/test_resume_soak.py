"""Stopped or cancelled, then resumed, any number of times: the same weights, metrics, rate
and average as a run that was never interrupted, whatever the shipped callbacks do.

A configuration draws gradient accumulation, validation by step or by epoch, early
stopping, a learning-rate schedule by step or epoch, a plateau schedule on the same
optimizer, an EMA, step checkpoints, LossMonitor, MetricUpdater, gradient clipping,
TerminateOnNaN, mixed precision, DataLoader workers and read-ahead; a run is interrupted
once or twice (``stop()`` or a cancellation, from a hook at a random step) and resumed from
its checkpoints. These few fixed seeds are the short version of
``benchmarks/resume_soak.py``, which draws many (it found each defect fixed with it).
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import anyio
import numpy
import pytest
import torch
import torch.distributed as dist
import torchmetrics
from conftest import (
    AskAt,
    AsyncBatches,
    CancelAt,
    StopAt,
    make_data,
    make_loader,
    make_model,
    newest_listed,
    sgd,
    wait_until_listed,
)
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from asynchat import (
    BasicBatchProcessor,
    Callback,
    DistributedDataParallelTrainer,
    FullyShardedDataParallelTrainer,
    LaunchError,
    LoopState,
    Phase,
    RunPhase,
    Trainer,
    launch,
)
from asynchat.callbacks import (
    Checkpoint,
    EarlyStopping,
    ExponentialMovingAverage,
    GradClip,
    LossMonitor,
    LRSchedule,
    MetricUpdater,
    TerminateOnNaN,
    Validation,
    cosine,
    one_cycle,
)

STEPS_PER_EPOCH = 6  # 96 samples in batches of 16


class TwoParts(BasicBatchProcessor):
    """Two models with an optimizer each, ``a`` and ``b``: ``a`` learns the classes, then
    ``b`` learns what ``a`` (as it was before its update) leaves over. Predicts ``a + b``."""

    def step(self, state: LoopState, run_phase: RunPhase) -> None:
        run_phase(Phase.ON_BATCH_BEGIN)
        x, y = state.batch
        a, b = state.model["a"], state.model["b"]
        assert self.loss_fn is not None
        if not state.training:
            with self.autocast():
                state.outputs = a(x) + b(x)
                state.loss = self.loss_fn(state.outputs, y)
            run_phase(Phase.ON_BATCH_END)
            return
        with self.no_sync(state, a), self.autocast():
            first = a(x)
            loss_a = self.loss_fn(first, y)
        self.backward(state, loss_a)
        self.update(state, run_phase, "a")
        with self.no_sync(state, b), self.autocast():
            outputs = first.detach() + b(x)
            loss_b = self.loss_fn(outputs, y)
        self.backward(state, loss_b)
        self.update(state, run_phase, "b")
        state.outputs = outputs.detach()
        state.losses = {"a": loss_a.detach(), "b": loss_b.detach()}
        state.loss = state.losses["b"]
        run_phase(Phase.ON_BATCH_END)


@dataclasses.dataclass(frozen=True)
class Config:
    accumulate: int = 1
    epochs: int = 2
    validate_every: int | None = None  # steps; None: every epoch
    early_stopping: bool = False
    schedule: Literal["step", "epoch"] | None = None
    plateau: bool = False  # a second LRSchedule on the optimizer, on val/loss
    ema: bool = False
    checkpoint_every: int | None = None
    train_metrics_every: int | None = None  # 0: no MetricUpdater
    clip: bool = False
    nan_check: int | None = None
    workers: bool = False
    amp: Literal["bf16"] | None = None
    prefetch: int = 2
    two_parts: bool = False  # two models, two optimizers, two updates a step (TwoParts)
    validate_ema: bool = False  # Validation(use_ema=True), with an EMA
    persistent_workers: bool = False  # with workers: DataLoader(persistent_workers=True)
    streamed: bool = False  # an IterableDataset (no len()): each epoch's end is found by reading
    asynced: bool = False  # streamed: read as an async iterable, on the event loop
    uneven: bool = False  # over several ranks: rank r has 16 * r more samples than rank 0
    control_lag: int = 0  # over several ranks: the trainer's (1: the agreement pipelined)
    augmented: bool = False  # not streamed: noise drawn as samples are read (in workers too)
    held_at: int = 0  # the interrupted run is held by pause() after this global step (0: not)
    cycle: bool = False  # the schedule is one_cycle (momentum and beta1 cycle too), not cosine
    asked_at: int = 0  # every run asks for a save after this global step (the last rank: 0 never)

    @classmethod
    def draw(cls, rng: random.Random) -> Config:
        return cls(
            accumulate=rng.choice([1, 2, 3, 4]),
            epochs=rng.choice([2, 3]),
            validate_every=rng.choice([None, None, 2, 5]),
            early_stopping=rng.random() < 0.5,
            schedule=rng.choice([None, "step", "epoch"]),
            plateau=rng.random() < 0.3,
            ema=rng.random() < 0.5,
            checkpoint_every=rng.choice([None, 2, 5]),
            train_metrics_every=rng.choice([0, None, 4]),
            clip=rng.random() < 0.3,
            nan_check=rng.choice([None, 3]),
            workers=rng.random() < 0.15,
            amp=rng.choice([None, None, "bf16"]),
            prefetch=rng.choice([0, 2]),
            augmented=rng.random() < 0.3,  # (drawn last: the seeds' other draws stay)
        )


# "stop": stop() at the end of that global step; "cancel": a cancellation there; "epoch-begin":
# stop() in the first on_epoch_begin after it (before that epoch's first step).
Interruption = tuple[Literal["stop", "cancel", "epoch-begin"], int]


def draw_interruptions(config: Config, rng: random.Random) -> list[Interruption]:
    steps = sorted(rng.sample(range(1, STEPS_PER_EPOCH * config.epochs), rng.choice([1, 2])))
    return [(rng.choice(["stop", "stop", "cancel", "epoch-begin"]), step) for step in steps]


class StopAtNextEpoch(Callback):
    """Calls ``stop()`` in the first ``on_epoch_begin`` after global step ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_epoch_begin(self, state: LoopState) -> None:
        if state.global_step >= self.at:
            state.loop.stop("before the epoch's first step")


class HoldAt(Callback):
    """``pause()`` after global step ``at``, ``resume()`` from another thread ``seconds``
    later: a hold at a step boundary changes nothing of the run."""

    def __init__(self, at: int, seconds: float = 0.1) -> None:
        self.at = at
        self.seconds = seconds

    def on_step_end(self, state: LoopState) -> None:
        if state.global_step == self.at:
            state.loop.pause()
            threading.Timer(self.seconds, state.loop.resume).start()


def holding(config: Config) -> list[Callback]:
    """The interrupted run's hold, if ``config`` has one (in every part of the run: it comes
    in the part that runs that step)."""
    return [HoldAt(config.held_at)] if config.held_at else []


def draw_hold(config: Config, rng: random.Random) -> Config:
    """``config`` with the interrupted run held after a step drawn from ``rng``."""
    return dataclasses.replace(config, held_at=rng.randrange(1, STEPS_PER_EPOCH * config.epochs))


def interruption(how: str, step: int, cancel: CancelAt) -> Callback:
    """The callback that interrupts a run as ``how`` says, at ``step``."""
    return {"stop": StopAt(step), "epoch-begin": StopAtNextEpoch(step)}.get(how, cancel)


def trainer(
    config: Config,
    directory: Path,
    *extra: Callback,
    resume: bool | Path = False,
    kind: type[Trainer] = Trainer,
    **options: Any,
) -> Trainer:
    """``config``'s trainer (``kind``: e.g. a DistributedDataParallelTrainer, with its
    ``options``), checkpointing into ``directory``; resumed from it, or from the checkpoint
    file ``resume``."""
    callbacks: list[Callback] = [*extra]
    two = config.two_parts
    if config.train_metrics_every != 0:
        accuracy = torchmetrics.classification.MulticlassAccuracy(3, average="micro")
        callbacks.append(
            MetricUpdater({"accuracy": accuracy}, log_every_n_steps=config.train_metrics_every)
        )
    if config.clip:
        callbacks.append(GradClip(0.5))
    if config.nan_check:
        callbacks.append(TerminateOnNaN(check_every_n_steps=config.nan_check))
    by_steps = config.validate_every is not None
    callbacks.append(
        Validation(
            make_loader(48, 16, seed=1), every_n_steps=config.validate_every,
            every_n_epochs=None if by_steps else 1, use_ema=config.validate_ema,
            **(
                {"batch_processor": TwoParts(nn.CrossEntropyLoss(), amp=config.amp)}
                if config.two_parts else {"loss_fn": nn.CrossEntropyLoss()}
            ),
        )
    )  # fmt: skip
    if config.early_stopping:
        callbacks.append(EarlyStopping("val/loss", patience=100))
    if config.schedule is not None:
        callbacks.append(
            LRSchedule(
                one_cycle(0.5, 40) if config.cycle else cosine(40),
                interval=config.schedule,
                optimizer="a" if two else None,
            )
        )
    if config.plateau:
        callbacks.append(
            LRSchedule(
                lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(
                    opt, patience=0, threshold=10.0
                ),
                monitor="val/loss",
                optimizer="b" if two else None,
            )
        )
    if config.ema or config.validate_ema:
        callbacks.append(ExponentialMovingAverage(0.9))
    checkpoint = Checkpoint(directory, every_n_steps=config.checkpoint_every, keep_last=None)
    if config.asked_at:
        callbacks.append(AskAt(checkpoint, config.asked_at))
    callbacks.append(checkpoint)
    callbacks.append(LossMonitor(every_n_steps=3))
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    samples = 96 + 16 * rank if config.uneven else 96
    loader: Any = make_loader(samples, 16, shuffle=True)
    augmented = config.augmented and not config.streamed
    if augmented:
        random.seed(0)  # (torch's is seeded with the model; a resumed run restores all three)
        numpy.random.seed(0)
    data = Augmented(*make_data(samples).tensors) if augmented else make_data(samples)
    if augmented and not config.workers:
        generator = torch.Generator().manual_seed(0)
        loader = DataLoader(data, batch_size=16, shuffle=True, generator=generator)
    if config.streamed:
        loader = DataLoader(Streamed(make_data(samples), rank, world_size), batch_size=16)
        if config.asynced:
            loader = AsyncBatches(loader)
    elif config.workers:
        generator = torch.Generator().manual_seed(0)
        loader = DataLoader(
            data,
            batch_size=16,
            shuffle=True,
            generator=generator,
            num_workers=2,
            persistent_workers=config.persistent_workers,
        )
    processor = TwoParts if two else BasicBatchProcessor
    return kind(
        {"a": make_model(), "b": make_model(seed=1)} if two else make_model(),
        loader,
        {"a": lambda m: sgd(m["a"]), "b": lambda m: adam(m["b"])} if two else sgd,
        batch_processor=processor(
            nn.CrossEntropyLoss(), grad_accumulation_steps=config.accumulate, amp=config.amp
        ),
        num_epochs=config.epochs, callbacks=callbacks, prefetch=config.prefetch,
        resume_from=resume if isinstance(resume, Path) else directory if resume else None,
        **options,
    )  # fmt: skip


class Augmented(TensorDataset):
    """Samples with noise from torch's, Python's and NumPy's global generators, drawn as each
    is read (a random augmentation, in the main process or in DataLoader workers, reproduced
    by a resumed run)."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        x, y = super().__getitem__(index)
        noise = torch.rand(x.shape) + random.random() + float(numpy.random.rand())
        return x + 0.1 * noise, y


class Streamed(IterableDataset[tuple[torch.Tensor, ...]]):
    """A rank's share of ``data`` (every ``world_size``-th sample), read in an order drawn
    from torch's RNG at each epoch, as many streaming datasets do: no ``len()``, no sampler
    (the trainer leaves it as given)."""

    def __init__(self, data: TensorDataset, rank: int, world_size: int) -> None:
        self.data, self.rank, self.world_size = data, rank, world_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        order = torch.randperm(len(self.data))[self.rank :: self.world_size]
        return (self.data[int(i)] for i in order)


def adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=0.01)


def interrupted_run(config: Config, directory: Path, interruptions: list[Interruption]) -> Trainer:
    """Run with each interruption in turn (each run resumed from the last), then to the end."""
    for i, (how, step) in enumerate(interruptions):
        cancel = CancelAt(step)
        run = trainer(
            config, directory, interruption(how, step, cancel), *holding(config), resume=i > 0
        )

        async def fit(run: Trainer = run, cancel: CancelAt = cancel) -> None:
            with anyio.CancelScope() as cancel.scope:
                await run.fit()

        anyio.run(fit)
    last = trainer(config, directory, *holding(config), resume=True)
    anyio.run(last.fit)
    return last


def outcome(run: Trainer) -> dict[str, Any]:
    ema = [c for c in run.callbacks if isinstance(c, ExponentialMovingAverage)]
    return {
        "weights": [t.clone() for t in run.model.state_dict().values()],
        "metrics": dict(run.state.metrics),
        "lr": {name: opt.param_groups[0]["lr"] for name, opt in run.state.optimizers.items()},
        "ema": [t.clone() for t in ema[0].shadow] if ema else [],
        "global_step": run.state.global_step,
    }


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """What differs between two outcomes, by name (empty: the same, bitwise)."""
    differ = []
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, list):
            same = len(x) == len(y) and all(torch.equal(p, q) for p, q in zip(x, y, strict=True))
        else:
            same = x == y
        if not same:
            differ.append(
                key if key != "metrics" else f"metrics {sorted(set(x.items()) ^ set(y.items()))}"
            )
    return differ


def trial(
    config: Config,
    interruptions: list[Interruption],
    directory: Path,
    crash: random.Random | None = None,
) -> list[str]:
    """Run ``config`` straight and interrupted; return what differs. With ``crash``, also
    resume from one of the straight run's checkpoints, drawn with it (the one it asked for,
    if it asked: what its future names), as a run that crashed right after saving it
    would."""
    straight = trainer(config, directory / "straight")
    anyio.run(straight.fit)
    expected = outcome(straight)
    resumed = interrupted_run(config, directory / "interrupted", interruptions)
    differ = differences(outcome(resumed), expected)
    if crash is not None:
        saved = crash.choice(sorted((directory / "straight").glob("*.ckpt")))
        [ask] = [c for c in straight.callbacks if isinstance(c, AskAt)] or [None]
        if ask is not None:
            [path] = ask.served()
            saved = path or saved  # (None: not rank 0's)
        after_crash = resumed_from(config, saved, directory / "after-crash")
        differ += [f"from {saved.name}: {d}" for d in differences(after_crash, expected)]
    return differ


def resumed_from(config: Config, checkpoint: Path, directory: Path) -> dict[str, Any]:
    """The outcome of ``config``'s run resumed from ``checkpoint``, saving into ``directory``."""
    run = trainer(config, directory, resume=checkpoint)
    anyio.run(run.fit)
    return outcome(run)


@pytest.mark.parametrize("seed", [3, 4, 11, 25])
def test_an_interrupted_run_resumes_to_the_uninterrupted_one(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    config = draw_hold(Config.draw(rng), random.Random(f"{seed}-hold"))
    config = dataclasses.replace(config, cycle=seed % 2 == 1)
    interruptions = draw_interruptions(config, rng)
    assert trial(config, interruptions, tmp_path) == [], (config, interruptions)


@pytest.mark.parametrize("seed", [5, 8])
def test_two_models_with_two_optimizers_resume_alike(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    config = dataclasses.replace(Config.draw(rng), two_parts=True)
    interruptions = draw_interruptions(config, rng)
    assert trial(config, interruptions, tmp_path) == [], (config, interruptions)


@pytest.mark.parametrize("seed", [6, 9])
def test_an_interrupted_run_over_streamed_data_resumes_to_the_uninterrupted_one(
    tmp_path: Path, seed: int
) -> None:
    # No len(): the resumed epoch reads and drops the batches already trained on, and each
    # epoch's last step is found by reading one batch ahead.
    rng = random.Random(seed)
    config = dataclasses.replace(Config.draw(rng), streamed=True, workers=False)
    interruptions = draw_interruptions(config, rng)
    assert trial(config, interruptions, tmp_path) == [], (config, interruptions)


@pytest.mark.parametrize("seed", [6, 9])
def test_an_interrupted_run_over_async_data_resumes_to_the_uninterrupted_one(
    tmp_path: Path, seed: int
) -> None:
    # The streamed batches as an async iterable, read on the event loop: a resumed epoch
    # reads and drops the batches already trained on there.
    rng = random.Random(seed)
    config = Config.draw(rng)
    config = dataclasses.replace(config, streamed=True, asynced=True, workers=False)
    interruptions = draw_interruptions(config, rng)
    assert trial(config, interruptions, tmp_path) == [], (config, interruptions)


@pytest.mark.parametrize(("accumulate", "asked_at"), [(3, 2), (4, 5)])
def test_a_run_resumed_from_the_save_it_asked_for_ends_as_the_uninterrupted_one(
    tmp_path: Path, accumulate: int, asked_at: int
) -> None:
    # Asked inside an accumulation window: saved at its end (step 3); or inside the window
    # that an epoch's last step closes (5-6): saved at the epoch's end, with its validation
    # and its schedule's step. Resumed from the file its future names, the run goes on as
    # the one that never stopped (stopped and resumed too, asking at the same step).
    config = Config(
        accumulate=accumulate, schedule="epoch", plateau=True, ema=True, asked_at=asked_at
    )
    assert trial(config, [("stop", 7)], tmp_path, crash=random.Random(0)) == []
    steps = [int(p.stem.split("-")[1]) for p in (tmp_path / "straight").glob("*.ckpt")]
    assert sorted(steps) == [3 if asked_at == 2 else 6, 12]  # the asked save, the last


@pytest.mark.parametrize("two_parts", [False, True])
def test_a_run_resumed_from_any_of_its_checkpoints_ends_as_the_uninterrupted_one(
    tmp_path: Path, two_parts: bool
) -> None:
    # A crash loses what came after the last checkpoint; whichever that is (inside an epoch,
    # at its end, between validations, with an accumulation window just closed), the run
    # resumed from it must go on exactly as the one that never stopped.
    config = Config(
        accumulate=2, validate_every=5, schedule="step", plateau=True, ema=True,
        checkpoint_every=2, train_metrics_every=4, clip=True, two_parts=two_parts,
    )  # fmt: skip
    straight = trainer(config, tmp_path / "straight")
    anyio.run(straight.fit)
    expected = outcome(straight)
    saved = sorted((tmp_path / "straight").glob("*.ckpt"))
    assert len(saved) == 6  # global steps 2, 4, ..., 12
    for checkpoint in saved:
        after_crash = resumed_from(config, checkpoint, tmp_path / checkpoint.stem)
        assert differences(after_crash, expected) == [], checkpoint.name


def test_a_run_resumed_at_an_epochs_end_steps_its_schedule_without_torchs_warning(
    tmp_path: Path,
) -> None:
    # Cancelled at an epoch's last step, the run saved before on_epoch_end; resumed, its
    # first act was the epoch's scheduler step, before this process had stepped the
    # optimizer, and torch warned "Detected call of lr_scheduler.step() before
    # optimizer.step()" (an error under this suite's filterwarnings).
    config = Config(schedule="epoch")
    resumed = interrupted_run(config, tmp_path / "interrupted", [("cancel", STEPS_PER_EPOCH)])
    straight = trainer(config, tmp_path / "straight")
    anyio.run(straight.fit)
    assert differences(outcome(resumed), outcome(straight)) == []


# -- over several ranks (gloo, real processes) ---------------------------------------------

KINDS: dict[str, type[Trainer]] = {
    "ddp": DistributedDataParallelTrainer,
    "fsdp": FullyShardedDataParallelTrainer,
}


async def rank_run(
    rank: int, world_size: int, config: Config, directory: str, interruptions: list[Interruption],
    out: str, kind: str, resume: bool = False,
) -> None:  # fmt: skip
    """One rank of an interrupted (or, without interruptions, straight; with ``resume``,
    resumed) distributed run; a cancellation cancels rank 0 alone (the others end with it).
    Saves its outcome, and the warnings it heard, for the launcher to compare."""

    def run(*extra: Callback, resume: bool) -> Trainer:
        return trainer(
            config, Path(directory), *extra, resume=resume, kind=KINDS[kind], device="cpu",
            control_lag=config.control_lag,
        )  # fmt: skip

    with warnings.catch_warnings(record=True) as heard:
        warnings.simplefilter("always")
        if config.uneven:  # said by design: every rank runs as many steps as the shortest
            # (with a stop at its end: "ended with another rank's")
            warnings.filterwarnings(
                "ignore", "(?s).*((different numbers of|had more) batches|with another rank's)"
            )
        # Held on rank 0 alone (one rank paused holds them all); not the straight run.
        held = holding(config) if rank == 0 and interruptions else []
        for i, (how, step) in enumerate(interruptions):
            cancel = CancelAt(step)
            extra = [interruption(how, step, cancel)] if how == "stop" or rank == 0 else []
            extra += held
            with anyio.CancelScope() as cancel.scope:
                await run(*extra, resume=i > 0).fit()
        last = run(*held, resume=resume or bool(interruptions))
        await last.fit()
    result = gathered(outcome(last))
    result["warnings"] = [(w.category, str(w.message)) for w in heard]
    torch.save(result, Path(out, f"rank{rank}.pt"))


def gathered(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` with FSDP's sharded tensors gathered (a collective: every rank calls it)."""
    from rank_jobs import whole

    return {
        **result,
        "weights": [whole(t) for t in result["weights"]],
        "ema": [whole(t) for t in result["ema"]],
    }


class KillAt(Callback):
    """SIGKILLs its process ``delay`` s after global step ``step``; with ``written``, first
    waits until that directory's manifest lists the step before (or a later one)."""

    def __init__(self, step: int, delay: float = 0.0, written: Path | None = None) -> None:
        self.step, self.delay, self.written = step, delay, written

    def on_step_end(self, state: LoopState) -> None:
        if state.global_step != self.step:
            return
        if self.written is not None:
            wait_until_listed(self.written, self.step - 1)
        time.sleep(self.delay)
        os.kill(os.getpid(), signal.SIGKILL)


async def rank_killed(
    rank: int, world_size: int, config: Config, directory: str, kind: str, victim: int,
    kill: KillAt,
) -> None:  # fmt: skip
    """One rank of a run whose rank ``victim`` is SIGKILLed by ``kill``."""
    extra = [kill] if rank == victim else []
    await trainer(
        config, Path(directory), *extra, kind=KINDS[kind], device="cpu",
        control_lag=config.control_lag,
    ).fit()  # fmt: skip


def distributed_kill_trial(
    config: Config, directory: Path, ranks: int, kind: str, victim: int, kill: KillAt
) -> tuple[list[str], int | None]:
    """A distributed run whose rank ``victim`` is SIGKILLed (the launcher ends the others),
    resumed from its directory and compared, rank by rank, with the straight run; and the
    newest checkpoint listed when it was killed (None: none, and the resume was refused)."""
    checkpoints = directory / "killed-ckpt"
    with pytest.raises(LaunchError, match=rf"(?s)rank {victim} failed:.*killed by SIGKILL"):
        launch(rank_killed, nprocs=ranks, args=(config, str(checkpoints), kind, victim, kill))
    newest = newest_listed(checkpoints)
    if newest is None:
        with pytest.raises(LaunchError, match="no valid checkpoint"):
            launch(rank_run, nprocs=ranks, args=(config, str(checkpoints), [], "", kind, True))
        return [], None
    return distributed_trial(config, [], directory, ranks, kind, resume=checkpoints), newest


def distributed_trial(
    config: Config,
    interruptions: list[Interruption],
    directory: Path,
    ranks: int,
    kind: str,
    *,
    resume: Path | None = None,
) -> list[str]:
    """:func:`trial` over ``ranks`` processes of a ``kind`` trainer (``"ddp"``, ``"fsdp"``);
    every rank's outcome is compared, each rank's own metrics too (a LossMonitor's mean of
    its losses). The ranks' warnings are warned again here. With ``resume``, the second run
    is not interrupted but resumed from that directory."""
    results = []
    for name, cuts in (("straight", []), ("interrupted", interruptions)):
        (directory / name).mkdir()
        resumed = resume is not None and name == "interrupted"
        checkpoints = str(resume if resumed else directory / f"{name}-ckpt")
        launch(
            rank_run, nprocs=ranks,
            args=(config, checkpoints, cuts, str(directory / name), kind, resumed),
        )  # fmt: skip
        paths = [directory / name / f"rank{r}.pt" for r in range(ranks)]
        results.append([torch.load(path, weights_only=False) for path in paths])
    differ = []
    for rank, (straight, resumed) in enumerate(zip(*results, strict=True)):
        for result in (straight, resumed):
            for category, message in result.pop("warnings"):
                warnings.warn(f"rank {rank}: {message}", category, stacklevel=2)
        differ += [f"rank {rank}: {d}" for d in differences(resumed, straight)]
    return differ


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_ranks_cancelled_at_an_epochs_end_resume_to_the_uninterrupted_run(
    tmp_path: Path, kind: str
) -> None:
    # Under FSDP the EMA's average is sharded: its checkpoint failed to write (".numpy() is
    # not supported for tensor subclasses"), and a sharded resume at an epoch's end made
    # torch warn that the scheduler stepped before the optimizer.
    config = Config(
        accumulate=2, schedule="epoch", ema=True, checkpoint_every=2, train_metrics_every=2,
        two_parts=True,
    )  # fmt: skip
    # 2 ranks of 48 samples each: an epoch is 3 steps, and this is the first epoch's last.
    interruptions: list[Interruption] = [("cancel", STEPS_PER_EPOCH // 2)]
    assert distributed_trial(config, interruptions, tmp_path, 2, kind) == []


@pytest.mark.parametrize(
    ("streamed", "lag"), [(False, 0), (True, 0), (True, 1)], ids=["", "streamed", "streamed-lag-1"]
)
def test_ranks_with_uneven_data_resume_to_the_uninterrupted_run(
    tmp_path: Path, streamed: bool, lag: int
) -> None:
    # Rank 1 has 4 batches an epoch, rank 0 has 3: every rank runs 3, agreed at each epoch's
    # start (known lengths) or before each step (streamed), in the interrupted and resumed
    # runs as in the straight one; with control_lag=1 too (a stop or cancellation then
    # ends the runs a step later).
    config = Config(
        accumulate=2, validate_every=2, schedule="step", checkpoint_every=2,
        train_metrics_every=2, streamed=streamed, uneven=True, control_lag=lag,
    )  # fmt: skip
    interruptions: list[Interruption] = [("stop", 2), ("cancel", 4)]
    config = dataclasses.replace(config, held_at=3)  # a pause, too, between the two
    assert distributed_trial(config, interruptions, tmp_path, 2, "ddp") == []


@pytest.mark.parametrize("victim", [0, 1])
def test_a_rank_killed_after_a_checkpoint_resumes_to_the_uninterrupted_run(
    tmp_path: Path, victim: int
) -> None:
    """The short version of ``benchmarks/kill_soak.py --ranks 2``: one rank of a DDP job
    SIGKILLed after step 4 (with step 3's checkpoint written), the launcher ends the other,
    and the job resumed from the directory ends as the straight one did, on every rank."""
    config = Config(accumulate=1, ema=True, schedule="step", checkpoint_every=1,
                    train_metrics_every=2, validate_every=2)  # fmt: skip
    kill = KillAt(4, written=tmp_path / "killed-ckpt")
    differ, newest = distributed_kill_trial(config, tmp_path, 2, "ddp", victim, kill)
    assert differ == [] and newest in (3, 4)
