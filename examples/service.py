"""A training service: start, watch, pause, resume, stop and cancel jobs over HTTP.

    python examples/service.py [--host 127.0.0.1] [--port 8000] [--runs runs/service]

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
422 naming the field. Shutting the server down stops every job gracefully (each writes its
final checkpoint) and waits for them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import torch
import uvicorn
from sklearn.datasets import load_digits
from starlette.applications import Starlette
from starlette.requests import Request
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


class SpecError(ValueError):
    pass


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


class JobManager:
    """Owns the jobs: each runs as a task in the manager's task group."""

    def __init__(self, runs: Path, tg: anyio.abc.TaskGroup) -> None:
        self.runs = runs
        self.tg = tg
        self.jobs: dict[str, Job] = {}
        self._ids = itertools.count(1)

    def start(self, spec: dict[str, Any]) -> Job:
        job_id = f"job-{next(self._ids)}"
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
                Checkpoint(self.runs / job_id, every_n_epochs=5, keep_last=1),
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

    async def shutdown(self) -> None:
        """Stop every job gracefully (final checkpoints included) and wait for them."""
        for job in self.jobs.values():
            job.trainer.stop("the service is shutting down")
        for job in self.jobs.values():
            await job.done.wait()


def create_app(runs: Path) -> Starlette:
    manager: JobManager | None = None

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal manager
        async with anyio.create_task_group() as tg:
            manager = JobManager(runs, tg)
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
        try:
            spec = parse_spec(json.loads(await request.body() or b"{}"))
        except (SpecError, json.JSONDecodeError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=422)
        job = manager.start(spec)
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--runs", type=Path, default=Path("runs/service"))
    args = parser.parse_args()
    uvicorn.run(
        create_app(args.runs), host=args.host, port=args.port, loop="uvloop", log_level="info"
    )


if __name__ == "__main__":
    main()
