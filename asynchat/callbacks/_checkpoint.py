"""Checkpoint: asynchronous, atomic checkpoints with last-k and best-k retention."""

from __future__ import annotations

import functools
import logging
import os
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Literal

import torch

from asynchat._callback import Callback
from asynchat._checkpoint_io import (
    EXTRAS,
    MANIFEST,
    RECORDED_METRICS,
    DirectoryLock,
    Manifest,
    checkpoint_files,
    checkpoint_name,
    commit_directory,
    file_digests,
    finite,
    fsync_dir,
    load_manifest,
    manifest_entry,
    measured_metric,
    remove,
    remove_temporaries,
    save_file,
    saved_metrics,
    step_of,
    sync_files,
    write_manifest,
)
from asynchat._checks import flag, metric_name, positive_int, positive_number
from asynchat._checks import path as check_path
from asynchat._errors import CheckpointError, CheckpointWarning
from asynchat._every import UpdateDue, every_n_epochs
from asynchat._ranks import local_parts
from asynchat._state import LoopState
from asynchat._weights import plain_name
from asynchat.callbacks._asked import SaveClock, SaveFuture, SaveOutcome, SaveRequests
from asynchat.callbacks._monitor import measured_at, misspelled, refuse_opposite_mode
from asynchat.callbacks._writer import BackgroundWriter

_LOG = logging.getLogger("asynchat.checkpoint")


def _paths(callback: Callback, returned: object) -> list[Path]:
    """What ``callback.on_checkpoint`` returned, as paths: None, a path, or paths."""
    if returned is None:
        return []
    if isinstance(returned, (str, os.PathLike)):
        return [Path(returned)]
    try:
        return [Path(path) for path in returned]  # type: ignore[attr-defined]
    except TypeError:
        raise TypeError(
            f"{type(callback).__name__}.on_checkpoint returned {returned!r}: it may return "
            "None or the paths of its files (to sync to disk before the checkpoint)"
        ) from None


class Checkpoint(Callback):
    """Saves resumable checkpoints into ``save_dir`` without stalling training for the write.

    At each save, the loop's full state (:meth:`asynchat.LoopBase.state_dict`: model,
    optimizer, grad scaler, callbacks, RNG states, position in the data) is copied to host
    memory on the compute thread, the only part that pauses training, and a background
    thread serializes and writes it while training goes on. At most one write is in flight;
    the loop waits for it before ``fit()`` returns or raises, on every way out. A write that
    fails is raised at the next step (as a :class:`CheckpointError` naming the file).

    Files are ``step-<global_step>.ckpt``, written atomically (temporary file, fsync, rename,
    directory fsync), each carrying a digest of its own content; ``manifest.json`` lists them
    with step, epoch, metric and SHA-256. Resume with ``Trainer(..., resume_from=save_dir)``.

    The directory belongs to one run at a time: a second live writer (another trainer, or
    another process) is refused at ``on_loop_begin``, before training, with an error naming
    the directory (two Checkpoints of one loop there, with a ``ValueError``: one takes
    ``every_n_steps`` and ``every_n_epochs`` together); the lock of a process that died is
    taken over. Each write first checks that the lock is still this run's (its file removed
    by hand is taken again, with a warning; taken by another writer, the write fails with a
    ``CheckpointError``). Only files this callback names (``step-*.ckpt``) are ever deleted,
    never anything a manifest points to elsewhere.

    Its hooks run after every other callback's at each phase (``runs_last``), wherever it
    is listed: a step's checkpoint holds what the step's other hooks did (a Validation's
    metrics, a scheduler's step), so a run resumed from it goes on as the saved one did.

    In a distributed trainer rank 0 writes the file (or, sharded, every rank its shards),
    and each save gathers into it what is every rank's own (random states, metrics, the
    callbacks with ``state_per_rank``: one agreement and one gather on the CPU per save,
    not per step), so each rank resumes from its own.

    A run further back than the directory's newest checkpoint (a fresh run into a used
    directory, or one resumed from an older file) is refused at ``on_loop_begin``, before
    training: its checkpoints would rank as older than the other run's and be pruned. So is
    a run beside another run's checkpoints further back (told apart by the loop's
    ``run_id``, which its checkpoints carry): they would be pruned as its own older ones.
    With ``overwrite=True`` it replaces the other run's, or those further on than itself,
    instead: they give way to its own once its first checkpoint is written (taken out of
    the manifest as it is listed, and named there as replaced until they are removed: a
    crash meanwhile leaves none to load), so a run that starts over and fails before
    its first save (a bug in the changed model) leaves the directory as it found it; and
    only once it holds the directory's lock, so it never removes a live run's files
    (``shutil.rmtree(save_dir)`` before a fresh run did, under a run still writing there).

    Retention: the newest checkpoint is always kept (so nothing is pruned before a newer one
    is safely written), plus the newest ``keep_last`` and the best ``keep_best`` by
    ``monitor``. A metric that is NaN or infinite never ranks as best.

    A run that diverged is never saved: a save whose trainable parameters hold a NaN or an
    infinity, or whose buffers a NaN (a BatchNorm's running statistics), fails with a
    ``CheckpointError`` instead (one pass over the weights and one host sync per save).
    Saved, such checkpoints would prune the good ones: with ``keep_last=3`` a run that
    diverged some saves before the error that ended it kept nothing it could resume from.

    Args:
        save_dir: directory for checkpoints (created if missing).
        every_n_steps: save after every n-th step (at ``on_step_end``); inside a
            gradient-accumulation window, after its last step (its gradients are in no
            checkpoint, so only there does a resumed run go on exactly). Due at an epoch's
            last step, the save waits for that epoch's end (``on_epoch_end``, the same global
            step), so it holds what the epoch's end does too (a Validation's metrics) and a
            run resumed from it never runs that epoch's end a second time.
        every_n_epochs: save after every n-th complete epoch (at ``on_epoch_end``).
        every_n_seconds: save at the first step end once this many seconds of training
            (time held by ``pause()`` left out) have passed since the last save of any kind
            or since the run began, e.g. ``30 * 60``: what a crash can lose stays bounded in
            time however long a step or an epoch takes. Held like an ``every_n_steps``
            save inside an accumulation window and at an epoch's last step. In a
            distributed trainer rank 0's clock decides, and every rank saves at the same
            step, a step or two after it (the ask rides on the boundary agreement each step
            makes anyway: no collective of its own).
        keep_last: keep the newest this many checkpoints (``None``: keep every one).
        monitor: a key of ``state.metrics`` (e.g. ``"val/accuracy"``) to rank checkpoints by.
            Missing at a save, it is an error when another metric with its prefix exists (a
            typo) or when ``keep_last=0`` (nothing else would keep the checkpoint); otherwise
            (not published yet) the checkpoint is kept unranked, with a warning once.
        mode: ``"min"`` or ``"max"``: which ``monitor`` value is best.
        keep_best: keep the best this many checkpoints by ``monitor`` (besides the newest).
        save_on_end: save when the loop ends normally, by ``stop()`` or by cancellation (not
            after an error), unless the last step was just saved or the run neither took a
            step nor ended an epoch (stopped before its first step: what it began from
            holds its state; saved, an untrained step-0 checkpoint replaced the last run's
            with ``overwrite=True``).
        overwrite: a run further back than the directory's newest checkpoint replaces the
            checkpoints further on than itself (a fresh run: every one; one resumed from an
            older file: those after it), and a run beside another run's checkpoints replaces
            those, where it would be refused: they are removed at its first save, once its
            checkpoint is written and listed, not before. Only once it holds the directory:
            a live run's directory is refused all the same. The removal is logged
            (``asynchat.checkpoint``, INFO).
    """

    every_rank = True
    runs_last = True

    def __init__(
        self,
        save_dir: str | os.PathLike[str],
        *,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        every_n_seconds: float | None = None,
        keep_last: int | None = 3,
        monitor: str | None = None,
        mode: Literal["min", "max"] = "min",
        keep_best: int = 1,
        save_on_end: bool = True,
        overwrite: bool = False,
    ) -> None:
        _check_settings(save_dir, every_n_steps, every_n_epochs, every_n_seconds, keep_last,
                        monitor, mode, keep_best, save_on_end, overwrite)  # fmt: skip
        self.save_dir = Path(save_dir)
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.every_n_seconds = every_n_seconds
        self.keep_last = keep_last
        self.monitor = monitor
        self.mode = mode
        self.keep_best = keep_best
        self.save_on_end = save_on_end
        self.overwrite = overwrite
        self._writer = BackgroundWriter("asynchat-checkpoint-writer")
        self._lock = DirectoryLock(self.save_dir)
        self._entries: list[dict[str, Any]] = []  # this run's, and those it keeps
        # overwrite: the checkpoints this run replaces at its first save (and whose they are)
        self._replaced: list[tuple[list[dict[str, Any]], str]] = []
        self._last_saved_step: int | None = None
        self._warned_unranked = self._warned_stale = False  # warned once each
        self._last_ranked = False
        self._sharded_saves = 0
        self._began = False  # on_loop_begin ran (on rank 0: the directory is locked)
        self._began_at = 0  # the global step the run began at (see on_loop_end)
        self._ended_an_epoch = False  # (a resumed run may end the epoch it was saved in)
        self._requests = SaveRequests(f"Checkpoint(save_dir={str(self.save_dir)!r})")
        self._last_save: SaveOutcome | None = None  # whom the newest save serves
        self._asked = UpdateDue()  # a save asked for (request or clock), to a window's end
        self._clock = SaveClock()  # every_n_seconds: training time since the last save
        # Its flag in the ranks' agreements, a distributed trainer's, from on_loop_begin to
        # on_loop_end (which runs even where an earlier callback's on_loop_begin failed).
        self._slot: int | None = None

    @property
    def checkpoints(self) -> list[Path]:
        """The checkpoint files kept so far, oldest first (complete once the loop has ended)."""
        return [self.save_dir / e["file"] for e in self._entries]

    @property
    def best_path(self) -> Path | None:
        """The kept checkpoint with the best ``monitor`` value (None without one)."""
        ranked = [e for e in self._entries if finite(e.get("metric"))]
        if not ranked:
            return None
        pick = max if self.mode == "max" else min
        best: dict[str, Any] = pick(ranked, key=lambda e: float(e["metric"]))
        return self.save_dir / str(best["file"])

    @property
    def last_path(self) -> Path | None:
        """The newest kept checkpoint (None before the first save)."""
        return self.save_dir / self._entries[-1]["file"] if self._entries else None

    def _run_begins(self, state: LoopState) -> None:
        self._requests.open(state.loop)  # (asks from now on: the run's first saves serve them)

    def _run_ended(self, error: BaseException | None) -> None:
        self._requests.close(error)  # asks no save served fail, saying why

    def on_loop_begin(self, state: LoopState) -> None:
        if self.monitor is not None:  # (its hooks run last: the publishers have declared)
            refuse_opposite_mode(
                f"Checkpoint(monitor={self.monitor!r})", self.monitor, self.mode, state,
                "keep the worst checkpoints as the best, pruning the better ones",
            )  # fmt: skip
        self._sharded_saves = 0
        self._step_save = UpdateDue()  # on every rank: a distributed save is every rank's
        self._at_epoch_end = False  # a step save due at an epoch's last step, at its end
        self._began = state.loop.spans_ranks  # every rank of a distributed trainer saves
        self._began_at, self._ended_an_epoch = state.global_step, False
        self._asked = UpdateDue()
        self._clock.restart(state)
        # Its own flag in the ranks' agreements (a loop's Checkpoints are alike on every
        # rank, and begin in the same order).
        self._slot = state.loop._save_slot() if state.loop.spans_ranks else None
        self._refuse_a_twin(state)
        if not state.loop.is_rank_zero:
            return
        try:
            self.save_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(
                f"save_dir={str(self.save_dir)!r} cannot be created: {exc}"
            ) from exc
        self._lock.acquire()  # before training: a second writer is refused here
        remove_temporaries(self.save_dir)  # left by a writer killed mid-write
        manifest = self._meet_manifest()
        for name in manifest.replaced:  # (a run killed as they went)
            remove(self.save_dir / name)
        self._entries = self._adopt(self._ranked_anew(manifest))
        self._replaced = []
        self._meet_other_runs(state)  # on_loop_end releases the lock
        self._last_saved_step = None
        self._began = True

    def _meet_manifest(self) -> Manifest:
        """The directory's manifest. One that no Checkpoint wrote (another tool's, in a
        directory of its outputs) was replaced by this run's at its first save: refused,
        before training. One that cannot be read (damaged, or no JSON) is set aside as
        ``manifest.json.unreadable``, never loaded or deleted, and the run goes on from the
        checkpoint files themselves (as it does from a manifest of ours damaged in its
        shape, which its first save mends)."""
        manifest = load_manifest(self.save_dir, warn=False)
        path, what = self.save_dir / MANIFEST, manifest.unreadable
        if manifest.not_ours == "json":
            raise CheckpointError(
                f"Checkpoint(save_dir={str(self.save_dir)!r}): its {MANIFEST} is no "
                f"Checkpoint's ({what}), and the first save would replace it. Save into a "
                "directory of its own, or move that file"
            )
        if what is None:
            return manifest
        set_aside = ""
        if manifest.not_ours == "bytes":
            aside = _unused(path.with_name(f"{MANIFEST}.unreadable"))
            os.replace(path, aside)
            fsync_dir(self.save_dir)
            set_aside = f"set aside as {aside.name} (never loaded or deleted), and "
        warnings.warn(
            f"Checkpoint(save_dir={str(self.save_dir)!r}): its {MANIFEST} is unreadable "
            f"({what}); {set_aside}the checkpoint files are looked at themselves",
            CheckpointWarning,
            stacklevel=2,
        )
        return manifest

    def _refuse_a_twin(self, state: LoopState) -> None:
        """Two Checkpoints of one loop on one directory (one to save every n steps, one
        every epoch) were refused as if another run held it."""
        here = self.save_dir.resolve()
        if any(
            isinstance(c, Checkpoint) and c is not self and c.save_dir.resolve() == here
            for c in state.loop.callbacks
        ):
            raise ValueError(
                f"two Checkpoint callbacks save into save_dir={str(self.save_dir)!r}: each "
                "would prune the other's checkpoints. One Checkpoint takes every_n_steps and "
                "every_n_epochs together; or give each its own save_dir"
            )

    def _meet_other_runs(self, state: LoopState) -> None:
        """A run that does not continue the directory's newest checkpoint must not write
        there beside the checkpoints further on: ranked by global step, its own would be
        pruned as older the moment they were written (measured: a fresh 2-epoch run into a
        5-epoch run's directory kept none of its own), and the same step's file of the
        other run would be overwritten. Nor beside another run's (by ``run_id``) further
        back: they would be pruned as its own older ones (measured: a run resumed from
        elsewhere removed two of three at its first save), and one could rank as its best.
        Refused, or with ``overwrite`` those removed; but those the resume passed over as
        damaged are set aside."""
        later = [e for e in self._entries if e["global_step"] > state.global_step]
        here = self.save_dir.resolve()
        damaged = {p.name for p in state.loop.damaged_at_resume if p.parent.resolve() == here}
        if any(e["file"] in damaged for e in later):
            self._set_aside([e for e in later if e["file"] in damaged], state)
            later = [e for e in later if e["file"] not in damaged]
        run = state.loop.run_id
        others = [  # (None: a file a crash kept out of the manifest, or an older checkpoint)
            e for e in self._entries
            if e.get("run") not in (None, run) and e["global_step"] <= state.global_step
        ]  # fmt: skip
        if later:
            self._refuse_or_remove(later, "a run further on than this one", state)
        if others:
            self._refuse_or_remove(others, "another run", state)

    def _refuse_or_remove(
        self, entries: list[dict[str, Any]], whose: str, state: LoopState
    ) -> None:
        if self.overwrite:
            self._replace(entries, whose)
            return
        newest = entries[-1]
        theirs = f"{newest['file']}, global step {newest['global_step']}"
        ours = f"this run is at {state.global_step}"
        if newest["global_step"] > state.global_step:
            advice = "Resume from it (resume_from=save_dir), save"
        else:  # another run's, told apart by their ids
            theirs = f"{theirs}, run_id {newest['run']}"
            ours = f"{ours}, run_id {state.loop.run_id}"
            advice = "Save"
        raise CheckpointError(
            f"Checkpoint(save_dir={str(self.save_dir)!r}): the directory holds checkpoints "
            f"of {whose} ({theirs}; {ours}). {advice} into another directory, or pass "
            "overwrite=True to remove them"
        )

    def _set_aside(self, damaged: list[dict[str, Any]], state: LoopState) -> None:
        """The checkpoints the resume found damaged are no run further on: this run, resumed
        from an older one in their stead, goes on (before, it was refused, and resuming from
        the directory again was refused again). Renamed ``<name>.damaged``, which nothing
        loads or deletes: kept to look at, out of the next resume's way."""
        self._unlist(damaged)
        for entry in damaged:
            path = self.save_dir / entry["file"]
            if path.exists() or path.is_symlink():
                os.replace(path, _unused(path.with_name(f"{path.name}.damaged")))
        fsync_dir(self.save_dir)
        names = ", ".join(e["file"] for e in damaged)
        warnings.warn(
            f"Checkpoint(save_dir={str(self.save_dir)!r}): {names}, found damaged as this run "
            f"resumed from {state.loop.resumed_from}, set aside as <name>.damaged (never "
            f"loaded or deleted); the run goes on from global step {state.global_step}",
            CheckpointWarning,
            stacklevel=2,
        )

    def _unlist(self, entries: list[dict[str, Any]]) -> None:
        """Take ``entries`` out of the manifest (before their files go: a crash in between
        leaves files the next run adopts, never a manifest that lists files that are gone)."""
        kept = [e for e in self._entries if not any(e is r for r in entries)]
        write_manifest(self.save_dir, kept, monitor=self.monitor, mode=self.mode)
        self._entries = kept

    def _replace(self, replaced: list[dict[str, Any]], whose: str) -> None:
        """With ``overwrite``: the checkpoints ``replaced`` (of ``whose``) are no longer this
        run's to keep or prune, and go at its first save (:meth:`_remove_replaced`). Until
        then the manifest lists them and their files stay: removed here, at the loop's
        begin, a run that started over and failed at its first step had left the directory
        empty (the demo run again after a change that broke its model)."""
        self._entries = [e for e in self._entries if not any(e is r for r in replaced)]
        self._replaced.append((replaced, whose))

    def _replacing(self, kept: list[dict[str, Any]]) -> list[str]:
        """The files of the checkpoints this run replaces that go at this save (all of them
        at its first; a file of a name it has used is its own now)."""
        names = {e["file"] for e in kept}
        return [e["file"] for entries, _ in self._replaced for e in entries
                if e["file"] not in names]  # fmt: skip

    def _remove_replaced(self, files: list[str]) -> None:
        """Remove ``files``, once the manifest lists this run's first checkpoint in their
        stead, and names them as replaced (a crash while they go leaves none to load)."""
        replaced, self._replaced = self._replaced, []
        for name in files:
            remove(self.save_dir / name)
        for entries, whose in replaced:
            _LOG.info(
                "Checkpoint(save_dir=%r, overwrite=True): removed %d checkpoint(s) of %s "
                "(%s to %s)", str(self.save_dir), len(entries), whose, entries[0]["file"],
                entries[-1]["file"],
            )  # fmt: skip

    def _adopt(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The manifest's entries plus checkpoint files a crash (or a hand) kept out of it,
        so that they are pruned like the others, oldest first; ranked by the ``monitor``
        value each holds (unranked, the best of a directory whose manifest was lost was
        pruned as any other)."""
        listed = {e["file"] for e in entries}
        for path in checkpoint_files(self.save_dir):
            if path.name not in listed:
                step, size, mtime = step_of(path.name), path.stat().st_size, path.stat().st_mtime
                entry = {"file": path.name, "global_step": step, "epoch": None, "metric": None,
                         "sha256": None, "bytes": size, "time": mtime}  # fmt: skip
                if self.monitor is not None:
                    self._rank_by_file(entry, None)
                entries.append(entry)
        return sorted(entries, key=lambda e: e["global_step"])

    def _rank_by_file(self, entry: dict[str, Any], digest: str | None) -> None:
        """Rank ``entry`` by the monitor's value its checkpoint file holds (unranked if it
        was not measured at its step, or the file is damaged: then with a warning), and
        record the metrics it holds of its step, if not too many, so that the next run
        with yet another monitor reads no file."""
        metrics = saved_metrics(self.save_dir / entry["file"], digest)
        entry["metric"] = measured_metric(metrics, self.monitor) if self.monitor else None
        if metrics is not None and len(metrics) <= RECORDED_METRICS:
            entry["metrics"] = metrics

    def _ranked_anew(self, manifest: Manifest) -> list[dict[str, Any]]:
        """The manifest's checkpoints, ranked by this ``monitor`` if it ranked them by
        another (or none): a run resumed with ``monitor="val/accuracy"`` after
        ``"val/loss"`` took a loss of 4.0 for the best accuracy, kept it as the best and
        pruned the best by accuracy, and ``find_checkpoint(best=True)`` named it. Each
        entry records the metrics measured at its checkpoint's step; a checkpoint listed
        without them (by an older version, or of a step that measured more than
        :data:`~asynchat._checkpoint_io.RECORDED_METRICS`) is read for its value."""
        entries = manifest.entries
        if self.monitor is None or not entries:
            return entries
        if manifest.ranking is not None and manifest.ranking[0] == self.monitor:
            return entries  # (in either mode: the values are this monitor's)
        read = 0
        for entry in entries:
            if isinstance(entry.get("metrics"), dict):
                entry["metric"] = measured_metric(entry["metrics"], self.monitor)
            else:  # (listed by an older version, or with too many metrics to record)
                self._rank_by_file(entry, entry.get("sha256"))
                read += 1
        _LOG.info(
            "Checkpoint(save_dir=%r, monitor=%r): %d checkpoint(s) ranked by %s before, "
            "ranked again by %r (%d file(s) read for it)",
            str(self.save_dir), self.monitor, len(entries),
            repr(manifest.ranking[0]) if manifest.ranking else "no monitor", self.monitor, read,
        )  # fmt: skip
        return entries

    def request_save(self) -> SaveFuture:
        """Ask for a save at the next step end where one can be taken whole: after a
        gradient-accumulation window; at an epoch's last step, at the epoch's end (with its
        validation). Callable from any thread (an HTTP handler, a signal handler of your
        own) while the loop runs, from its ``fit()`` on (a paused loop saves once resumed,
        at its next step; one asked as the run ends is saved then, even with
        ``save_on_end=False``), and on any rank of a distributed trainer: every rank saves
        at the same step, a step or two later. It ranks and is kept like any other save; a
        failed one is raised at the next step, as always.

        Returns an :class:`~asynchat.AwaitableFuture` (``path = await
        checkpoint.request_save()`` on any event loop; a ``concurrent.futures.Future`` for
        threads) that resolves with the path of the checkpoint once it is written and
        listed in the manifest (the first save after the ask serves it: one of the
        schedule's, if one comes first); on a rank that writes no file (not rank 0 of a
        DDP trainer) with None once its part is handed over (or, sharded, its shards
        written). It fails with the save's error, or with a
        :class:`~asynchat.CheckpointError` when no save serves it: asked while no loop runs
        with this callback (before its ``fit()``, after its end), or the loop ended (or
        failed, or was cancelled) before the save. Ignoring it is fine: a failed future is
        not reported by itself. Never wait for it inside the loop's own hooks: the save is
        made after them, on the compute thread (waited for in a hook of the loop, awaited
        or by ``result()``, it raises a ``RuntimeError`` saying so; wait in a task or
        thread of your own)."""
        return self._requests.ask()

    def on_step_end(self, state: LoopState) -> None:
        self._writer.raise_if_failed()  # a failed write is reported at the next step
        # (`|`, not `or`: each keeps a schedule, asked at every step end on every rank)
        if self._step_save(state, self.every_n_steps) | self._asked_due(state):
            if state.is_last_step:
                # Resumed from a save here, a run would run this epoch's end again: its
                # validation measured and logged twice. (An error in the epoch's end loses
                # this save, as it does every save after it.)
                self._at_epoch_end = True
            else:
                self.save(state)

    def _asked_due(self, state: LoopState) -> bool:
        """At a step's end: whether a save asked for (:meth:`request_save`, or
        ``every_n_seconds`` on rank 0's clock) is due now; in a distributed trainer once an
        agreement has carried the ask, at the same step on every rank."""
        loop, every = state.loop, self.every_n_seconds
        timed = every is not None and loop.is_rank_zero and self._clock.due(state, every)
        asked = self._requests.take() | timed  # (`|`: a request is taken either way)
        if asked:
            self._clock.asked = True  # not again before the save restarts it
        if self._slot is not None:
            if asked:
                loop._ask_ranks_to_save(self._slot)
            asked = loop._ranks_agreed_to_save(self._slot)
        return self._asked.hold(state, asked)

    def on_epoch_end(self, state: LoopState) -> None:
        self._ended_an_epoch = True
        due, self._at_epoch_end = self._at_epoch_end, False
        if due or every_n_epochs(state, self.every_n_epochs):
            self.save(state)

    def on_loop_end(self, state: LoopState) -> None:
        try:
            # A run that changed nothing (stopped before its first step) is not saved: what
            # it began from holds its state (saved, an untrained step-0 checkpoint replaced
            # the last run's with overwrite=True).
            changed = state.global_step != self._began_at or self._ended_an_epoch
            slot, self._slot = self._slot, None
            took = self._requests.take()  # (served by a save now, whatever asks for it)
            asked = self._asked.pending or (
                state.loop._ranks_agreed_to_save(slot) if slot is not None else took
            )
            wanted = self.save_on_end or asked  # (a save asked for as the run ended)
            if wanted and state.exception is None and self._began and changed:
                self.save(state)
        finally:
            try:
                self._writer.wait()  # on every way out: no write outlives the loop
            finally:
                self._lock.release()

    def save(self, state: LoopState) -> None:
        """Snapshot now (on the compute thread) and write in the background.

        In a distributed trainer every rank must call this at the same point (as the hooks
        do): rank 0 decides whether to save, every rank hands it its own part
        (:meth:`~asynchat.LoopBase.rank_state_dict`), and rank 0 writes, or, when the
        state is sharded, every rank writes its shards.
        """
        served = self._requests.for_save()  # the saves asked for so far: this one serves them
        try:
            missing = self._save(state, served)
        except BaseException as exc:
            served.settle(None, exc)
            raise
        if missing is not None:
            raise missing  # after the write is on its way: the checkpoint is not lost

    def _save(self, state: LoopState, served: SaveOutcome) -> CheckpointError | None:
        """:meth:`save`; returns the error to raise once the write is on its way."""
        loop = state.loop
        if not loop.is_rank_zero and not loop.spans_ranks:
            served.settle(None)  # (this rank writes nothing)
            return None
        decision = self._agreed(state)
        if decision is None:  # saved at this step already: that save holds what this would
            if self._last_save is not None:
                self._last_save.join(served)
            else:
                served.settle(None)
            return None
        self._refuse_diverged(state)
        metric, missing = decision
        if state.accumulating and loop.is_rank_zero:
            warnings.warn(
                f"Checkpoint(save_dir={str(self.save_dir)!r}): saving at global step "
                f"{state.global_step}, inside a gradient-accumulation window (the loop ended "
                "there, or save() was called): the window's gradients so far are not saved, "
                "so a run resumed from this checkpoint updates with its later micro-batches "
                "only",
                CheckpointWarning,
                stacklevel=3,
            )
        files = self._callbacks_files(state)
        ranks = loop.gather_to_rank_zero(loop.rank_state_dict()) if loop.spans_ranks else None
        if loop.shards_state:
            self._save_sharded(state, metric, ranks, files, served)
        elif loop.is_rank_zero:
            snapshot = loop.state_dict() | ({"ranks": ranks} if ranks else {})
            write = functools.partial(self._write, snapshot, metric, files)
            self._writer.submit(functools.partial(served.run, write))
        else:
            served.settle(None)  # its part is handed over; rank 0 writes the file
        self._last_save = served
        self._last_saved_step = state.global_step
        self._last_ranked = metric is not None
        self._clock.restart(state)
        return missing

    def _refuse_diverged(self, state: LoopState) -> None:
        """Raise CheckpointError, on every rank alike, when the weights of any rank show the
        training diverged (:func:`diverged_weight`)."""
        loop = state.loop
        found = diverged_weight(loop.model)
        if loop.spans_ranks:  # one agreement, which says which ranks
            flags = [0.0] * loop.world_size
            flags[loop.rank] = float(found is not None)
            ranks = [r for r, diverged in enumerate(loop.sum_over_ranks(flags)) if diverged]
            if not ranks:
                return
            which = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks}"
            what = f"the weights of {which}" + (f" ({found} here)" if found else "") + " hold"
        elif found is None:
            return
        else:
            what = f"{found} holds"
        newest = self._entries[-1]["global_step"] if self._entries else None
        raise CheckpointError(
            f"Checkpoint(save_dir={str(self.save_dir)!r}): not saved at global step "
            f"{state.global_step}: {what} NaN or infinite values; the training "
            "diverged. Saved, it would prune the checkpoints a run can resume from"
            + (f" (the newest kept is global step {newest})" if newest is not None else "")
            + ". Lower the learning rate, clip gradients (GradClip), check the data, or "
            "stop earlier with TerminateOnNaN"
        )

    def _callbacks_files(self, state: LoopState) -> list[Path]:
        """Where this save writes: the other callbacks' ``on_checkpoint`` (their own files
        up to date with the snapshot), and the paths they return, synced to disk on the
        writer thread before the checkpoint is written."""
        loop, files = state.loop, []
        if loop.is_rank_zero or loop.shards_state:
            for callback in loop.callbacks:
                if callback is not self:
                    files += _paths(callback, callback.on_checkpoint(state))
        return files

    def _agreed(self, state: LoopState) -> tuple[float | None, CheckpointError | None] | None:
        """Rank 0's decision (:meth:`_decide`), agreed by every rank of a distributed
        trainer (the other ranks get ``(None, None)`` when it saves)."""
        loop = state.loop
        if loop.shards_state:
            # Before agreeing: a failed last save (its shards were every rank's) is raised
            # here, so that no rank writes this one's shards for nothing; and DCP's
            # collectives of the last save are over before this one's begin.
            self._writer.wait()
        decision = self._decide(state) if loop.is_rank_zero else None
        if loop.spans_ranks and not loop.any_rank(decision is not None):
            return None  # one agreement per save, not per step: every rank saves, or none
        return decision if loop.is_rank_zero else (None, None)

    def _decide(self, state: LoopState) -> tuple[float | None, CheckpointError | None] | None:
        """None to skip this save, else the metric to rank it by and the error to raise."""
        again = self._last_saved_step == state.global_step
        if again and (self._last_ranked or self.monitor is None):
            return None
        metric, missing = self._metric(state)
        if again and metric is None:
            return None  # saved at this step already, and still nothing fresh to rank it by
        # (Saved again only when a step save came before the epoch's validation at the same
        # step: this one has the fresh metric.)
        return metric, missing

    def _save_sharded(
        self,
        state: LoopState,
        metric: float | None,
        ranks: list[dict[str, Any]] | None,
        files: list[Path],
        served: SaveOutcome,
    ) -> None:
        """Every rank: stage its shards now, write them on DCP's thread; rank 0 then
        commits the directory (see :mod:`asynchat._dcp`) with ``ranks``, every rank's part."""
        loop = state.loop
        self._sharded_saves += 1  # the same count on every rank: the same directory name
        name = checkpoint_name(state.global_step, sharded=True)
        temporary = self.save_dir / f".{name}.{self._sharded_saves}.tmp"
        extras = None
        if loop.is_rank_zero:
            extras = loop.state_dict() | ({"ranks": ranks} if ranks else {})
        try:
            written = loop.save_shards(temporary)
        except Exception as exc:
            raise CheckpointError(f"could not save sharded checkpoint {name}: {exc}") from exc
        finish = functools.partial(
            self._finish_sharded, written, temporary, name, extras, metric, files
        )
        self._writer.submit(functools.partial(served.run, finish))

    def _finish_sharded(
        self,
        written: Future[Any],
        temporary: Path,
        name: str,
        extras: dict[str, Any] | None,
        metric: float | None,
        files: list[Path],
    ) -> Path | None:
        """On the writer thread: sync the callbacks' ``files``, wait for this rank's shards;
        rank 0 then writes the rest into the directory, renames it into place, writes the
        manifest and prunes, and returns its path."""
        sync_files(files)
        try:
            written.result()  # DCP's coordinator (rank 0) returns once every rank's are written
        except Exception as exc:
            if extras is not None:  # rank 0: every rank's write has ended (and told DCP so)
                remove(temporary)
            raise CheckpointError(f"could not write sharded checkpoint {temporary}: {exc}") from exc
        if extras is None:
            return None  # not rank 0
        path = self.save_dir / name
        try:
            self._check_lock(temporary)
            extras["sharded"]["files"] = file_digests(temporary)
            _, digest = save_file(temporary / EXTRAS, extras)
            commit_directory(temporary, path)
            size = sum(f.stat().st_size for f in path.iterdir())
            self._record(name, digest, size, extras, metric)
        except OSError as exc:
            remove(temporary)  # (if the rename has not happened: nothing points at it)
            raise CheckpointError(f"could not write checkpoint {path}: {exc}") from exc
        return path

    def _check_lock(self, temporary: Path) -> None:
        """:meth:`DirectoryLock.check`; refused, this save's shards (written before the
        check, by every rank) are removed, not left in a directory another run now owns."""
        try:
            self._lock.check()
        except CheckpointError:
            remove(temporary)
            raise

    def _metric(self, state: LoopState) -> tuple[float | None, CheckpointError | None]:
        """The monitored value at this save, and the error to raise if it is missing."""
        if self.monitor is None:
            return None, None
        value = state.metrics.get(self.monitor)
        if value is not None:
            step = measured_at(state, self.monitor)
            if step == state.global_step:
                return float(value), None
            if not self._warned_stale:
                self._warned_stale = True
                warnings.warn(
                    f"Checkpoint(monitor={self.monitor!r}): at global step "
                    f"{state.global_step} its value is from step {step}, not of these "
                    "weights; such checkpoints are kept unranked (by keep_last only). Save "
                    "when the metric is measured, e.g. every_n_epochs=1 after an epoch's "
                    "Validation",
                    CheckpointWarning,
                    stacklevel=2,
                )
            return None, None
        if misspelled(state, self.monitor) or self.keep_last == 0:
            return None, CheckpointError(
                f"Checkpoint(monitor={self.monitor!r}): no such metric at global step "
                f"{state.global_step}; the metrics are {sorted(state.metrics)}. Fix the name, "
                "or list the callback that publishes it (e.g. Validation) before Checkpoint"
            )
        if not self._warned_unranked:
            self._warned_unranked = True
            warnings.warn(
                f"Checkpoint(monitor={self.monitor!r}): not published yet at global step "
                f"{state.global_step} (metrics: {sorted(state.metrics)}); checkpoints saved "
                "before it appears are kept by keep_last only",
                CheckpointWarning,
                stacklevel=2,
            )
        return None, None

    def _write(self, snapshot: dict[str, Any], metric: float | None, files: list[Path]) -> Path:
        """On the writer thread: sync the callbacks' ``files``, write the checkpoint, then
        the manifest, then prune; returns the checkpoint's path."""
        sync_files(files)  # (their lines of the checkpoint's steps survive a machine crash)
        name = checkpoint_name(snapshot["progress"]["global_step"])
        path = self.save_dir / name
        try:
            self._lock.check()  # still this run's directory: nothing written into another's
            size, digest = save_file(path, snapshot)
            self._record(name, digest, size, snapshot, metric)
        except OSError as exc:
            raise CheckpointError(f"could not write checkpoint {path}: {exc}") from exc
        return path

    def _record(
        self, name: str, digest: str, size: int, checkpoint: dict[str, Any], metric: float | None
    ) -> None:
        """A checkpoint is in place: list it in the manifest, then prune what is not kept.
        Entries whose files are gone (removed by hand, with the directory or alone) are
        dropped, so that the manifest lists only what can be loaded."""
        entries = [
            e for e in self._entries if e["file"] != name and (self.save_dir / e["file"]).exists()
        ]
        entries.append(manifest_entry(name, digest, size, checkpoint, metric))
        kept = self._retain(entries)
        replacing = self._replacing(kept)
        write_manifest(self.save_dir, kept, monitor=self.monitor, mode=self.mode,
                       replaced=replacing)  # fmt: skip
        self._entries = kept
        for entry in entries:
            if not any(entry is k for k in kept):
                remove(self.save_dir / entry["file"])
        if self._replaced:
            self._remove_replaced(replacing)
            # Named no more: a later checkpoint of one of their names is this run's, and a
            # crash between its file and its entry must not remove it as replaced.
            write_manifest(self.save_dir, kept, monitor=self.monitor, mode=self.mode)

    def _retain(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        by_step = sorted(entries, key=lambda e: e["global_step"])
        keep = [by_step[-1]]  # the newest, just written, is never pruned
        if self.keep_last is None:
            keep += by_step
        elif self.keep_last:
            keep += by_step[-self.keep_last :]
        if self.monitor is not None and self.keep_best:
            ranked = [e for e in entries if finite(e["metric"])]
            ranked.sort(key=lambda e: e["metric"], reverse=self.mode == "max")
            keep += ranked[: self.keep_best]
        return [e for e in by_step if any(e is k for k in keep)]


def _check_settings(
    save_dir: str | os.PathLike[str],
    every_n_steps: int | None,
    every_n_epochs: int | None,
    every_n_seconds: float | None,
    keep_last: int | None,
    monitor: str | None,
    mode: str,
    keep_best: int,
    save_on_end: bool,
    overwrite: bool,
) -> None:
    """:class:`Checkpoint`'s arguments checked, each error naming the argument."""
    check_path("save_dir", save_dir)
    positive_int("every_n_steps", every_n_steps, allow_none=True)
    positive_int("every_n_epochs", every_n_epochs, allow_none=True)
    positive_number("every_n_seconds", every_n_seconds, allow_none=True)
    if keep_last is not None:  # (None keeps them all)
        positive_int("keep_last", keep_last, minimum=0)
    positive_int("keep_best", keep_best, minimum=0)
    metric_name("monitor", monitor, allow_none=True)
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    flag("save_on_end", save_on_end)
    flag("overwrite", overwrite)
    if keep_last == 0 and (monitor is None or keep_best == 0):
        raise ValueError(
            "keep_last=0 keeps no checkpoint unless monitor=... and keep_best >= 1 are given"
        )
    if (every_n_steps, every_n_epochs, every_n_seconds) == (None,) * 3 and not save_on_end:
        raise ValueError(
            "Checkpoint never saves by itself: give every_n_steps, every_n_epochs, "
            "every_n_seconds or save_on_end=True"
        )


def _unused(path: Path) -> Path:
    """``path``, or if that is taken ``path-2``, ``path-3``, ...: never over an earlier one."""
    taken, n = path, 1
    while taken.exists() or taken.is_symlink():
        n += 1
        taken = path.with_name(f"{path.name}-{n}")
    return taken


def diverged_weight(model: torch.nn.Module) -> str | None:
    """The first weight of ``model`` that shows the training diverged, named (``"parameter
    'fc.weight'"``), or None: a trainable parameter holding a NaN or an infinity (this
    rank's shard of a sharded one), or a floating-point buffer holding a NaN (a BatchNorm's
    running variance after an overflow; a buffer may hold infinities: a mask's ``-inf``, an
    observer's ``inf`` minimum). One host sync.

    A sum is NaN or infinite when a value summed is (NaN spreads; inf - inf is NaN), and a
    sum is several times cheaper than ``isfinite(p).all()`` (measured on the CPU: 7 ms
    against 105 ms over 25M parameters, a copy of them 42 ms). A sum of finite values can
    overflow, so a weight whose sum is not finite is checked whole before it is named."""
    named: list[tuple[str, torch.Tensor]] = [
        (f"parameter {plain_name(n)!r}", p) for n, p in model.named_parameters() if p.requires_grad
    ]
    trainable = len(named)
    named += [
        (f"buffer {plain_name(n)!r}", b) for n, b in model.named_buffers() if b.is_floating_point()
    ]
    if not named:
        return None
    parts = [part.detach() for part in local_parts(t for _, t in named)]
    sums = [part.sum().float() for part in parts]
    sums_finite = torch.isfinite(torch.stack([s.to(sums[0].device) for s in sums]))
    for i in (~sums_finite).nonzero().flatten().tolist():
        part = parts[int(i)]
        if not bool(torch.isfinite(part).all() if i < trainable else ~torch.isnan(part).any()):
            return named[int(i)][0]
    return None
