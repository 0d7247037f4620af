"""The character-level language model example against a hand-written loop doing the same
work (CPU or one GPU).

Both train ``examples/charlm.py``'s model on the same text with the same AdamW, the same
warmup-then-cosine learning rate, gradients clipped at 1 and the validation loss every
``--eval-every`` steps: the hand-written loop as nanoGPT's would, the engine through
``Trainer`` with ``GradClip``, ``LRSchedule`` and ``Validation``. A third row runs the
example as shipped (also LossMonitor, text sampled and published by an async hook, and a
checkpoint at each validation). Runs are interleaved and repeated; the table shows the
median time per step, its ratio to the hand-written loop measured in the same run, the
final validation loss, and whether the final weights are bitwise equal to the loop's.

Run: python benchmarks/charlm.py [--steps 200] [--rounds 3] [--eval-every 100]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import torch
from _common import load_example, machine, median, table
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

from asynchat import BasicBatchProcessor, Trainer
from asynchat.callbacks import GradClip, LRSchedule, Validation, cosine


def model_for(charlm: ModuleType, corpus: Any, run: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    heads = max(1, run.width // 32)
    return charlm.CharGPT(charlm.Config(len(corpus.vocab), run.block, run.layers, heads, run.width))


def adamw(model: torch.nn.Module, run: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=run.lr, betas=(0.9, 0.99), weight_decay=0.1)


def hand_written(charlm: ModuleType, corpus: Any, run: Any) -> tuple[float, float, Any]:
    model = model_for(charlm, corpus, run)
    train, val, _ = charlm.loaders(corpus, run)
    optimizer = adamw(model, run)
    # Built in LRSchedule's order (the main schedule, then the warmup): each constructor
    # steps the optimizer's rate once, so the order matters to the bit.
    main = CosineAnnealingLR(optimizer, run.steps - run.warmup, eta_min=run.lr / 10)
    warm = LinearLR(optimizer, 0.01, 1.0, run.warmup)
    schedule = SequentialLR(optimizer, [warm, main], milestones=[run.warmup])
    val_loss = float("nan")
    step = 0
    start = time.perf_counter()
    while step < run.steps:
        for inputs, targets in train:
            model.train()
            charlm.next_char_loss(model(inputs), targets).backward()
            torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            step += 1
            if step % run.eval_every == 0:
                model.eval()
                total, count = torch.zeros(()), 0
                with torch.no_grad():
                    for x, y in val:  # once: each pass draws a worker seed from the RNG
                        total += charlm.next_char_loss(model(x), y) * x.shape[0]
                        count += x.shape[0]
                val_loss = float(total) / count
            if step == run.steps:
                break
    return (time.perf_counter() - start) / run.steps, val_loss, model.state_dict()


def engine(charlm: ModuleType, corpus: Any, run: Any, *, full: bool) -> tuple[float, float, Any]:
    if full:
        with tempfile.TemporaryDirectory() as scratch:
            trainer = charlm.make_trainer(corpus, run, Path(scratch), progress=False)
            start = time.perf_counter()
            state = anyio.run(trainer.fit)
            elapsed = time.perf_counter() - start
    else:
        model = model_for(charlm, corpus, run)
        train, val, _ = charlm.loaders(corpus, run)
        trainer = Trainer(
            model, train, lambda m: adamw(m, run),
            batch_processor=BasicBatchProcessor(charlm.next_char_loss),
            num_steps=run.steps,
            callbacks=[
                GradClip(1.0),
                LRSchedule(cosine(run.steps - run.warmup, min_lr=run.lr / 10),
                           warmup_steps=run.warmup),
                Validation(val, every_n_epochs=None, every_n_steps=run.eval_every,
                           loss_fn=charlm.next_char_loss),
            ],
        )  # fmt: skip
        start = time.perf_counter()
        state = anyio.run(trainer.fit)
        elapsed = time.perf_counter() - start
    return elapsed / run.steps, state.metrics["val/loss"], state.model.state_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--eval-every", type=int, default=100)
    args = parser.parse_args()
    charlm = load_example("charlm.py")
    corpus = charlm.Corpus.load()
    run = charlm.Run(steps=args.steps, eval_every=args.eval_every, warmup=min(100, args.steps // 5))
    variants = {
        "hand-written loop": lambda: hand_written(charlm, corpus, run),
        "engine, same work": lambda: engine(charlm, corpus, run, full=False),
        "engine, the example as shipped": lambda: engine(charlm, corpus, run, full=True),
    }
    warm_up = charlm.Run(steps=10, eval_every=5, warmup=2)  # allocator, threads, kernels
    hand_written(charlm, corpus, warm_up)
    engine(charlm, corpus, warm_up, full=False)
    times: dict[str, list[float]] = {name: [] for name in variants}
    results: dict[str, tuple[float, Any]] = {}
    for _ in range(args.rounds):
        for name, run_variant in variants.items():
            seconds, val_loss, weights = run_variant()
            times[name].append(seconds)
            results[name] = (val_loss, weights)
    base = median(times["hand-written loop"])
    loop_weights = results["hand-written loop"][1]
    rows = []
    for name, values in times.items():
        val_loss, weights = results[name]
        equal = all(torch.equal(weights[k], loop_weights[k]) for k in loop_weights)
        rows.append((name, f"{median(values) * 1e3:.1f}", f"{median(values) / base:.3f}x",
                     f"{val_loss:.4f}", "yes" if equal else "no"))  # fmt: skip
    print(machine())
    print(
        f"\ncharacter LM ({run.layers} layers, width {run.width}, batch {run.batch}x{run.block}), "
        f"{run.steps} steps, validation every {run.eval_every}, {args.rounds} rounds; unigram "
        f"baseline {corpus.unigram_loss():.4f} nats/char"
    )
    print(table(["loop", "median ms/step", "ratio", "val loss", "bitwise equal"], rows))


if __name__ == "__main__":
    main()
