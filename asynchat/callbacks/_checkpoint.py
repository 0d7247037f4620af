"""Checkpoint: asynchronous, atomic checkpoints with last-k and best-k retention."""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from asynchat._callback import Callback
from asynchat._checkpoint_io import (
    atomic_write,
    checkpoint_name,
    manifest_entry,
    read_manifest,
    remove_temporaries,
    serialize,
    write_manifest,
)
from asynchat._state import LoopState


class BackgroundWriter:
    """Runs one write at a time on a thread of its own; the owner joins it.

    :meth:`submit` first waits for the write in flight (so at most one is), and raises the
    error of a write that failed: a failed checkpoint is never silently dropped.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, write: Callable[[], None]) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(write,), name=self.name)
        self._thread.start()

    def wait(self) -> None:
        """Wait for the write in flight; raise its error, if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _run(self, write: Callable[[], None]) -> None:
        try:
            write()
        except BaseException as exc:
            self._error = exc


class Checkpoint(Callback):
    """Saves resumable checkpoints into ``save_dir`` without stalling training for the write.

    At each save, the loop's full state (:meth:`asynchat.LoopBase.state_dict`: model,
    optimizer, grad scaler, callbacks, RNG states, position in the data) is copied to host
    memory on the compute thread, the only part that pauses training, and a background
    thread serializes and writes it while training goes on. At most one write is in flight;
    the loop waits for it before ``fit()`` returns or raises, on every way out.

    Files are ``step-<global_step>.ckpt``, written atomically (temporary file, fsync, rename,
    directory fsync); ``manifest.json`` lists them with step, epoch, metric and SHA-256. Resume
    with ``Trainer(..., resume_from=save_dir)``.

    Args:
        save_dir: directory for checkpoints (created if missing).
        every_n_steps: save after every n-th step (at ``on_step_end``).
        every_n_epochs: save after every n-th epoch (at ``on_epoch_end``; put validation
            callbacks before this one so their metrics are in the checkpoint).
        keep_last: keep the newest this many checkpoints.
        monitor: a key of ``state.metrics`` (e.g. ``"val/accuracy"``) to rank checkpoints by.
        mode: ``"min"`` or ``"max"``: which ``monitor`` value is best.
        keep_best: keep the best this many checkpoints by ``monitor`` (besides the newest).
        save_on_end: save when the loop ends normally, by ``stop()`` or by cancellation (not
            after an error), unless the last step was just saved.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike[str],
        *,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        keep_last: int = 3,
        monitor: str | None = None,
        mode: Literal["min", "max"] = "min",
        keep_best: int = 1,
        save_on_end: bool = True,
    ) -> None:
        for name, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        for name, value in (("keep_last", keep_last), ("keep_best", keep_best)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if keep_last == 0 and (monitor is None or keep_best == 0):
            raise ValueError(
                "keep_last=0 keeps no checkpoint unless monitor=... and keep_best >= 1 are given"
            )
        if every_n_steps is None and every_n_epochs is None and not save_on_end:
            raise ValueError(
                "Checkpoint never saves: give every_n_steps, every_n_epochs or save_on_end=True"
            )
        self.save_dir = Path(save_dir)
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.keep_last = keep_last
        self.monitor = monitor
        self.mode = mode
        self.keep_best = keep_best
        self.save_on_end = save_on_end
        self._writer = BackgroundWriter("asynchat-checkpoint-writer")
        self._entries: list[dict[str, Any]] = []
        self._last_saved_step: int | None = None

    @property
    def checkpoints(self) -> list[Path]:
        """The checkpoint files kept so far, oldest first (complete once the loop has ended)."""
        return [self.save_dir / e["file"] for e in self._entries]

    def on_loop_begin(self, state: LoopState) -> None:
        if not state.loop.is_rank_zero:
            return
        self.save_dir.mkdir(parents=True, exist_ok=True)
        remove_temporaries(self.save_dir)  # left by a writer killed mid-write
        self._entries = read_manifest(self.save_dir)  # a resumed run keeps managing them
        self._last_saved_step = None

    def on_step_end(self, state: LoopState) -> None:
        if self.every_n_steps is not None and state.global_step % self.every_n_steps == 0:
            self.save(state)

    def on_epoch_end(self, state: LoopState) -> None:
        if self.every_n_epochs is not None and (state.epoch + 1) % self.every_n_epochs == 0:
            self.save(state)

    def on_loop_end(self, state: LoopState) -> None:
        try:
            if self.save_on_end and state.exception is None:
                self.save(state)
        finally:
            self._writer.wait()  # on every way out: no write outlives the loop

    def save(self, state: LoopState) -> None:
        """Snapshot now (on the compute thread) and write in the background."""
        if self._last_saved_step == state.global_step or not state.loop.is_rank_zero:
            return  # in a distributed run, rank 0 writes (the replicas are identical)
        snapshot = state.loop.state_dict()
        metric = state.metrics.get(self.monitor) if self.monitor is not None else None
        self._writer.submit(functools.partial(self._write, snapshot, metric))
        self._last_saved_step = state.global_step

    def _write(self, snapshot: dict[str, Any], metric: float | None) -> None:
        """On the writer thread: write the file, then the manifest, then prune."""
        data, digest = serialize(snapshot)
        name = checkpoint_name(snapshot["progress"]["global_step"])
        atomic_write(self.save_dir / name, data)
        entries = [e for e in self._entries if e["file"] != name]
        entries.append(manifest_entry(name, digest, len(data), snapshot["progress"], metric))
        kept = self._retain(entries)
        write_manifest(self.save_dir, kept)
        for entry in entries:
            if entry not in kept:
                (self.save_dir / entry["file"]).unlink(missing_ok=True)
        self._entries = kept

    def _retain(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        by_step = sorted(entries, key=lambda e: e["global_step"])
        keep = by_step[-self.keep_last :] if self.keep_last else []
        ranked = [e for e in entries if e["metric"] is not None]
        ranked.sort(key=lambda e: e["metric"], reverse=self.mode == "max")
        keep += ranked[: self.keep_best] if self.monitor is not None else []
        return [e for e in by_step if any(e is k for k in keep)]
