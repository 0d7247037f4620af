"""HookRunner: runs a loop's hooks, phase by phase, from its compute thread."""

from __future__ import annotations

import functools
import logging
import threading
import traceback
from collections.abc import Callable, Mapping

import torch

from asynchat import _heartbeat
from asynchat._callback import Hook
from asynchat._compute import ComputeThread
from asynchat._errors import add_note
from asynchat._heartbeat import beat
from asynchat._in_use import in_hook_of
from asynchat._phase import Phase
from asynchat._state import LoopState

LOG = logging.getLogger("asynchat.loop")


class HookRunner:
    """Runs the hooks of a phase in order: ``def`` hooks on the compute thread, ``async def``
    hooks on the event loop while the compute thread waits for them.

    On CUDA each hop hands the stream over with events, both ways: what an ``async def`` hook
    queues runs after the step's work so far, and the compute stream waits for it.

    Fields, who writes them and from where:

    - ``hooks``: the loop's table of hooks per phase; read here, never written.
    - ``compute``: the compute thread of the run; set by the loop before the run starts, on
      the event loop (or on the parent's compute thread for ``run_inline``), cleared after it.
    - ``trace``: whether the debug trace is on; set once per run, before it starts.
    - ``silent``: the phases with nothing to do (no hooks, no trace, no progress beats):
      :meth:`run_phase` only records them in ``state.phase``. Set by :meth:`begin`, on the
      compute thread as the run starts (after the loop's last callback was added).
    """

    def __init__(
        self,
        name: str,
        hooks: Mapping[Phase, tuple[Hook, ...]],
        state: LoopState,
        cancelling: Callable[[], bool],
    ) -> None:
        self.name = name
        self.hooks = hooks
        self.state = state
        self.cancelling = cancelling
        self.compute: ComputeThread | None = None
        self.trace = False
        self.silent: frozenset[Phase] = frozenset()

    def begin(self) -> None:
        """As a run starts: which phases are silent."""
        quiet = not self.trace and not _heartbeat.installed()
        self.silent = frozenset(p for p, hooks in self.hooks.items() if quiet and not hooks)

    def run_phase(self, phase: Phase) -> None:
        """Run the hooks of ``phase``; on the compute thread only.

        ``on_loop_end`` is teardown: every hook runs even when an earlier one raises (so each
        callback joins its threads and closes its files); the first error then propagates as
        itself, with the later ones attached to it as notes.
        """
        state = self.state
        state.phase = phase
        if phase in self.silent:  # the common case at step-level phases
            return
        hooks = self.hooks[phase]
        if self.trace:
            LOG.debug(
                "%s: %s epoch=%d step=%d global_step=%d on %s", self.name, phase.value, state.epoch,
                state.step, state.global_step, threading.current_thread().name,
            )  # fmt: skip
        # Progress for launch(hang_timeout=...), on entering and on leaving the phase, so a
        # rank stuck in a hook is behind a rank that waits in the collective after it. A
        # no-op outside launched ranks.
        beat()
        if phase is Phase.ON_LOOP_END:
            self._run_every_hook(phase)
        else:
            for hook in hooks:
                if hook.due is None or hook.due(state):
                    self._call_hook(hook, phase)
        beat()

    @staticmethod
    def raised_in_a_hook(exc: BaseException) -> bool:
        """Whether ``exc`` came out of a hook (its traceback passes through one's call)."""
        frame = exc.__traceback__
        while frame is not None:
            if frame.tb_frame.f_code is HookRunner._call_hook.__code__:
                return True
            frame = frame.tb_next
        return False

    def _call_hook(self, hook: Hook, phase: Phase) -> None:
        if not hook.is_async:
            hook.fn(self.state)
            return
        compute = self.compute
        assert compute is not None
        stream = compute.stream
        if self.trace:
            LOG.debug("%s: %s: hop to the event loop for %r", self.name, phase.value, hook)
        ready = stream.record_event() if stream is not None else None
        done = compute.call_async(functools.partial(self._await_hook, hook, phase, ready))
        if stream is not None and done is not None:
            stream.wait_event(done)

    async def _await_hook(
        self, hook: Hook, phase: Phase, ready: torch.cuda.Event | None
    ) -> torch.cuda.Event | None:
        if self.cancelling() and phase is not Phase.ON_LOOP_END:
            return None  # a cancelled loop skips the async hooks it has not started
        # A loop started in the hook (a predictor on this loop's model) runs inside this one.
        with in_hook_of(self.state.loop) as call:
            done = await self._run_hook(hook, ready)
        if call.claims:
            await call.outlived(hook)
        return done

    async def _run_hook(
        self, hook: Hook, ready: torch.cuda.Event | None
    ) -> torch.cuda.Event | None:
        if ready is None:
            await hook.fn(self.state)  # type: ignore[misc]
            return None
        # On CUDA: whatever the hook queues on this thread's stream runs after the step's
        # work so far, and the compute stream will wait for it (device-side, both ways).
        stream = torch.cuda.current_stream(self.state.device)
        stream.wait_event(ready)
        await hook.fn(self.state)  # type: ignore[misc]
        done: torch.cuda.Event = stream.record_event()
        return done

    def _run_every_hook(self, phase: Phase) -> None:
        first: BaseException | None = None
        for hook in self.hooks[phase]:
            try:
                self._call_hook(hook, phase)
            except BaseException as exc:
                if first is None:
                    first = exc
                else:
                    trace = "".join(traceback.format_exception(exc)).rstrip()
                    add_note(first, f"{hook!r} also raised, at {phase.value}:\n{trace}")
        if first is not None:
            raise first
