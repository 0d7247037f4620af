"""A character-level Transformer language model (nanoGPT-style) trained on the Python
standard library's own source files: a corpus every Python ships.

    python examples/charlm.py [--steps 1000] [--layers 3] [--width 96] [--out DIR] [--resume]
                              [--compile | --cuda-graphs] [--muon]

AdamW with a cosine learning rate after a linear warmup, gradient clipping, the validation
loss every ``--eval-every`` steps (with the best checkpoint kept), bf16 autocast on GPUs,
and a few lines of Python sampled at each validation: generated on the compute thread (a
``def`` hook: the model is the compute thread's), published by an ``async def`` hook that
brings them to the host without blocking the event loop. Ctrl-C stops after the step in
progress with a final checkpoint; ``--resume`` goes on from the newest (without it a run
starts over, removing the last run's checkpoints). At the end the *best* checkpoint (by
validation loss) is loaded and scored on held-out test text, next to the unigram baseline
(the loss of predicting each character from its frequency alone).
``--compile`` compiles the forward and loss with ``torch.compile`` on the compute thread
(``BasicBatchProcessor(compile=True)``; on the CPU too, where this model measured 7% slower
compiled than eager on 2 cores, in a hand-written loop as well). On a GPU,
``--cuda-graphs`` replays each training step as CUDA graphs (``CudaGraphBatchProcessor``: a
capturable, fused AdamW with a tensor learning rate, which the schedule updates in place;
GradClip runs inside the graph). ``--muon`` trains the blocks' weight matrices with Muon
(``torch.optim.Muon``) and the rest (embeddings, norms, the head) with AdamW: two optimizers
on the step's one loss, which the default processor steps in turn, each with its own
schedule and its own gradient clipping.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: idle OpenMP workers sleep instead of spinning, so the engine's
# compute thread keeps the cores (on 2 CPU cores a step costs up to 20% less; see
# benchmarks/RESULTS.md). A value already in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import math
import sysconfig
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from asynchat import (
    AsynchatError,
    BasicBatchProcessor,
    BatchProcessor,
    Callback,
    CudaGraphBatchProcessor,
    LoopState,
    Predictor,
    Trainer,
)
from asynchat.callbacks import (
    Checkpoint,
    GradClip,
    LossMonitor,
    LRSchedule,
    Progress,
    Validation,
    cosine,
    load_weights,
)

# -- the corpus ------------------------------------------------------------------------------


def stdlib_text(max_chars: int = 1_500_000) -> str:
    """The first ``max_chars`` characters of the standard library's top-level modules, in
    file-name order, as ASCII (other characters become ``?``)."""
    parts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append("".join(c if c.isascii() else "?" for c in text))
        total += len(parts[-1])
        if total >= max_chars:
            break
    return "".join(parts)[:max_chars]


@dataclass
class Corpus:
    """The text as token ids, split 90/5/5 into train, validation and test."""

    vocab: list[str]
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor

    @classmethod
    def load(cls, max_chars: int = 1_500_000) -> Corpus:
        text = stdlib_text(max_chars)
        vocab = sorted(set(text))
        index = {c: i for i, c in enumerate(vocab)}
        ids = torch.tensor([index[c] for c in text], dtype=torch.long)
        a, b = int(len(ids) * 0.9), int(len(ids) * 0.95)
        return cls(vocab, ids[:a], ids[a:b], ids[b:])

    def decode(self, ids: list[int]) -> str:
        return "".join(self.vocab[i] for i in ids)

    def unigram_loss(self) -> float:
        """Cross-entropy (nats per character) of the test text under the train frequencies."""
        counts = Counter(self.train.tolist())
        total = sum(counts.values())
        freq = torch.tensor([(counts.get(i, 0) + 1) / (total + len(self.vocab))
                             for i in range(len(self.vocab))])  # fmt: skip
        return float(-freq.log()[self.test].mean())


class Windows(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Non-overlapping windows of ``block`` characters and the same shifted by one."""

    def __init__(self, ids: torch.Tensor, block: int) -> None:
        self.ids, self.block = ids, block

    def __len__(self) -> int:
        return (len(self.ids) - 1) // self.block

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.ids[i * self.block : (i + 1) * self.block + 1]
        return chunk[:-1], chunk[1:]


# -- the model ------------------------------------------------------------------------------


@dataclass
class Config:
    vocab: int
    block: int = 64
    layers: int = 4
    heads: int = 4
    width: int = 128
    dropout: float = 0.1


class Block(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(c.width), nn.LayerNorm(c.width)
        self.qkv, self.proj = nn.Linear(c.width, 3 * c.width), nn.Linear(c.width, c.width)
        self.mlp = nn.Sequential(
            nn.Linear(c.width, 4 * c.width), nn.GELU(), nn.Linear(4 * c.width, c.width)
        )
        self.drop = nn.Dropout(c.dropout)
        self.heads, self.dropout = c.heads, c.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(w, dim=2)
        q, k, v = (z.view(b, t, self.heads, w // self.heads).transpose(1, 2) for z in (q, k, v))
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, t, w)))
        return x + self.drop(self.mlp(self.norm2(x)))


class CharGPT(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.config = c
        self.tokens, self.positions = nn.Embedding(c.vocab, c.width), nn.Embedding(c.block, c.width)
        self.blocks = nn.Sequential(*(Block(c) for _ in range(c.layers)))
        self.norm, self.head = nn.LayerNorm(c.width), nn.Linear(c.width, c.vocab, bias=False)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.drop(self.tokens(ids) + self.positions(positions))
        return self.head(self.norm(self.blocks(x)))  # logits: batch x time x vocab


def next_char_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


# -- sampling at each validation --------------------------------------------------------


class SampleText(Callback):
    """At each validation, samples ``chars`` characters after a prompt (``def``: on the
    compute thread, which owns the model; the event loop stays free meanwhile). One forward
    per character, the ids kept on the device (no host sync per character); its own
    generator leaves training's RNG untouched, so resume stays exact."""

    def __init__(self, corpus: Corpus, every_n_steps: int, chars: int = 160) -> None:
        self.corpus, self.every_n_steps, self.chars = corpus, every_n_steps, chars
        self.pending: torch.Tensor | None = None

    def on_step_end(self, state: LoopState) -> None:
        if state.global_step % self.every_n_steps or not state.loop.is_rank_zero:
            return
        model: Any = state.loop.model
        index = {c: i for i, c in enumerate(self.corpus.vocab)}
        ids = torch.tensor([[index[c] for c in "def "]], device=state.device)
        generator = torch.Generator(state.device).manual_seed(state.global_step)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for _ in range(self.chars):
                    logits = model(ids[:, -model.config.block :])[:, -1].float()
                    nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
                    ids = torch.cat([ids, nxt], dim=1)
        finally:
            model.train(was_training)
        self.pending = ids


class PublishSamples(Callback):
    """The ``async def`` half: brings each new sample to the host without blocking the event
    loop (``await state.loop.to_host``), decodes and prints it; a service would send it to
    its clients here."""

    def __init__(self, sampler: SampleText) -> None:
        self.sampler = sampler
        self.samples: list[str] = []

    async def on_step_end(self, state: LoopState) -> None:
        ids, self.sampler.pending = self.sampler.pending, None
        if ids is None:
            return
        text = self.sampler.corpus.decode((await state.loop.to_host(ids))[0].tolist())
        self.samples.append(text)
        print(f"--- sample at step {state.global_step} ---\n{text}\n---", flush=True)


# -- the run --------------------------------------------------------------------------------


@dataclass
class Run:
    """The run's sizes; the defaults train in about 3 minutes on 2 CPU cores."""

    steps: int = 1000
    batch: int = 32
    block: int = 64
    layers: int = 3
    width: int = 96  # heads of 32
    lr: float = 2e-3
    warmup: int = 100
    eval_every: int = 200
    val_batches: int = 40
    max_chars: int = 1_500_000


def loaders(corpus: Corpus, run: Run) -> tuple[DataLoader[Any], DataLoader[Any], DataLoader[Any]]:
    generator = torch.Generator().manual_seed(0)
    train = DataLoader(
        Windows(corpus.train, run.block), run.batch, shuffle=True, drop_last=True,
        generator=generator,
    )  # fmt: skip
    val_windows = Windows(corpus.val, run.block)
    val_count = min(len(val_windows), run.val_batches * run.batch)
    val = DataLoader(torch.utils.data.Subset(val_windows, range(val_count)), run.batch)
    test = DataLoader(Windows(corpus.test, run.block), run.batch)
    return train, val, test


def step_setup(run: Run, step: str, muon: bool = False) -> tuple[BatchProcessor, Any]:
    """The batch processor and the optimizer factory (with ``muon``, factories by name):
    eager, compiled (``torch.compile``), or replayed as CUDA graphs."""
    amp = "bf16" if torch.cuda.is_available() else None
    if step != "cuda-graphs":
        processor = BasicBatchProcessor(next_char_loss, amp=amp, compile=step == "compile")
        if muon:
            return processor, {
                "muon": lambda m: muon_for(m, run),
                "adamw": lambda m: adamw_for(m, run),
            }
        return processor, lambda m: torch.optim.AdamW(
            m.parameters(), lr=run.lr, betas=(0.9, 0.99), weight_decay=0.1
        )
    processor = CudaGraphBatchProcessor(next_char_loss, amp=amp)  # needs CUDA: says so
    return processor, lambda m: torch.optim.AdamW(
        m.parameters(), lr=torch.tensor(run.lr, device="cuda"), betas=(0.9, 0.99),
        weight_decay=0.1, capturable=True, fused=True,
    )  # fmt: skip


def matrices(model: CharGPT) -> list[nn.Parameter]:
    """The blocks' weight matrices: Muon's (it orthogonalises 2-D updates)."""
    return [p for p in model.blocks.parameters() if p.ndim == 2]


def muon_for(model: CharGPT, run: Run) -> torch.optim.Optimizer:
    # "match_rms_adamw" scales Muon's update to AdamW's size: one learning rate serves both.
    return torch.optim.Muon(
        matrices(model), lr=run.lr, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"
    )


def adamw_for(model: CharGPT, run: Run) -> torch.optim.Optimizer:
    """AdamW for every parameter Muon does not hold."""
    muons = {id(p) for p in matrices(model)}
    rest = [p for p in model.parameters() if id(p) not in muons]
    return torch.optim.AdamW(rest, lr=run.lr, betas=(0.9, 0.99), weight_decay=0.1)


def make_trainer(
    corpus: Corpus, run: Run, out: Path, *, resume: bool = False, progress: bool = True,
    extra: tuple[Callback, ...] = (), step: str = "eager", muon: bool = False,
) -> Trainer:  # fmt: skip
    torch.manual_seed(0)
    train, val, _ = loaders(corpus, run)
    config = Config(len(corpus.vocab), run.block, run.layers, max(1, run.width // 32), run.width)
    checkpoints = out / "checkpoints"
    processor, optimizer = step_setup(run, step, muon)
    schedule = cosine(run.steps - run.warmup, min_lr=run.lr / 10)
    names = list(optimizer) if isinstance(optimizer, dict) else [None]  # (one each)
    return Trainer(
        CharGPT(config),
        train,
        optimizer,
        batch_processor=processor,
        num_steps=run.steps,
        resume_from=checkpoints if resume and checkpoints.is_dir() else None,
        callbacks=[
            *extra,
            GradClip(1.0),
            *(LRSchedule(schedule, warmup_steps=run.warmup, optimizer=name) for name in names),
            LossMonitor(every_n_steps=50),
            Validation(val, every_n_epochs=None, every_n_steps=run.eval_every,
                       loss_fn=next_char_loss),
            sampler := SampleText(corpus, run.eval_every),
            PublishSamples(sampler),
            Checkpoint(checkpoints, every_n_steps=run.eval_every, keep_last=1, monitor="val/loss",
                       overwrite=not resume),  # (a run that starts over replaces the last one's)
            *((Progress(every_n_steps=run.eval_every),) if progress else ()),
        ],
    )  # fmt: skip


async def test_loss(corpus: Corpus, run: Run, checkpoints: Path) -> float:
    """The best checkpoint's loss on the test text (per character)."""
    _, _, test = loaders(corpus, run)
    config = Config(len(corpus.vocab), run.block, run.layers, max(1, run.width // 32), run.width)
    model = CharGPT(config)

    # The best checkpoint's weights, read on a worker thread (file reads: off the event loop).
    await anyio.to_thread.run_sync(lambda: load_weights(model, checkpoints, best=True))
    total: Any = 0.0
    count = 0

    class Sum(Callback):  # on the device: no host sync per batch
        def on_batch_end(self, state: LoopState) -> None:
            nonlocal total, count
            assert state.loss is not None
            total = total + state.loss.detach() * state.batch[0].numel()
            count += state.batch[0].numel()

    await Predictor(model, test, loss_fn=next_char_loss, callbacks=[Sum()]).fit()
    return float(total) / count


async def main_async(
    run: Run, out: Path, resume: bool, step: str = "eager", muon: bool = False
) -> dict[str, float]:
    # Reading the corpus's files took 0.3 s: on a worker thread, not the event loop's.
    corpus = await anyio.to_thread.run_sync(Corpus.load, run.max_chars)
    trainer = make_trainer(corpus, run, out, resume=resume, step=step, muon=muon)
    state = await trainer.fit()
    baseline = corpus.unigram_loss()
    test = await test_loss(corpus, run, out / "checkpoints")
    result = {"val_loss": state.metrics["val/loss"], "test_loss_best": test, "unigram": baseline}
    print(
        f"step {state.global_step}: val loss {result['val_loss']:.3f}, best checkpoint's test "
        f"loss {test:.3f} nats/char ({test / math.log(2):.2f} bits) against the unigram "
        f"baseline {baseline:.3f} ({baseline / math.log(2):.2f} bits)"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=Run.steps)
    parser.add_argument("--layers", type=int, default=Run.layers)
    parser.add_argument("--width", type=int, default=Run.width, help="a multiple of 32")
    parser.add_argument("--eval-every", type=int, default=Run.eval_every)
    parser.add_argument("--out", type=Path, default=Path("runs/charlm"))
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--compile", dest="step", action="store_const", const="compile",
                     help="compile the forward and loss with torch.compile")  # fmt: skip
    how.add_argument("--cuda-graphs", dest="step", action="store_const", const="cuda-graphs",
                     help="replay each training step as CUDA graphs (a GPU)")  # fmt: skip
    parser.add_argument("--muon", action="store_true",
                        help="Muon for the blocks' matrices, AdamW for the rest")  # fmt: skip
    args = parser.parse_args()
    if args.muon and args.step == "cuda-graphs":
        parser.error(
            "argument --muon: not with --cuda-graphs (Muon reads its learning rate on the "
            "host as it steps, so a graph cannot follow its schedule)"
        )
    least_values = {"steps": Run.warmup + 1, "layers": 1, "eval_every": 1, "width": 32}
    for name, least in least_values.items():
        value = getattr(args, name)
        if value < least:
            name = name.replace("_", "-")
            parser.error(f"argument --{name}: must be at least {least}, got {value}")
    if args.width % 32:
        parser.error(f"argument --width: must be a multiple of 32 (heads of 32), got {args.width}")
    run = Run(steps=args.steps, layers=args.layers, width=args.width, eval_every=args.eval_every)
    try:
        anyio.run(main_async, run, args.out, args.resume, args.step or "eager", args.muon)
    except* AsynchatError as refused:  # (its --out in use by another run, say)
        parser.exit(1, f"{parser.prog}: error: {refused.exceptions[0]}\n")


if __name__ == "__main__":
    main()
