"""Health-endpoint latency of the example service while 0, 1 and 4 jobs train.

The same route is measured (a) on ``examples/service.py``, whose jobs are asynchat Trainers
in the server's event loop, and (b) on a service that trains the naive way: a hand-written
loop in ``anyio.to_thread.run_sync`` (what ``asyncio.to_thread`` does), same model and data.
Each case: a real uvicorn server on 127.0.0.1 and an HTTP client in the same process issuing
sequential ``GET /health`` requests; p50 and p99 of the round trip.

Run: python benchmarks/service_latency.py [--requests 400]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import anyio
import httpx
import torch
import uvicorn
from _common import machine, median, percentile, table
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def load_service() -> Any:
    spec = importlib.util.spec_from_file_location(
        "service_example", ROOT / "examples" / "service.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def naive_app(service: Any) -> Starlette:
    """Trains with a hand-written loop in a worker thread per job."""
    stop = threading.Event()

    def train(spec: dict[str, Any]) -> None:
        loader, _ = service.digits_data(spec["batch_size"])
        model = nn.Sequential(
            nn.Linear(64, spec["hidden"]), nn.ReLU(), nn.Linear(spec["hidden"], 10)
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=spec["lr"])
        loss_fn = nn.CrossEntropyLoss()
        while not stop.is_set():
            for inputs, targets in loader:
                loss = loss_fn(model(inputs), targets)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                loss.item()
                if stop.is_set():
                    return

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            app.state.tg = tg
            yield
            stop.set()

    async def start(request: Request) -> Response:
        spec = service.parse_spec(await request.json())
        request.app.state.tg.start_soon(anyio.to_thread.run_sync, train, spec)
        return JSONResponse({"ok": True}, status_code=201)

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[Route("/health", health), Route("/jobs", start, methods=["POST"])],
        lifespan=lifespan,
    )


@asynccontextmanager
async def serve(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        while not server.started:  # noqa: ASYNC110 - uvicorn offers no event for this
            await anyio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
        server.should_exit = True


async def latencies(make_app: Callable[[], Starlette], jobs: int, requests: int) -> list[float]:
    async with serve(make_app()) as client:
        for _ in range(jobs):
            response = await client.post("/jobs", json={"epochs": 1000, "hidden": 256})
            assert response.status_code == 201
        await anyio.sleep(1.0)  # let the jobs get going
        times = []
        for _ in range(requests):
            start = time.perf_counter()
            response = await client.get("/health")
            times.append(time.perf_counter() - start)
            assert response.status_code == 200
        return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=400)
    args = parser.parse_args()
    service = load_service()
    rows = []
    with TemporaryDirectory() as runs:
        variants: dict[str, Callable[[], Starlette]] = {
            "asynchat service": lambda: service.create_app(Path(runs)),
            "naive (hand loop in to_thread)": lambda: naive_app(service),
        }
        for jobs in (0, 1, 4):
            for label, make_app in variants.items():
                times = anyio.run(
                    latencies, make_app, jobs, args.requests, backend_options={"use_uvloop": True}
                )
                p50, p99 = median(times) * 1e3, percentile(times, 99) * 1e3
                rows.append((label, jobs, f"{p50:.2f}", f"{p99:.2f}", f"{max(times) * 1e3:.2f}"))
    print(f"machine: {machine()}")
    print(f"GET /health, {args.requests} sequential requests per case, uvicorn + uvloop, 127.0.0.1")
    print(table(["service", "jobs training", "p50 ms", "p99 ms", "max ms"], rows))


if __name__ == "__main__":
    main()
