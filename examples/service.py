"""A training service: start, watch, pause, resume, stop and cancel jobs over HTTP.

    python examples/service.py [--host 127.0.0.1] [--port 8000] [--runs runs/service]
                               [--max-running 4] [--keep-finished 100]
                               [--continue-interrupted]

An ASGI app (Starlette, served by uvicorn) whose training jobs run in the same event loop as
the server, each on its own compute thread, so every route answers while models train:

    POST   /jobs                      start a job from a JSON spec -> 201 {"id": ...}
    GET    /jobs                      every job's snapshot
    GET    /jobs/{id}                 one job's spec and snapshot
    GET    /jobs/{id}/events          Server-Sent Events until the job ends
    POST   /jobs/{id}/pause|resume|stop
    POST   /jobs/{id}/checkpoint      save the job at its next step (a paused one's once
                                      resumed) -> 202; GET /jobs/{id}'s
                                      "last_checkpoint" then names the file.
                                      ?wait=true: answers once it is written,
                                      200 {"checkpoint": file, ...} (409 if the
                                      job ends or fails first). Asked of a job
                                      just started, it and /profile wait for the
                                      job to begin. Asks made before the save is
                                      written share it
    POST   /jobs/{id}/profile         profile the job's next 3 steps -> 202 (409 while a
                                      job records); "last_trace" names the Chrome trace.
                                      ?wait=true: answers once it is written,
                                      200 {"trace": file, ...} (409 if the job
                                      ends first, 500 if it cannot be written)
    DELETE /jobs/{id}                 cancel the job
    GET    /health                    liveness

A spec is ``{"epochs": 20, "lr": 0.002, "batch_size": 32, "hidden": 128}`` (all optional);
jobs train an MLP on scikit-learn's digits with validation and checkpoints. A bad spec gets a
422 naming the field (also for JSON nested too deep or numbers too long to parse), a body
over 64 KiB a 413, a new job past ``--max-running`` running ones a 429.

Each job gets a fresh id (unique across restarts) and a run directory of its own under
``--runs``, so no job ever prunes another's checkpoints; ``job.json`` there records its spec
and, once it has ended, how. Only the newest ``--keep-finished`` ended jobs stay listed;
older ones are forgotten (their files stay on disk). Jobs that can be continued stay listed
until they are continued or deleted.

SIGINT or SIGTERM stops every job gracefully at once (each writes its final checkpoint),
which also ends every open event stream, then the server exits.

Nothing is lost when the server goes down, gracefully or not (a SIGKILL, a power cut): a new
server on the same ``--runs`` lists the jobs of the earlier ones, and a job that had not run
to its end (stopped by the shutdown or over HTTP; ``"interrupted"`` if the server died under
it) can be continued from its newest checkpoint:

    POST   /jobs/{id}/continue        go on from the job's newest checkpoint -> 202

``--continue-interrupted`` does that at start-up for every job the server's end interrupted
(up to ``--max-running``; the rest stay listed, to continue over HTTP). A job stopped over
HTTP is continued only when asked. ``DELETE`` on a job that can be continued forgets it.
One server at a time uses a ``--runs`` directory: a second is refused at start-up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

import anyio
import torch
import uvicorn
from sklearn.datasets import load_digits
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import asynchat
from asynchat import (
    AwaitableFuture,
    Callback,
    CheckpointError,
    LoopEvent,
    LoopSnapshot,
    LoopState,
    Trainer,
)
from asynchat.callbacks import Checkpoint, Profiler, ProfilerError, Validation, resumable

logger = logging.getLogger("service")

DEFAULTS: dict[str, Any] = {"epochs": 20, "lr": 0.002, "batch_size": 32, "hidden": 128}
LIMITS: dict[str, tuple[type, float, float]] = {
    "epochs": (int, 1, 1000),
    "lr": (float, 1e-6, 1.0),
    "batch_size": (int, 1, 1024),
    "hidden": (int, 1, 4096),
}


MAX_BODY = 64 * 1024


class SpecError(ValueError):
    pass


class BodyTooLarge(Exception):
    pass


async def read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    """The request body, refusing (BodyTooLarge) to read more than ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge
    return bytes(body)


def parse_spec(body: Any) -> dict[str, Any]:
    """The job spec with defaults filled in; SpecError names what is wrong."""
    if not isinstance(body, dict):
        raise SpecError('the body must be a JSON object, e.g. {"epochs": 5}')
    unknown = sorted(set(body) - set(LIMITS))
    if unknown:
        raise SpecError(f"unknown field(s) {unknown}; known: {sorted(LIMITS)}")
    spec = dict(DEFAULTS)
    for name, value in body.items():
        kind, low, high = LIMITS[name]
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (kind is int and not isinstance(value, int))
        ):
            raise SpecError(
                f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}"
            )
        if not low <= value <= high:
            raise SpecError(f"{name} must be between {low:g} and {high:g}, got {value!r}")
        spec[name] = kind(value)
    return spec


def snapshot_json(snapshot: LoopSnapshot) -> dict[str, Any]:
    """``snapshot`` as strict JSON data: a metric that is not finite (a diverged loss) is
    None (JSON has no NaN: Starlette's responses refused it, a 500 for every listing)."""
    data = dataclasses.asdict(snapshot)
    data["status"] = snapshot.status.value
    data["metrics"] = {k: v if math.isfinite(v) else None for k, v in snapshot.metrics.items()}
    return data


def digits_data(batch_size: int) -> tuple[DataLoader[Any], DataLoader[Any]]:
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images / 16.0, dtype=torch.float32)
    y = torch.tensor(labels)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=g)
    train, val = order[:1400], order[1400:]
    return (
        DataLoader(TensorDataset(x[train], y[train]), batch_size, shuffle=True, generator=g),
        DataLoader(TensorDataset(x[val], y[val]), batch_size=256),
    )


#: The stop reason of the jobs a shutdown stops: a later server continues them.
SHUTDOWN = "the service is shutting down"
JOB_FILE = "job.json"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``path`` atomically: a reader (or a later server) sees the old file or the new."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with temporary.open("w") as file:
        json.dump(data, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def read_regular(path: Path) -> str:
    """The text of ``path``, a regular file: anything else (a FIFO, which would wait
    forever for a writer, or a link to ``/dev/zero``) raises OSError unread."""
    if not path.is_file():
        raise OSError(f"{path} is no regular file" if path.exists() else f"no {path.name}")
    return path.read_text()


def newest_checkpoint(run_dir: Path) -> dict[str, Any]:
    """Epoch and global step of the newest checkpoint ``manifest.json`` lists (zeros if none)."""
    try:
        entries = json.loads(read_regular(run_dir / "manifest.json"))["checkpoints"]
        newest = max(entries, key=lambda entry: int(entry["global_step"]))
        return {"epoch": int(newest["epoch"]), "global_step": int(newest["global_step"])}
    except (OSError, ValueError, KeyError, TypeError, RecursionError):  # none, or not ours
        return {"epoch": 0, "global_step": 0}


def read_jobs(runs: Path) -> list[dict[str, Any]]:
    """What the ``job.json`` files of the run directories under ``runs`` say, with a snapshot
    of how each job ended: as recorded, or ``"interrupted"`` at its newest checkpoint if it
    was running when its server died. A run directory without a readable ``job.json`` is no
    job of this service's and is skipped with a warning."""
    jobs = []
    for run_dir in sorted(runs.glob("job-*")) if runs.is_dir() else []:
        try:
            data = json.loads(read_regular(run_dir / JOB_FILE))
            spec, outcome = parse_spec(data["spec"]), data["outcome"]
            created = float(data["created"])
            if data["id"] != run_dir.name or not isinstance(outcome, dict | None):
                raise ValueError("its fields do not match its directory")
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            logger.warning("%s: not a job this service can list (%s)", run_dir, exc)
            continue
        interrupted = {
            "name": run_dir.name, "status": "interrupted", **newest_checkpoint(run_dir),
            "step": 0, "num_epochs": spec["epochs"], "num_steps": None, "steps_per_s": 0.0,
            "samples_per_s": 0.0, "metrics": {}, "stop_reason": None, "error": None, "time": 0.0,
        }  # fmt: skip
        record = interrupted if outcome is None else {**interrupted, **outcome}
        jobs.append({"id": run_dir.name, "spec": spec, "run_dir": run_dir, "created": created,
                     "record": record})  # fmt: skip
    return jobs


def hold_runs(runs: Path) -> IO[str]:
    """Lock ``runs`` for this server's life (the lock goes with the process, however it
    ends). A second server on the same directory is refused: it would take the first one's
    running jobs for interrupted ones."""
    runs.mkdir(parents=True, exist_ok=True)
    path = runs / ".server.lock"
    try:  # never through a link: the pid is written into it
        file = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "a+")
    except OSError as exc:
        raise RuntimeError(f"--runs {runs}: cannot use {path} as its lock ({exc})") from None
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.seek(0)
        holder = file.read().strip() or "a server"
        file.close()
        raise RuntimeError(
            f"--runs {runs} is in use by another server ({holder}); give each server a "
            "directory of its own"
        ) from None
    file.truncate(0)
    file.write(f"pid {os.getpid()}")
    file.flush()
    return file


class Begun(Callback):
    """Sets ``event`` as the loop begins. A Checkpoint or a Profiler takes a request from
    its loop's ``fit()`` on, and a job just started over HTTP may not have got there (its
    task has not run yet, or writes ``job.json`` first): its routes wait for this. (Listed
    last of the callbacks that run last, it sets it after their ``on_loop_begin``.)"""

    runs_last = True

    def __init__(self, event: anyio.Event) -> None:
        self.event = event

    async def on_loop_begin(self, state: LoopState) -> None:
        self.event.set()


@dataclasses.dataclass
class Job:
    """A job of this server (``trainer`` set) or one an earlier server ran (``record``: what
    its ``job.json`` says)."""

    id: str
    spec: dict[str, Any]
    run_dir: Path
    created: float
    trainer: Trainer | None = None
    checkpoint: Checkpoint | None = None
    profiler: Profiler | None = None
    record: dict[str, Any] | None = None
    scope: anyio.CancelScope = dataclasses.field(default_factory=anyio.CancelScope)
    done: anyio.Event = dataclasses.field(default_factory=anyio.Event)
    error: str | None = None
    #: Set once how the job ended is in its ``job.json`` (``done`` is set before that).
    recorded: anyio.Event = dataclasses.field(default_factory=anyio.Event)
    #: The ``recorded`` of the run this one continues: it writes ``job.json`` after that.
    after: anyio.Event | None = None
    #: Set once the job's callbacks have begun (from then on they take what is asked of
    #: them: a checkpoint, a profile), or once it has ended without.
    begun: anyio.Event = dataclasses.field(default_factory=anyio.Event)
    #: The save asked for over HTTP that has not been written yet: the asks made meanwhile
    #: share it (asked of a paused job in a loop, each had kept a future until it resumed).
    save_asked: AwaitableFuture[Path | None] | None = None

    def ask_for_a_save(self) -> AwaitableFuture[Path | None]:
        """The next save's future, asked for once however often this is called before it."""
        assert self.checkpoint is not None
        if self.save_asked is None or self.save_asked.done():
            self.save_asked = self.checkpoint.request_save()
        return self.save_asked

    def snapshot(self) -> dict[str, Any]:
        if self.trainer is not None:
            return snapshot_json(self.trainer.snapshot())
        assert self.record is not None
        return self.record

    def can_continue(self) -> bool:
        """Ended before its last epoch without failing: stopped (over HTTP or by a shutdown),
        or interrupted by the server's death."""
        snapshot = self.snapshot()
        stopped = snapshot["status"] == "finished" and snapshot["stop_reason"] is not None
        return self.done.is_set() and (stopped or snapshot["status"] == "interrupted")

    def describe(self) -> dict[str, Any]:
        # The newest checkpoint and trace this server has written of the job.
        last = self.checkpoint.last_path if self.checkpoint is not None else None
        traces = self.profiler.traces if self.profiler is not None else []
        return {
            "id": self.id,
            "spec": self.spec,
            "error": self.error,
            **self.snapshot(),
            "can_continue": self.can_continue(),
            "last_checkpoint": last.name if last is not None else None,
            "last_trace": traces[-1].name if traces else None,
        }

    def file(self, outcome: dict[str, Any] | None) -> dict[str, Any]:
        """What ``job.json`` holds: the spec, and once the job has ended, how it ended."""
        return {"id": self.id, "spec": self.spec, "created": self.created, "outcome": outcome}


class TooBusy(Exception):
    pass


class CannotContinue(Exception):
    pass


class JobManager:
    """Owns the jobs: each runs as a task in the manager's task group.

    At most ``max_running`` jobs run at once; of the ended ones that cannot be continued,
    the newest ``keep_finished`` stay listed, so memory stays bounded however many jobs come
    and go. Every job's ``job.json`` is written off the event loop.
    """

    def __init__(
        self, runs: Path, tg: anyio.abc.TaskGroup, *, max_running: int, keep_finished: int
    ) -> None:
        self.runs = runs
        self.tg = tg
        self.max_running = max_running
        self.keep_finished = keep_finished
        self.jobs: dict[str, Job] = {}
        self.closing = False

    def running(self) -> int:
        return sum(not job.done.is_set() for job in self.jobs.values())

    def _new_run_dir(self) -> tuple[str, Path]:
        """A fresh id and a directory no job (of this or an earlier server) has used."""
        self.runs.mkdir(parents=True, exist_ok=True)
        while True:
            job_id = f"job-{uuid.uuid4().hex[:12]}"
            with contextlib.suppress(FileExistsError):
                (self.runs / job_id).mkdir()
                return job_id, self.runs / job_id

    def _check_room(self) -> None:
        if self.running() >= self.max_running:
            raise TooBusy(f"{self.max_running} jobs are running (the most allowed); retry later")

    def start(self, spec: dict[str, Any]) -> Job:
        self._check_room()
        job_id, run_dir = self._new_run_dir()
        return self._launch(Job(job_id, spec, run_dir, created=time.time()), resume=False)

    def continue_job(self, job: Job) -> Job:
        """Start ``job`` again from its newest checkpoint (from the start if it has none)."""
        if not job.can_continue():
            status = job.snapshot()["status"]
            if not job.done.is_set():
                raise CannotContinue(f"job {job.id} is {status}")
            raise CannotContinue(
                f"job {job.id} ended {status!r} and cannot be continued: only a job stopped "
                "before its end, or interrupted, can"
            )
        self._check_room()
        del self.jobs[job.id]  # listed again, as the newest
        again = Job(job.id, job.spec, job.run_dir, job.created, after=job.recorded)
        return self._launch(again, resume=True)

    def _launch(self, job: Job, *, resume: bool) -> Job:
        spec = job.spec
        train, val = digits_data(spec["batch_size"])
        model = nn.Sequential(
            nn.Linear(64, spec["hidden"]), nn.ReLU(), nn.Linear(spec["hidden"], 10)
        )
        # Every 5 epochs, and at least once a minute of training: a server killed under a
        # job loses a minute of it at most.
        job.checkpoint = Checkpoint(job.run_dir, every_n_epochs=5, every_n_seconds=60, keep_last=1)
        job.profiler = Profiler(job.run_dir / "profile", on_demand=True)  # when asked over HTTP
        job.trainer = Trainer(
            model,
            train,
            lambda m: torch.optim.Adam(m.parameters(), lr=spec["lr"]),
            loss_fn=nn.CrossEntropyLoss(),
            num_epochs=spec["epochs"],
            name=job.id,
            # The data is a small in-memory tensor set: reading it on the compute thread is
            # cheaper than a prefetch thread competing for the GIL with the server.
            prefetch=0,
            # Continued: from the newest checkpoint, if the job had written one.
            resume_from=resumable(job.run_dir) if resume else None,
            callbacks=[
                Validation(val, loss_fn=nn.CrossEntropyLoss()),
                job.checkpoint,
                job.profiler,
                Begun(job.begun),
            ],
        )
        self.jobs[job.id] = job
        self.tg.start_soon(self._run, job)
        return job

    async def _run(self, job: Job) -> None:
        assert job.trainer is not None
        try:
            with job.scope:
                if job.after is not None:  # the run it continues has recorded its end
                    await job.after.wait()
                # Running (again): a later server finds the job interrupted unless it ends.
                path = job.run_dir / JOB_FILE
                await anyio.to_thread.run_sync(write_json, path, job.file(None))
                await job.trainer.fit()
        except Exception as exc:  # one job's failure is reported on it, never on the service
            job.error = repr(exc)
        finally:
            job.done.set()
            job.begun.set()  # (if it ended before it began: nobody waits for that)
            self._evict()
            with anyio.CancelScope(shield=True):
                await self._record(job)

    async def _record(self, job: Job) -> None:
        """Write how ``job`` ended into its ``job.json``; a failure to is logged, not raised."""
        outcome = {**job.snapshot(), "error": job.error}
        try:
            await anyio.to_thread.run_sync(write_json, job.run_dir / JOB_FILE, job.file(outcome))
        except OSError as exc:
            logger.error("could not record how job %s ended: %s", job.id, exc)
        finally:
            job.recorded.set()

    async def recover(self) -> list[Job]:
        """List the jobs earlier servers ran on ``runs`` (oldest first); return those their
        server's end interrupted (it died under them, or its shutdown stopped them)."""
        jobs = []
        for found in await anyio.to_thread.run_sync(read_jobs, self.runs):
            job = Job(found["id"], found["spec"], found["run_dir"], found["created"])
            job.record = found["record"]
            job.error = found["record"]["error"]
            job.done.set()
            job.recorded.set()
            jobs.append(job)
        self.jobs = {job.id: job for job in sorted(jobs, key=lambda job: job.created)}
        self._evict()
        return [  # stopped by a shutdown, or still running when their server died
            job
            for job in self.jobs.values()
            if job.can_continue() and job.snapshot()["stop_reason"] in (None, SHUTDOWN)
        ]

    async def forget(self, job: Job) -> None:
        """Drop an ended job that could be continued: it is recorded as cancelled."""
        job.record = {**job.snapshot(), "status": "cancelled"}  # no longer to continue
        job.trainer = None
        self._evict()
        await job.recorded.wait()  # after its run's own record
        await self._record(job)

    def _evict(self) -> None:
        ended = [job_id for job_id, job in self.jobs.items() if job.done.is_set()]
        over = [job_id for job_id in ended if not self.jobs[job_id].can_continue()]
        for job_id in over[: max(0, len(over) - self.keep_finished)]:
            del self.jobs[job_id]  # oldest first: dicts keep insertion order

    def begin_shutdown(self) -> None:
        """Refuse new jobs and stop the running ones: their event streams end with them."""
        self.closing = True
        for job in self.jobs.values():
            if job.trainer is not None:
                job.trainer.stop(SHUTDOWN)

    async def shutdown(self) -> None:
        """Stop every job gracefully (final checkpoints included) and wait for them."""
        self.begin_shutdown()
        for job in list(self.jobs.values()):
            await job.done.wait()


def create_app(
    runs: Path,
    *,
    max_running: int = 4,
    keep_finished: int = 100,
    continue_interrupted: bool = False,
) -> Starlette:
    """The service. ``app.state.begin_shutdown()`` (from any thread, e.g. a signal handler)
    stops every job at once, so that open event streams end instead of holding the server."""
    if max_running < 1 or keep_finished < 0:  # (none could ever run; a negative count)
        raise ValueError(
            f"max_running must be at least 1 and keep_finished at least 0, got {max_running} "
            f"and {keep_finished}"
        )
    manager: JobManager | None = None

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal manager
        loop = asyncio.get_running_loop()
        lock = await anyio.to_thread.run_sync(hold_runs, runs)
        try:
            async with anyio.create_task_group() as tg:
                manager = JobManager(runs, tg, max_running=max_running, keep_finished=keep_finished)
                app.state.begin_shutdown = lambda: loop.call_soon_threadsafe(manager.begin_shutdown)
                interrupted = await manager.recover()
                for job in interrupted if continue_interrupted else []:
                    try:
                        manager.continue_job(job)
                    except TooBusy:
                        break  # the rest stay listed, to continue over HTTP
                try:
                    yield
                finally:
                    with anyio.CancelScope(shield=True):
                        await manager.shutdown()
        finally:
            lock.close()  # the next server may go on with the jobs

    def too_busy(exc: TooBusy) -> Response:
        return JSONResponse({"error": str(exc)}, status_code=429, headers={"Retry-After": "5"})

    def job_or_404(request: Request) -> Job:
        assert manager is not None
        job = manager.jobs.get(request.path_params["job_id"])
        if job is None:
            raise LookupError(request.path_params["job_id"])
        return job

    async def create_job(request: Request) -> Response:
        assert manager is not None
        if manager.closing:
            return JSONResponse({"error": "the service is shutting down"}, status_code=503)
        try:
            spec = parse_spec(json.loads(await read_body(request) or b"{}"))
        except BodyTooLarge:
            return JSONResponse(
                {"error": f"the body is over {MAX_BODY} bytes; a spec is a small JSON object"},
                status_code=413,
            )
        except (SpecError, ValueError, RecursionError) as exc:
            # ValueError: invalid JSON or UTF-8, or an integer too long to convert;
            # RecursionError: JSON nested deeper than the parser goes.
            reason = str(exc) if isinstance(exc, ValueError) else "JSON nested too deeply"
            return JSONResponse({"error": f"invalid job spec: {reason}"}, status_code=422)
        except ClientDisconnect:
            return Response(status_code=400)
        try:
            job = manager.start(spec)
        except TooBusy as exc:
            return too_busy(exc)
        return JSONResponse(job.describe(), status_code=201)

    async def list_jobs(request: Request) -> Response:
        assert manager is not None
        return JSONResponse([job.describe() for job in manager.jobs.values()])

    async def get_job(request: Request) -> Response:
        return JSONResponse(job_or_404(request).describe())

    async def control(request: Request) -> Response:
        assert manager is not None
        job = job_or_404(request)
        action = request.path_params["action"]
        if action == "continue":
            if manager.closing:
                return JSONResponse({"error": "the service is shutting down"}, status_code=503)
            try:
                job = manager.continue_job(job)
            except CannotContinue as exc:
                return JSONResponse({"error": str(exc)}, status_code=409)
            except TooBusy as exc:
                return too_busy(exc)
            return JSONResponse(job.describe(), status_code=202)
        if action not in ("pause", "resume", "stop", "checkpoint", "profile"):
            return JSONResponse({"error": f"unknown action {action!r}"}, status_code=404)
        if job.trainer is None or job.checkpoint is None or job.profiler is None:
            # a job an earlier server ran
            return JSONResponse(
                {"error": f"job {job.id} is not running; continue it first"}, status_code=409
            )
        if action in ("checkpoint", "profile"):
            # Asked of a job just started (or continued), they wait for it to begin: before,
            # a checkpoint asked then was answered 202 and never saved.
            await job.begun.wait()
            if job.done.is_set():
                status = job.snapshot()["status"]
                return JSONResponse({"error": f"job {job.id} is {status}"}, status_code=409)
        if action == "checkpoint":
            saved = job.ask_for_a_save()  # at its next step (once resumed, if paused)
            if request.query_params.get("wait") == "true":
                try:
                    path = await saved  # (a request given up leaves it to the others)
                except CheckpointError as exc:  # the job ended, or failed, before it
                    return JSONResponse({"error": str(exc)}, status_code=409)
                assert path is not None  # (one process: it writes the file)
                return JSONResponse({"checkpoint": path.name, **job.describe()})
        elif action == "profile":
            traced = job.profiler.request_trace()
            if traced.done() and isinstance(traced.exception(), ProfilerError):
                # torch's profiler records one loop at a time
                why = "a job of this server is being profiled, or this one has just ended"
                return JSONResponse({"error": f"{why}; ask again later"}, status_code=409)
            if request.query_params.get("wait") == "true":
                try:
                    trace = await traced
                except ProfilerError as exc:  # the job ended before it recorded a step
                    return JSONResponse({"error": str(exc)}, status_code=409)
                except OSError as exc:
                    error = f"the trace could not be written: {exc}"
                    return JSONResponse({"error": error}, status_code=500)
                return JSONResponse({"trace": trace.name, **job.describe()})
        elif action == "pause":
            job.trainer.pause()
        elif action == "resume":
            job.trainer.resume()
        else:
            job.trainer.stop("stopped over HTTP")
        return JSONResponse(job.describe(), status_code=202)

    async def cancel_job(request: Request) -> Response:
        """Cancel a running job; forget one that could be continued."""
        assert manager is not None
        job = job_or_404(request)
        if job.can_continue():
            await manager.forget(job)
        job.scope.cancel()
        return JSONResponse(job.describe(), status_code=202)

    async def job_events(request: Request) -> Response:
        job = job_or_404(request)
        if job.trainer is None:  # a job an earlier server ran: its end is all there is
            end = {"kind": "end", "dropped": 0, **job.snapshot()}
            body = f"event: end\ndata: {json.dumps(end)}\n\n"
            return Response(body, media_type="text/event-stream")
        events = job.trainer.events(progress_every=0.5)

        async def stream() -> AsyncIterator[str]:
            async with events:
                event: LoopEvent
                async for event in events:
                    data = {
                        "kind": event.kind.value,
                        "dropped": event.dropped,
                        **snapshot_json(event.snapshot),
                    }
                    yield f"event: {event.kind.value}\ndata: {json.dumps(data)}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def not_found(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": f"no job {exc}"}, status_code=404)

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/jobs", create_job, methods=["POST"]),
            Route("/jobs", list_jobs, methods=["GET"]),
            Route("/jobs/{job_id}", get_job, methods=["GET"]),
            Route("/jobs/{job_id}", cancel_job, methods=["DELETE"]),
            Route("/jobs/{job_id}/events", job_events, methods=["GET"]),
            Route("/jobs/{job_id}/{action}", control, methods=["POST"]),
        ],
        lifespan=lifespan,
        exception_handlers={LookupError: not_found},
    )


class ServiceServer(uvicorn.Server):
    """uvicorn's server, but SIGINT/SIGTERM first stops the jobs: uvicorn would otherwise
    wait for open event streams to close before the app's shutdown could end them."""

    def __init__(self, config: uvicorn.Config, app: Starlette) -> None:
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig: int, frame: Any) -> None:
        begin = getattr(self.app.state, "begin_shutdown", None)
        if begin is not None:  # set once the app has started
            begin()
        super().handle_exit(sig, frame)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--runs", type=Path, default=Path("runs/service"))
    parser.add_argument("--max-running", type=int, default=4)
    parser.add_argument("--keep-finished", type=int, default=100)
    parser.add_argument(
        "--continue-interrupted",
        action="store_true",
        help="at start-up, continue the jobs the last server's end interrupted",
    )
    args = parser.parse_args()
    if not 1 <= args.port <= 65535:  # (uvloop took 99999 modulo 65536 and said it was there)
        parser.error(f"argument --port: must be in 1..65535, got {args.port}")
    for name, least in (("max_running", 1), ("keep_finished", 0)):
        if getattr(args, name) < least:
            option = name.replace("_", "-")
            parser.error(
                f"argument --{option}: must be at least {least}, got {getattr(args, name)}"
            )
    app = create_app(
        args.runs,
        max_running=args.max_running,
        keep_finished=args.keep_finished,
        continue_interrupted=args.continue_interrupted,
    )
    config = uvicorn.Config(app, host=args.host, port=args.port, loop="uvloop", log_level="info")
    # Before serving: what the first job would import (its imports paused every route for
    # up to 170 ms), then the objects start-up made moved out of the garbage collector's
    # sight (its full collections pause every route too, for as long as they walk them).
    asynchat.preload(freeze=True)
    ServiceServer(config, app).run()


if __name__ == "__main__":
    main()
