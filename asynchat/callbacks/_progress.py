"""Progress: a rich progress bar on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import sys
import time
import warnings
from typing import Any, TextIO

from asynchat._callback import Callback
from asynchat._checks import flag, positive_int
from asynchat._every import every_n_steps
from asynchat._state import LoopState


def _format_metrics(metrics: dict[str, float]) -> str:
    return "  ".join(f"{name} {value:.4g}" for name, value in sorted(metrics.items()))


class _Guarded:
    """The stream a rich bar draws on, from the loop's thread and rich's refresh thread: the
    first write that fails (a terminal gone, a closed pipe) is kept in ``failed`` rather
    than raised, which in the refresh thread would end it with a traceback, and nothing is
    written after it. The callback reports it at its next hook."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.failed: OSError | None = None

    def write(self, text: str) -> int:
        if self.failed is None:
            try:
                return self._stream.write(text)
            except OSError as exc:
                self.failed = exc
        return len(text)

    def flush(self) -> None:
        if self.failed is None:
            try:
                self._stream.flush()
            except OSError as exc:
                self.failed = exc

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding: the stream's
        return getattr(self._stream, name)


class Progress(Callback):
    """Shows how far the loop is, with the latest ``state.metrics``.

    On a terminal (``stream.isatty()``) a ``rich`` progress bar is drawn by rich's own refresh
    thread, started at ``on_loop_begin`` and stopped at ``on_loop_end``; the compute thread only
    advances a counter. Elsewhere (CI logs, files) a plain line is printed every
    ``every_n_steps`` steps (if given) and at the end of each epoch. Losses are not read per
    step: the line shows what callbacks such as :class:`MetricUpdater`, :class:`Validation` and
    :class:`StatsMonitor` published. A stream that can no longer be written (a closed pipe,
    ``train.py | head``, a terminal closed) ends the lines, or the bar, with a
    ``RuntimeWarning`` at the next step or epoch's end; the training goes on.
    """

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        stream: TextIO | None = None,
        rich: bool | None = None,
    ) -> None:
        positive_int("every_n_steps", every_n_steps, allow_none=True)
        if stream is not None and not callable(getattr(stream, "write", None)):
            raise TypeError(f"stream must be a text stream (sys.stderr, a file...), got {stream!r}")
        if rich is not None:
            flag("rich", rich)
        self.every_n_steps = every_n_steps
        self.stream = stream
        self.rich = rich
        self._bar: Any = None

    def _out(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stdout

    def on_loop_begin(self, state: LoopState) -> None:
        self._started = time.perf_counter()
        self._quiet = not state.loop.is_rank_zero  # one process of a distributed job reports
        if self._quiet:
            return
        use_rich = self.rich if self.rich is not None else self._out().isatty()
        if use_rich:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._guarded = _Guarded(self._out())
            total = None
            if state.num_steps is not None:
                total = state.num_steps
            elif state.num_epochs is not None and state.steps_per_epoch is not None:
                total = state.num_epochs * state.steps_per_epoch
            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                console=Console(file=self._guarded),  # type: ignore[arg-type]
            )  # fmt: skip
            self._task = self._bar.add_task(state.loop.name, total=total, info="")
            self._task_completed = state.global_step
            self._bar.update(self._task, completed=state.global_step)
            self._bar.start()

    def on_step_end(self, state: LoopState) -> None:
        if self._quiet:
            return
        if self._bar is not None and self._guarded.failed is None:
            self._bar.update(
                self._task, completed=state.global_step, description=f"epoch {state.epoch + 1}"
            )
        elif self._bar is not None:
            self._stop_bar()
        elif every_n_steps(state, self.every_n_steps):
            self._line(state, f"step {state.global_step}")

    def on_epoch_end(self, state: LoopState) -> None:
        if self._quiet:
            return
        if self._bar is not None:
            self._bar.update(self._task, info=_format_metrics(state.metrics))
            if self._guarded.failed is not None:
                self._stop_bar()
        else:
            total = f"/{state.num_epochs}" if state.num_epochs is not None else ""
            done = "done" if state.epoch_complete else "cut short"
            self._line(state, f"epoch {state.epoch + 1}{total} {done}, step {state.global_step}")

    def on_loop_end(self, state: LoopState) -> None:
        if self._bar is not None:
            self._stop_bar()

    def _stop_bar(self) -> None:
        """Stop rich's refresh thread and draw the bar a last time; a stream that failed
        (then, or in the thread before) is reported once, and the bar is not drawn again."""
        bar, self._bar = self._bar, None
        bar.stop()
        if self._guarded.failed is not None:
            self._cannot_write(self._guarded.failed)

    def _line(self, state: LoopState, what: str) -> None:
        """Print one line; a stream that can no longer be written (a closed pipe: ``| head``;
        a full disk under a redirect) ends the lines with a warning, not the training."""
        elapsed = time.perf_counter() - self._started
        metrics = _format_metrics(state.metrics)
        try:
            print(
                f"[{state.loop.name}] {what}  {metrics}  ({elapsed:.1f} s)".rstrip(),
                file=self._out(),
                flush=True,
            )
        except OSError as exc:
            self._cannot_write(exc)

    def _cannot_write(self, exc: OSError) -> None:
        self._quiet = True  # (a bar, already stopped, is not drawn again either)
        warnings.warn(
            f"Progress: its stream can no longer be written ({exc}); the training goes on "
            "without progress lines",
            RuntimeWarning,
            stacklevel=3,
        )
