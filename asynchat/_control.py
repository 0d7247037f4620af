"""LoopControl: a loop's status, the requests that end or hold it, and the one decision per
boundary that honours them.

Requests arrive from any thread at any time: ``stop()`` and ``pause()``/``resume()`` from user
code or hooks, a cancellation from the event loop. They take effect only where the loop asks
:meth:`LoopControl.decide`, which it does at fixed boundaries: at the top of each epoch, before
an epoch's first step, and after each step. In a distributed run ``decide`` agrees the
requests of every rank in one collective (a MAX all-reduce of ``[stop, cancel, pause,
forced, saves...]``), so every rank makes the same decision at the same boundary, and no rank
ever makes a collective the others don't (pausing one rank holds them all; stopping one
during ``on_epoch_end`` ends them all after the same epoch).

With ``agree_later`` set (a distributed trainer's ``control_lag=1``), the agreement after a
step (``decide(lagged=True)``) is pipelined: each rank starts the all-reduce of its requests
and decides on the one it started after the step before, whose result came in while this
step ran, so no step waits for the round trip. A request made during a step then ends or
holds every rank one step later. The other boundaries (an epoch's top, before its first
step, every round of a hold) agree at once, after the pipelined one has come in: every rank
takes each boundary the same way, so their collectives pair up.

Data without a ``len()`` on some rank has its epoch's end agreed before each step (whether
the item read ahead exists anywhere: ``agree_last``). That agreement carries the boundary's
requests too (:meth:`LoopControl.agree_with`: ``[stop, cancel, pause, forced, saves...,
ended]`` in one all-reduce), and the step loop decides on them (``decide(carried=True)``)
instead of agreeing again after the step: one collective a step, not two.

Every agreement also carries a flag for each Checkpoint of the loop (``save_slot``; the
ranks have the same ones, in the same order): a save asked for by some rank
(``request_save()``, or rank 0's clock for ``every_n_seconds``). Each ask is sent once, and
whichever agreement carries it sets that Checkpoint's flag in ``saves_agreed`` on every rank
at the same boundary, where the ranks' Checkpoints take it: every rank saves at the same
step, and a save asked for on one rank costs no collective of its own.

A gradient-accumulation window is one unit for ending: after a step whose gradients wait for
a later update, ``decide(window_open=True)`` holds a stop or a cancellation until the step that
updates, since no checkpoint holds those gradients (a run resumed from one taken inside the
window would update with its last micro-batches only). A forced exit (a second Ctrl-C) does
not wait. Pausing inside a window is fine: the gradients stay where they are.

Status transitions go through :meth:`LoopControl.transition` under a lock, checked against
:data:`ALLOWED`, so concurrent requests cannot produce an impossible sequence (a stopping loop
never turns paused again).
"""

from __future__ import annotations

import contextlib
import enum
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from asynchat import _heartbeat as heartbeat
from asynchat._events import LoopStatus

Agree = Callable[[Sequence[bool]], Sequence[bool]]
# Starts an agreement; returns what waits for its result.
AgreeLater = Callable[[Sequence[bool]], Callable[[], Sequence[bool]]]


class LastAgreement(Protocol):
    """``LoopControl.agree_last``: whether the epoch ends with the next step, agreed."""

    # Whether some rank's data is read once (an iterator, a stream): a stop agreed before a
    # step then trains, on every rank, the items read for it, which no run could read again.
    read_once: bool

    def __call__(self, last: bool) -> bool:
        """True if ``last`` is True on any rank."""
        ...


# Poll interval of a paused rank that must keep agreeing with its peers.
_GROUP_PAUSE_POLL_S = 0.05

ALLOWED: dict[LoopStatus, frozenset[LoopStatus]] = {
    LoopStatus.CREATED: frozenset({LoopStatus.RUNNING, LoopStatus.STOPPING}),
    LoopStatus.RUNNING: frozenset(
        {
            LoopStatus.PAUSED,
            LoopStatus.STOPPING,
            LoopStatus.FINISHED,
            LoopStatus.FAILED,
            LoopStatus.CANCELLED,
        }
    ),
    LoopStatus.PAUSED: frozenset(
        {LoopStatus.RUNNING, LoopStatus.STOPPING, LoopStatus.FAILED, LoopStatus.CANCELLED}
    ),
    LoopStatus.STOPPING: frozenset({LoopStatus.FINISHED, LoopStatus.FAILED, LoopStatus.CANCELLED}),
    LoopStatus.FINISHED: frozenset(),
    LoopStatus.FAILED: frozenset(),
    LoopStatus.CANCELLED: frozenset(),
}


class Decision(enum.Enum):
    """What the loop does at a boundary."""

    CONTINUE = enum.auto()
    STOP = enum.auto()  # end normally (on_epoch_end of a cut-short epoch still runs)
    CANCEL = enum.auto()  # this loop was cancelled: raise JobCancelled
    PEER_CANCEL = enum.auto()  # another rank was cancelled: end like it, skipping on_epoch_end


class LoopControl:
    """The control state of one loop, shared by the event loop, the compute thread and any
    thread that calls ``stop``/``pause``/``resume``.

    Fields, who writes them and from where:

    - ``status``: any thread, only through :meth:`transition` (in :meth:`_changing`).
    - ``stop_reason``: the first :meth:`request_stop` (any thread); also set when a peer's
      request ends the loop.
    - ``stop_requested``: :meth:`request_stop`, any thread; never cleared.
    - ``cancel_requested``: :meth:`request_cancel`, the event loop; never cleared.
    - ``forced``: :meth:`request_cancel` with ``now=True`` (a forced exit); never cleared.
    - ``holding``: :meth:`decide`, on the compute thread: whether it held an end to the
      window's last step.
    - ``_unpaused``: cleared by :meth:`pause`, set by :meth:`resume`, :meth:`request_stop`
      and :meth:`request_cancel`; the compute thread waits on it in :meth:`decide`.
    - ``parent``: the loop this one runs inside (``run_inline``), set on the compute thread
      before the run; its cancellation cancels this loop too.
    - ``agree``: set once, before the run, by a distributed trainer; ``None`` runs alone.
      ``agree_later`` (set with it, or None): starts one without waiting; ``_pending`` (the
      compute thread's) waits for the one started at the last step's boundary.
    - ``agree_last``: set at an epoch's start, on the compute thread, by a distributed
      trainer whose ranks do not all know that epoch's length: agrees before each step
      whether the epoch ends with it (``with_last``); ``None`` otherwise.
    - ``carried``: the boundary's requests as :meth:`agree_with` agreed them last (compute
      thread), for the next ``decide(carried=True)``; any other decision drops them.
    - ``idle``: whether a boundary is a no-op (a loop alone, not paused, asked nothing); kept
      by every change of the fields it depends on, read by the step loop after each step.
    - ``save_asks``, one flag per Checkpoint (:meth:`save_slot`, as the run begins): set by
      this rank's Checkpoint, cleared as an agreement sends it; ``saves_agreed``: set by
      the agreement that carried any rank's, cleared by the Checkpoint that takes it (both
      on the compute thread, of a loop that agrees).

    Invariant: the loop ends or holds only where :meth:`decide` says so, and in a
    distributed run every rank calls :meth:`decide` at the same boundaries.
    """

    def __init__(self, on_status: Callable[[LoopStatus], None]) -> None:
        self._lock = threading.RLock()  # (see _changing)
        self._changer: int | None = None  # the thread inside _changing(), if one is
        self._on_status = on_status
        self.status = LoopStatus.CREATED
        self.stop_reason: str | None = None
        self.stop_requested = False
        self.cancel_requested = False
        self.forced = False
        self.holding = False  # the last decision held a stop or cancellation to the update
        self._unpaused = threading.Event()
        self._unpaused.set()
        self._parent: LoopControl | None = None
        self._agree: Agree | None = None
        self.agree_later: AgreeLater | None = None
        self._pending: Callable[[], Sequence[bool]] | None = None
        self.agree_last: LastAgreement | None = None
        self.carried: tuple[bool, bool, bool, bool] | None = None
        self.idle = True
        # Per Checkpoint: a save this rank asks every rank for, sent with the next agreement;
        # and whether an agreement has carried one since the Checkpoint last looked.
        self.save_asks: list[bool] = []
        self.saves_agreed: list[bool] = []

    @property
    def parent(self) -> LoopControl | None:
        return self._parent

    @parent.setter
    def parent(self, parent: LoopControl | None) -> None:
        with self._changing():
            self._parent = parent
            self._refresh()

    @property
    def agree(self) -> Agree | None:
        return self._agree

    @agree.setter
    def agree(self, agree: Agree | None) -> None:
        with self._changing():
            self._agree = agree
            self._refresh()

    @contextlib.contextmanager
    def _changing(self) -> Iterator[None]:
        """Hold the lock under which the control state changes.

        A signal handler installed with ``signal.signal`` runs on the main thread between
        two bytecodes, perhaps of a change made here on the event loop: a request it made
        (``stop()``) waited for the lock forever. The lock is reentrant, so that a handler
        that runs after it is taken and before the change starts, or after the change and
        before it is released, makes its request as if before or after the change; one that
        runs during the change sees :meth:`interrupted_inside` and hands its request to a
        thread (:meth:`LoopBase.stop`)."""
        with self._lock:
            changer, self._changer = self._changer, threading.get_ident()
            try:
                yield
            finally:
                self._changer = changer

    def interrupted_inside(self) -> bool:
        """Whether this thread is in the middle of a change of the control state: a signal
        handler interrupted it (see :meth:`_changing`)."""
        return self._changer == threading.get_ident()

    def _refresh(self) -> None:
        """Recompute ``idle``; in :meth:`_changing`."""
        self.idle = (
            self._agree is None
            and self._parent is None
            and not (self.stop_requested or self.cancel_requested or self.forced)
            and self._unpaused.is_set()
        )

    # -- status --------------------------------------------------------------------------------

    def transition(
        self, new: LoopStatus, *, only_from: frozenset[LoopStatus] | None = None
    ) -> bool:
        """Move to ``new`` if allowed (and if the status is in ``only_from``, when given);
        return whether it moved. Subscribers hear of it in order."""
        with self._changing():
            if new not in ALLOWED[self.status]:
                return False
            if only_from is not None and self.status not in only_from:
                return False
            self.status = new
            self._on_status(new)  # under the lock: events go out in the order of changes
            return True

    @contextlib.contextmanager
    def running(self, *, cancelled: type[BaseException]) -> Iterator[None]:
        """The run's life: ``created -> running`` (``stopping`` if a stop came first), then
        ``finished``, ``failed`` or ``cancelled`` by how the block ends; ``cancelled`` is the
        exception that means a cancellation where the block runs."""
        self.transition(LoopStatus.STOPPING if self.stop_requested else LoopStatus.RUNNING)
        try:
            yield
        except cancelled:
            self.transition(LoopStatus.CANCELLED)
            raise
        except GeneratorExit:
            # A stream closed early stopped the loop (Predictor.stream); one raised by a
            # hook is an error.
            self.transition(LoopStatus.FINISHED if self.stop_requested else LoopStatus.FAILED)
            raise
        except BaseException as exc:
            # Ctrl-C that reached the event loop (trio raises it there) wound the loop down
            # like a cancellation; one raised by a hook on the compute thread is an error.
            interrupted = isinstance(exc, KeyboardInterrupt) and self.cancel_requested
            self.transition(LoopStatus.CANCELLED if interrupted else LoopStatus.FAILED)
            raise
        self.transition(LoopStatus.FINISHED)

    # -- requests, from any thread ------------------------------------------------------------

    def request_stop(self, reason: str) -> bool:
        """Ask the loop to end at the next boundary; False if it is done or already asked."""
        with self._changing():
            if self.status.done or self.stop_requested:
                return False
            self.stop_requested = True
            self.stop_reason = reason
            self.idle = False
        self.transition(LoopStatus.STOPPING, only_from=_ACTIVE)
        self._wake()  # a paused loop wakes up to stop
        return True

    def request_cancel(self, *, now: bool = False) -> None:
        """Ask the loop to end at the next boundary; ``now``: even inside an accumulation
        window (a forced exit)."""
        with self._changing():  # with resume(): its recomputed idle cannot land after this one
            self.forced = self.forced or now
            self.cancel_requested = True
            self.idle = False
        self.stop_reason = "cancelled"
        self.transition(LoopStatus.STOPPING, only_from=_ACTIVE)
        self._wake()

    def _wake(self) -> None:
        with self._changing():  # (the event's own lock is not reentrant: see _changing)
            self._unpaused.set()

    def pause(self) -> None:
        with self._changing():  # with resume(): idle follows the last of them
            if not self.status.done:
                self._unpaused.clear()
                self.idle = False

    def resume(self) -> None:
        with self._changing():
            self._unpaused.set()
            self._refresh()

    def cancelling(self) -> bool:
        """Whether this loop, or one it runs inside, is being cancelled (its ``async def``
        hooks not yet started are then skipped)."""
        parent = self.parent
        return self.cancel_requested or (parent is not None and parent.cancelling())

    def _ending(self) -> bool:
        """Whether this loop is to end at its next boundary for a cancellation: its own, or
        a forced end of the loop it runs inside. A loop run inline (a Validation) is part of
        its parent's step, which a cancellation lets complete with its ``def`` hooks: cut
        short, it left the checkpoint a step whose hooks had not all run (those after it at
        that phase were skipped: the LR schedule was a step behind), and in a distributed
        run one rank left the validation's collectives while the others were in them."""
        return self.cancel_requested or (self.parent is not None and self.parent.forcing())

    # -- the decision, on the compute thread ---------------------------------------------------

    def decide(
        self, *, window_open: bool = False, lagged: bool = False, carried: bool = False
    ) -> Decision:
        """The loop's decision at a boundary: agreed with the peers, and after any pause.
        ``window_open``: the last step left gradients for a later update; a stop or a
        cancellation (not a forced one) then waits for the step that updates. ``lagged``
        (after a step): with ``agree_later``, decide on the agreement started at the last
        boundary and start this one's (see the module's doc). ``carried``: decide on what
        :meth:`agree_with` agreed (no collective)."""
        if self.idle:  # the common case, after every step: a loop alone, asked nothing
            self.holding = False
            return Decision.CONTINUE
        stop, cancel, pause, forced = self._agreed(lagged=lagged, carried=carried)
        if pause and not (stop or cancel):
            stop, cancel, forced = self._hold()
        self.holding = window_open and not forced and (stop or cancel)
        if self.holding:
            return Decision.CONTINUE
        if cancel:
            if self.cancelling():
                return Decision.CANCEL
            with self._changing():  # says why this rank ended (a monitor's warning reads it)
                self.stop_reason = self.stop_reason or "cancelled on another rank"
            return Decision.PEER_CANCEL
        if stop:
            if not self.stop_requested:
                self.request_stop("stopped on another rank")
            return Decision.STOP
        return Decision.CONTINUE

    def forcing(self) -> bool:
        """Whether this loop, or one it runs inside, is being forced to end."""
        parent = self.parent
        return self.forced or (parent is not None and parent.forcing())

    def save_slot(self) -> int:
        """A flag in every agreement for one more Checkpoint; its index. Each rank's
        Checkpoints take theirs in the same order as the run begins (before any
        agreement), so the flags line up across the ranks."""
        self.save_asks.append(False)
        self.saves_agreed.append(False)
        return len(self.save_asks) - 1

    def _local(self) -> tuple[bool, ...]:
        paused = not self._unpaused.is_set()
        return self.stop_requested, self._ending(), paused, self.forcing(), *self.save_asks

    def _agreed(
        self, *, lagged: bool = False, carried: bool = False
    ) -> tuple[bool, bool, bool, bool]:
        agreed_with, self.carried = self.carried, None
        if carried and agreed_with is not None:
            return agreed_with
        flags = self._local()
        if self.agree is None:
            stop, cancel, pause, forced = flags[:4]
            return stop, cancel, pause, forced
        earlier = self.settle()
        if lagged and self.agree_later is not None:
            self._pending = self.agree_later(flags)
            self._sent()
            agreed = earlier if earlier is not None else (False,) * len(flags)
        else:
            agreed = self._agree_now(flags)
        stop, cancel, pause, forced = agreed[:4]
        return bool(stop), bool(cancel), bool(pause), bool(forced)

    def _agree_now(self, flags: Sequence[bool]) -> Sequence[bool]:
        assert self.agree is not None
        agreed = self.agree(flags)
        self._sent()
        self._received(agreed)
        return agreed

    def _sent(self) -> None:
        self.save_asks = [False] * len(self.save_asks)

    def _received(self, agreed: Sequence[bool]) -> None:
        """Take the save flags of an agreement that came in (every rank takes each one)."""
        for slot in range(len(self.saves_agreed)):
            if agreed[4 + slot]:
                self.saves_agreed[slot] = True

    def agree_with(self, flag: bool) -> bool:
        """Whether ``flag`` is True on any rank, agreed in one all-reduce with this
        boundary's requests, which are kept (``carried``) for the next
        ``decide(carried=True)``: the step loop's data says whether the epoch ends, and the
        boundary before the step costs no collective of its own (every rank calls this at
        the same point)."""
        assert self.agree is not None, "only a loop that agrees with its peers"
        self.settle()
        agreed = self._agree_now((*self._local(), flag))
        stop, cancel, pause, forced = agreed[:4]
        self.carried = bool(stop), bool(cancel), bool(pause), bool(forced)
        return bool(agreed[-1])

    def settle(self) -> Sequence[bool] | None:
        """Wait for the agreement started at the last step's boundary, if one is pending,
        and return it; at a run's end too, so it leaves no collective behind (on the compute
        thread)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        agreed = pending()
        self._received(agreed)
        return agreed

    def _hold(self) -> tuple[bool, bool, bool]:
        """Wait while paused (here or, agreed, on any rank); return (stop, cancel, forced)
        after."""
        self.transition(LoopStatus.PAUSED, only_from=frozenset({LoopStatus.RUNNING}))
        try:
            while True:
                # Held on purpose: a launched rank tells its launcher it is not hung.
                heartbeat.alive()
                if self.agree is None:
                    # Woken by resume(), stop() or a cancellation (and to say it is alive).
                    self._unpaused.wait(heartbeat.HELD_BEAT_S if heartbeat.installed() else None)
                else:
                    # Peers must keep agreeing in step: poll, one collective per round.
                    self._unpaused.wait(_GROUP_PAUSE_POLL_S)
                stop, cancel, pause, forced = self._agreed()
                if stop or cancel or not pause:
                    return stop, cancel, forced
        finally:
            self.transition(LoopStatus.RUNNING, only_from=frozenset({LoopStatus.PAUSED}))


_ACTIVE = frozenset({LoopStatus.RUNNING, LoopStatus.PAUSED})
