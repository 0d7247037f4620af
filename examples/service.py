"""A training service: start, watch, pause, resume, stop and cancel jobs over HTTP.

    python examples/service.py [--host 127.0.0.1] [--port 8000] [--runs runs/service]
                               [--max-running 4] [--keep-finished 100]

An ASGI app (Starlette, served by uvicorn) whose training jobs run in the same event loop as
the server, each on its own compute thread, so every route answers while models train:

    POST   /jobs                      start a job from a JSON spec -> 201 {"id": ...}
    GET    /jobs                      every job's snapshot
    GET    /jobs/{id}                 one job's spec and snapshot
    GET    /jobs/{id}/events          Server-Sent Events until the job ends
    POST   /jobs/{id}/pause|resume|stop
    DELETE /jobs/{id}                 cancel the job
    GET    /health                    liveness

A spec is ``{"epochs": 20, "lr": 0.002, "batch_size": 32, "hidden": 128}`` (all optional);
jobs train an MLP on scikit-learn's digits with validation and checkpoints. A bad spec gets a
422 naming the field (also for JSON nested too deep or numbers too long to parse), a body
over 64 KiB a 413, a new job past ``--max-running`` running ones a 429.

Each job gets a fresh id (unique across restarts) and a run directory of its own under
``--runs``, so no job ever prunes another's checkpoints. Only the newest ``--keep-finished``
finished jobs stay listed; older ones are forgotten (their files stay on disk).

SIGINT or SIGTERM stops every job gracefully at once (each writes its final checkpoint),
which also ends every open event stream, then the server exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

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

from asynchat import LoopEvent, LoopSnapshot, Trainer
from asynchat.callbacks import Checkpoint, Validation

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
    data = dataclasses.asdict(snapshot)
    data["status"] = snapshot.status.value
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


@dataclasses.dataclass
class Job:
    id: str
    spec: dict[str, Any]
    trainer: Trainer
    scope: anyio.CancelScope = dataclasses.field(default_factory=anyio.CancelScope)
    done: anyio.Event = dataclasses.field(default_factory=anyio.Event)
    error: str | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "spec": self.spec,
            "error": self.error,
            **snapshot_json(self.trainer.snapshot()),
        }


class TooBusy(Exception):
    pass


class JobManager:
    """Owns the jobs: each runs as a task in the manager's task group.

    At most ``max_running`` jobs run at once; of the finished ones, the newest
    ``keep_finished`` stay listed, so memory stays bounded however many jobs come and go.
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

    def start(self, spec: dict[str, Any]) -> Job:
        if self.running() >= self.max_running:
            raise TooBusy(f"{self.max_running} jobs are running (the most allowed); retry later")
        job_id, run_dir = self._new_run_dir()
        train, val = digits_data(spec["batch_size"])
        model = nn.Sequential(
            nn.Linear(64, spec["hidden"]), nn.ReLU(), nn.Linear(spec["hidden"], 10)
        )
        trainer = Trainer(
            model,
            train,
            lambda m: torch.optim.Adam(m.parameters(), lr=spec["lr"]),
            loss_fn=nn.CrossEntropyLoss(),
            num_epochs=spec["epochs"],
            name=job_id,
            # The data is a small in-memory tensor set: reading it on the compute thread is
            # cheaper than a prefetch thread competing for the GIL with the server.
            prefetch=0,
            callbacks=[
                Validation(val, loss_fn=nn.CrossEntropyLoss()),
                Checkpoint(run_dir, every_n_epochs=5, keep_last=1),
            ],
        )
        job = Job(job_id, spec, trainer)
        self.jobs[job_id] = job
        self.tg.start_soon(self._run, job)
        return job

    async def _run(self, job: Job) -> None:
        try:
            with job.scope:
                await job.trainer.fit()
        except Exception as exc:  # one job's failure is reported on it, never on the service
            job.error = repr(exc)
        finally:
            job.done.set()
            self._evict()

    def _evict(self) -> None:
        finished = [job_id for job_id, job in self.jobs.items() if job.done.is_set()]
        for job_id in finished[: max(0, len(finished) - self.keep_finished)]:
            del self.jobs[job_id]  # oldest first: dicts keep insertion order

    def begin_shutdown(self) -> None:
        """Refuse new jobs and stop the running ones: their event streams end with them."""
        self.closing = True
        for job in self.jobs.values():
            job.trainer.stop("the service is shutting down")

    async def shutdown(self) -> None:
        """Stop every job gracefully (final checkpoints included) and wait for them."""
        self.begin_shutdown()
        for job in list(self.jobs.values()):
            await job.done.wait()


def create_app(runs: Path, *, max_running: int = 4, keep_finished: int = 100) -> Starlette:
    """The service. ``app.state.begin_shutdown()`` (from any thread, e.g. a signal handler)
    stops every job at once, so that open event streams end instead of holding the server."""
    manager: JobManager | None = None

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal manager
        loop = asyncio.get_running_loop()
        async with anyio.create_task_group() as tg:
            manager = JobManager(runs, tg, max_running=max_running, keep_finished=keep_finished)
            app.state.begin_shutdown = lambda: loop.call_soon_threadsafe(manager.begin_shutdown)
            try:
                yield
            finally:
                with anyio.CancelScope(shield=True):
                    await manager.shutdown()

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
            return JSONResponse({"error": str(exc)}, status_code=429, headers={"Retry-After": "5"})
        return JSONResponse(job.describe(), status_code=201)

    async def list_jobs(request: Request) -> Response:
        assert manager is not None
        return JSONResponse([job.describe() for job in manager.jobs.values()])

    async def get_job(request: Request) -> Response:
        return JSONResponse(job_or_404(request).describe())

    async def control(request: Request) -> Response:
        job = job_or_404(request)
        action = request.path_params["action"]
        if action == "pause":
            job.trainer.pause()
        elif action == "resume":
            job.trainer.resume()
        elif action == "stop":
            job.trainer.stop("stopped over HTTP")
        else:
            return JSONResponse({"error": f"unknown action {action!r}"}, status_code=404)
        return JSONResponse(job.describe(), status_code=202)

    async def cancel_job(request: Request) -> Response:
        job = job_or_404(request)
        job.scope.cancel()
        return JSONResponse(job.describe(), status_code=202)

    async def job_events(request: Request) -> Response:
        job = job_or_404(request)
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
    args = parser.parse_args()
    app = create_app(args.runs, max_running=args.max_running, keep_finished=args.keep_finished)
    config = uvicorn.Config(app, host=args.host, port=args.port, loop="uvloop", log_level="info")
    ServiceServer(config, app).run()


if __name__ == "__main__":
    main()
