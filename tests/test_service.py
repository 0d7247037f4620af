"""The example service, end to end: a real uvicorn server on 127.0.0.1 and an HTTP client."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from conftest import load_example

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.parametrize("anyio_backend", [("asyncio", {"use_uvloop": True})], ids=["uvloop"]),
]


@asynccontextmanager
async def running_server(runs: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = load_example("service.py").create_app(runs)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        with anyio.fail_after(30):
            while not server.started:  # noqa: ASYNC110 - uvicorn offers no event for this
                await anyio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
        server.should_exit = True


async def status_becomes(client: httpx.AsyncClient, job: str, wanted: set[str]) -> dict[str, Any]:
    with anyio.fail_after(30):
        while True:
            body: dict[str, Any] = (await client.get(f"/jobs/{job}")).json()
            if body["status"] in wanted:
                return body
            await anyio.sleep(0.02)


async def test_jobs_over_http(tmp_path: Path) -> None:
    async with running_server(tmp_path) as client:
        assert (await client.get("/health")).json() == {"ok": True}
        first = await client.post("/jobs", json={"epochs": 30, "hidden": 64})
        second = await client.post("/jobs", json={"epochs": 1000})
        assert first.status_code == second.status_code == 201
        one, two = first.json()["id"], second.json()["id"]
        assert first.json()["spec"] == {"epochs": 30, "lr": 0.002, "batch_size": 32, "hidden": 64}

        # Follow job one's events (Server-Sent Events) while controlling both jobs.
        kinds: list[str] = []
        final: dict[str, Any] = {}

        async def follow() -> None:
            async with client.stream("GET", f"/jobs/{one}/events") as response:
                assert response.headers["content-type"].startswith("text/event-stream")
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        data = json.loads(line[len("data: ") :])
                        kinds.append(data["kind"])
                        if data["kind"] == "end":
                            final.update(data)

        async with anyio.create_task_group() as tg:
            tg.start_soon(follow)
            await client.post(f"/jobs/{one}/pause")
            paused = await status_becomes(client, one, {"paused"})
            await anyio.sleep(0.2)
            still = (await client.get(f"/jobs/{one}")).json()
            assert still["global_step"] == paused["global_step"], "no step while paused"
            await client.post(f"/jobs/{one}/resume")
            await status_becomes(client, one, {"running", "stopping", "finished"})

            assert (await client.delete(f"/jobs/{two}")).status_code == 202
            await status_becomes(client, two, {"cancelled"})

        assert kinds[-1] == "end" and kinds.count("epoch_end") >= 1
        assert final["status"] == "finished" and final["global_step"] == 30 * 44
        assert "val/loss" in final["metrics"]
        jobs = {job["id"]: job["status"] for job in (await client.get("/jobs")).json()}
        assert jobs == {one: "finished", two: "cancelled"}

        bad = await client.post("/jobs", json={"epochs": "many"})
        assert bad.status_code == 422 and "epochs must be an integer" in bad.json()["error"]
        unknown = await client.post("/jobs", json={"layers": 3})
        assert (
            unknown.status_code == 422 and "unknown field(s) ['layers']" in unknown.json()["error"]
        )
        assert (await client.post("/jobs", json={"lr": 5})).status_code == 422
        assert (await client.get("/jobs/job-99")).status_code == 404


async def test_shutdown_stops_jobs_gracefully_with_a_final_checkpoint(tmp_path: Path) -> None:
    async with running_server(tmp_path) as client:
        job = (await client.post("/jobs", json={"epochs": 1000})).json()["id"]
        await status_becomes(client, job, {"running"})
        with anyio.fail_after(30):
            while (await client.get(f"/jobs/{job}")).json()["global_step"] < 50:  # noqa: ASYNC110
                await anyio.sleep(0.02)
    # The server is down: its lifespan stopped the job and waited for its checkpoint.
    manifest = json.loads((tmp_path / job / "manifest.json").read_text())
    (entry,) = manifest["checkpoints"]
    assert entry["global_step"] >= 50
    assert (tmp_path / job / entry["file"]).exists()
