"""The example service, end to end: a real uvicorn server on 127.0.0.1 and an HTTP client."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from conftest import load_example

from asynchat._launch import free_port

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.parametrize("anyio_backend", [("asyncio", {"use_uvloop": True})], ids=["uvloop"]),
]


@asynccontextmanager
async def running_server(runs: Path, **options: Any) -> AsyncIterator[httpx.AsyncClient]:
    app = load_example("service.py").create_app(runs, **options)
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


async def test_hostile_bodies_get_4xx_and_the_server_stays_up(tmp_path: Path) -> None:
    async with running_server(tmp_path) as client:
        deep = "[" * 50_000 + "]" * 50_000  # 100 kB: over the body limit
        assert (await client.post("/jobs", content=deep)).status_code == 413
        deep = "[" * 20_000 + "]" * 20_000  # 40 kB: parsed, too deep for the parser
        response = await client.post("/jobs", content=deep)
        assert response.status_code == 422 and "nested too deeply" in response.json()["error"]
        huge = '{"epochs": ' + "9" * 5000 + "}"
        response = await client.post("/jobs", content=huge)
        assert response.status_code == 422 and "invalid job spec" in response.json()["error"]
        assert (await client.post("/jobs", content=b"x" * 200_000)).status_code == 413
        assert (await client.get("/health")).json() == {"ok": True}


async def test_running_jobs_are_capped_and_finished_ones_evicted(tmp_path: Path) -> None:
    async with running_server(tmp_path, max_running=2, keep_finished=3) as client:
        first = [(await client.post("/jobs", json={"epochs": 1000})).json()["id"] for _ in "ab"]
        busy = await client.post("/jobs", json={"epochs": 1})
        assert busy.status_code == 429 and busy.headers["retry-after"] == "5"
        for job in first:
            await client.delete(f"/jobs/{job}")
            await status_becomes(client, job, {"cancelled"})
        finished: list[str] = []
        for _ in range(6):  # one at a time, each to its end
            job = (await client.post("/jobs", json={"epochs": 1, "batch_size": 256})).json()["id"]
            await status_becomes(client, job, {"finished"})
            finished.append(job)
        listed = [job["id"] for job in (await client.get("/jobs")).json()]
        assert listed == finished[-3:], "only the newest 3 finished jobs stay listed"
        assert (await client.get(f"/jobs/{first[0]}")).status_code == 404
    # Every job had a directory of its own; evicted jobs' checkpoints stay on disk.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*first, *finished])


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


def serve(runs: Path, port: int) -> subprocess.Popen[str]:
    """The example service as its README starts it, in a process of its own."""
    server = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "service.py"), "--port", str(port), "--runs", str(runs)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    with anyio.from_thread.start_blocking_portal() as portal:
        portal.call(wait_for_health, port)
    return server


async def wait_for_health(port: int) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        with anyio.fail_after(60):
            while True:
                try:
                    if (await client.get("/health")).status_code == 200:
                        return
                except httpx.TransportError:
                    await anyio.sleep(0.1)


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_signal_stops_the_server_and_ends_open_event_streams(
    tmp_path: Path, how: signal.Signals
) -> None:
    port = free_port()
    server = await anyio.to_thread.run_sync(serve, tmp_path, port)
    events: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        job = (await client.post("/jobs", json={"epochs": 1000})).json()["id"]
        await status_becomes(client, job, {"running"})
        async with client.stream("GET", f"/jobs/{job}/events") as response:
            server.send_signal(how)  # with the stream open: it must not hold the server up
            with anyio.fail_after(30):
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        events.append(json.loads(line[len("data: ") :]))
    _, log = await anyio.to_thread.run_sync(lambda: server.communicate(timeout=30))
    # uvicorn re-raises the signal once it has shut down, as supervisors expect.
    assert server.returncode in (0, -how), log
    assert "Application shutdown complete" in log
    assert events[-1]["kind"] == "end" and events[-1]["status"] == "finished"
    step = events[-1]["global_step"]
    manifest = json.loads((tmp_path / job / "manifest.json").read_text())
    assert manifest["checkpoints"][-1]["global_step"] == step, "the final checkpoint is there"


async def test_a_restarted_server_never_touches_the_first_ones_checkpoints(tmp_path: Path) -> None:
    kept: dict[str, list[str]] = {}
    for _ in range(2):  # two servers in turn on the same --runs directory
        async with running_server(tmp_path) as client:
            job = (await client.post("/jobs", json={"epochs": 5, "batch_size": 256})).json()["id"]
            await status_becomes(client, job, {"finished"})
        kept[job] = sorted(p.name for p in (tmp_path / job).glob("step-*.ckpt"))
    assert len(kept) == 2, "job ids are unique across restarts"
    for job, files in kept.items():  # each job's checkpoint is still there, untouched
        assert sorted(p.name for p in (tmp_path / job).glob("step-*.ckpt")) == files != []
