"""The example service, end to end: a real uvicorn server on 127.0.0.1 and an HTTP client."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from conftest import load_example, make_trainer

import asynchat.callbacks._profiler
from asynchat import AwaitableFuture, Callback, LoopState
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
    served = anyio.Event()

    async def serve() -> None:
        try:
            await server.serve()
        finally:
            served.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(serve)
        with anyio.fail_after(30):
            while not server.started:  # noqa: ASYNC110 - uvicorn offers no event for this
                await anyio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                yield client
        finally:
            # Shut the server down (its jobs too) even when the test failed: cancelled
            # instead, its lifespan never stopped the jobs, and a job of 1000 epochs kept the
            # test's event loop from closing.
            server.should_exit = True
            with anyio.CancelScope(shield=True), anyio.fail_after(60):
                await served.wait()


async def status_becomes(client: httpx.AsyncClient, job: str, wanted: set[str]) -> dict[str, Any]:
    return await job_becomes(client, job, lambda body: body["status"] in wanted)


async def job_becomes(
    client: httpx.AsyncClient, job: str, wanted: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    with anyio.fail_after(30):
        while True:
            body: dict[str, Any] = (await client.get(f"/jobs/{job}")).json()
            if wanted(body):
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
    assert sorted(p.name for p in tmp_path.glob("job-*")) == sorted([*first, *finished])


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


async def test_a_running_job_saves_on_request_and_an_ended_one_says_so(tmp_path: Path) -> None:
    async with running_server(tmp_path) as client:
        # Batches of one: 1437 steps an epoch, seconds before its first save (epoch 5).
        spec = {"epochs": 1000, "batch_size": 1}
        job = (await client.post("/jobs", json=spec)).json()["id"]
        asked = await job_becomes(client, job, lambda body: body["global_step"] >= 3)
        assert asked["last_checkpoint"] is None
        assert (await client.post(f"/jobs/{job}/checkpoint")).status_code == 202
        saved = await job_becomes(client, job, lambda body: body["last_checkpoint"] is not None)
        assert saved["status"] == "running" and saved["epoch"] == 0
        [entry] = json.loads((tmp_path / job / "manifest.json").read_text())["checkpoints"]
        assert saved["last_checkpoint"] == entry["file"]
        assert asked["global_step"] <= entry["global_step"] <= saved["global_step"]
        # Asked to wait: the answer comes once the file is written, and names it.
        waited = await client.post(f"/jobs/{job}/checkpoint", params={"wait": "true"})
        assert waited.status_code == 200
        [entry] = json.loads((tmp_path / job / "manifest.json").read_text())["checkpoints"]
        assert waited.json()["checkpoint"] == entry["file"] == waited.json()["last_checkpoint"]
        assert entry["global_step"] > saved["global_step"]  # (keep_last=1: the newest only)
        assert (await client.delete(f"/jobs/{job}")).status_code == 202
        await status_becomes(client, job, {"cancelled"})
        refused = await client.post(f"/jobs/{job}/checkpoint")
        assert refused.status_code == 409
        assert refused.json()["error"] == f"job {job} is cancelled"


async def test_a_checkpoint_asked_of_a_job_just_started_is_saved(tmp_path: Path) -> None:
    # Asked as the POST that started it returned, the job was still "created" (five times
    # in six on this machine): answered 202, the ask was dropped and nothing was saved.
    async with running_server(tmp_path) as client:
        spec = {"epochs": 1000, "batch_size": 1}  # no save of its own for a minute
        job = (await client.post("/jobs", json=spec)).json()["id"]
        assert (await client.post(f"/jobs/{job}/checkpoint")).status_code == 202
        saved = await job_becomes(client, job, lambda body: body["last_checkpoint"] is not None)
        assert saved["status"] == "running"
        other = (await client.post("/jobs", json=spec)).json()["id"]
        waited = await client.post(f"/jobs/{other}/checkpoint", params={"wait": "true"})
        assert waited.status_code == 200, waited.json()
        assert (tmp_path / other / waited.json()["checkpoint"]).is_file()


async def a_paused_job(client: httpx.AsyncClient) -> str:
    """A job started, trained a few steps, then paused: what is asked of it now waits."""
    job: str = (await client.post("/jobs", json={"epochs": 1000, "batch_size": 1})).json()["id"]
    await job_becomes(client, job, lambda body: body["global_step"] >= 3)
    await client.post(f"/jobs/{job}/pause")
    await status_becomes(client, job, {"paused"})
    return job


def unanswered_futures() -> list[AwaitableFuture[Any]]:
    """The futures of this process's asks not yet answered."""
    gc.collect()
    return [o for o in gc.get_objects() if type(o) is AwaitableFuture and not o.done()]


async def test_checkpoints_asked_of_a_paused_job_over_and_over_share_one_save(
    tmp_path: Path,
) -> None:
    # Each ask kept a future of its own until the job was resumed: a client asking in a
    # loop grew the server's memory for as long as the job stayed paused.
    async with running_server(tmp_path) as client:
        job = await a_paused_job(client)
        before = unanswered_futures()
        for _ in range(20):
            assert (await client.post(f"/jobs/{job}/checkpoint")).status_code == 202
        [asked] = [future for future in unanswered_futures() if future not in before]
        waited: list[httpx.Response] = []

        async def wait_for_the_save() -> None:
            waited.append(await client.post(f"/jobs/{job}/checkpoint", params={"wait": "true"}))

        async with anyio.create_task_group() as tasks:
            for _ in range(2):
                tasks.start_soon(wait_for_the_save)
            with anyio.fail_after(30):  # both wait on the one save
                while len(asked._waiting) < 2:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            assert waited == [] and len(unanswered_futures()) == len(before) + 1
            await client.post(f"/jobs/{job}/resume")
        assert [answer.status_code for answer in waited] == [200, 200]
        [saved] = {answer.json()["checkpoint"] for answer in waited}
        assert (tmp_path / job / saved).is_file()
        # Once written, the next ask is a save of its own.
        again = await client.post(f"/jobs/{job}/checkpoint", params={"wait": "true"})
        assert again.status_code == 200 and again.json()["checkpoint"] != saved


async def test_a_running_job_is_profiled_on_request_one_job_at_a_time(tmp_path: Path) -> None:
    async with running_server(tmp_path) as client:
        spec = {"epochs": 1000, "batch_size": 1}
        one, two = [(await client.post("/jobs", json=spec)).json()["id"] for _ in range(2)]
        for job in (one, two):
            await job_becomes(client, job, lambda body: body["global_step"] >= 3)
        assert (await client.get(f"/jobs/{one}")).json()["last_trace"] is None
        # Paused, job one takes its recording once resumed, and holds the session till then
        # (running, it could record its 4 steps before the next request came).
        await client.post(f"/jobs/{one}/pause")
        await status_becomes(client, one, {"paused"})
        assert (await client.post(f"/jobs/{one}/profile")).status_code == 202
        busy = await client.post(f"/jobs/{two}/profile")
        assert busy.status_code == 409 and "being profiled" in busy.json()["error"]
        await client.post(f"/jobs/{one}/resume")
        traced = await job_becomes(client, one, lambda body: body["last_trace"] is not None)
        trace = tmp_path / one / "profile" / traced["last_trace"]
        recorded = {event.get("name") for event in json.loads(trace.read_text())["traceEvents"]}
        assert {"ProfilerStep#1", "ProfilerStep#3", "aten::addmm"} <= recorded
        waited = await client.post(f"/jobs/{two}/profile", params={"wait": "true"})  # its turn
        assert waited.status_code == 200, waited.json()
        assert waited.json()["last_trace"] == waited.json()["trace"]
        assert (tmp_path / two / "profile" / waited.json()["trace"]).is_file()


async def test_a_profile_waited_for_is_refused_once_the_job_ends_before_it(
    tmp_path: Path,
) -> None:
    async with running_server(tmp_path) as client:
        job = await a_paused_job(client)
        answers: list[httpx.Response] = []

        async def profile() -> None:
            answers.append(await client.post(f"/jobs/{job}/profile", params={"wait": "true"}))

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(profile)
            # Asked of the paused job, the recording waits for it to be resumed (holding the
            # process's profiling session); stopped instead, it ends first.
            with anyio.fail_after(30):
                while not asynchat.callbacks._profiler._SESSION.locked():  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            assert answers == []  # still waiting
            await client.post(f"/jobs/{job}/stop")
        [refused] = answers
        assert refused.status_code == 409, refused.json()
        lost = "the recording asked for was not made: the loop ended first"
        assert lost in refused.json()["error"]
        assert (await client.get(f"/jobs/{job}")).json()["last_trace"] is None


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
        # Signalled once it has trained: a run stopped before its first step saves nothing
        # (signalled as it turned "running", a job had no checkpoint, and this test failed
        # once, in a fresh clone's run of the suite).
        await job_becomes(client, job, lambda body: body["global_step"] >= 1)
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


async def wait_for_checkpoint(run_dir: Path, step: int) -> None:
    with anyio.fail_after(60):
        while True:
            try:
                entries = json.loads((run_dir / "manifest.json").read_text())["checkpoints"]
                if any(entry["global_step"] >= step for entry in entries):
                    return
            except (OSError, ValueError):  # not written yet
                pass
            await anyio.sleep(0.02)


async def test_a_job_the_server_died_under_is_continued_from_its_checkpoint(
    tmp_path: Path,
) -> None:
    # The service's jobs were gone with the server: a new one on the same --runs knew
    # nothing of them, and their checkpoints were left for nobody to continue.
    port = free_port()
    server = await anyio.to_thread.run_sync(serve, tmp_path, port)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            spec = {"epochs": 1000, "batch_size": 256}  # 6 steps an epoch, a checkpoint every 5
            job = (await client.post("/jobs", json=spec)).json()["id"]
            await wait_for_checkpoint(tmp_path / job, 60)
    finally:
        server.kill()  # SIGKILL: no shutdown, no final checkpoint
        await anyio.to_thread.run_sync(server.communicate)
    manifest = json.loads((tmp_path / job / "manifest.json").read_text())
    saved = max(entry["global_step"] for entry in manifest["checkpoints"])

    async with running_server(tmp_path, max_running=1) as client:
        listed = (await client.get("/jobs")).json()
        assert [(j["id"], j["status"], j["global_step"], j["can_continue"]) for j in listed] == [
            (job, "interrupted", saved, True)
        ]
        assert listed[0]["spec"] == {**spec, "lr": 0.002, "hidden": 128}
        refused = await client.post(f"/jobs/{job}/pause")
        assert refused.status_code == 409 and "continue it first" in refused.json()["error"]
        ended = (await client.get(f"/jobs/{job}/events")).text
        assert ended.startswith("event: end\n") and '"interrupted"' in ended

        continued = await client.post(f"/jobs/{job}/continue")
        assert continued.status_code == 202, continued.text
        async with client.stream("GET", f"/jobs/{job}/events") as response:
            async for line in response.aiter_lines():
                if line.startswith("data: ") and '"kind": "epoch_begin"' in line:
                    first = json.loads(line[len("data: ") :])
                    break
        # It went on from its checkpoint, at an epoch's end: the next epoch, the same run.
        assert first["global_step"] == saved and first["epoch"] == saved // 6
        assert first["run_id"] == manifest["checkpoints"][-1]["run"]
        with anyio.fail_after(30):
            while (await client.get(f"/jobs/{job}")).json()["global_step"] <= saved:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        again = await client.post(f"/jobs/{job}/continue")
        assert again.status_code == 409 and "is running" in again.json()["error"]
        busy = await client.post("/jobs", json={"epochs": 1})
        assert busy.status_code == 429, "a continued job counts as running"
        await client.post(f"/jobs/{job}/stop")
        stopped = await job_becomes(client, job, lambda body: body["can_continue"])
        assert stopped["global_step"] > saved and stopped["status"] == "finished"

    record = json.loads((tmp_path / job / "job.json").read_text())
    assert record["outcome"]["stop_reason"] == "stopped over HTTP"
    assert record["outcome"]["global_step"] == stopped["global_step"]


async def test_a_new_server_continues_what_the_last_ones_shutdown_stopped(
    tmp_path: Path,
) -> None:
    async with running_server(tmp_path) as client:
        short = (await client.post("/jobs", json={"epochs": 2, "batch_size": 256})).json()["id"]
        await status_becomes(client, short, {"finished"})
        jobs = [(await client.post("/jobs", json={"epochs": 1000})).json()["id"] for _ in "ab"]
        shut, stopped = jobs
        await client.post(f"/jobs/{stopped}/stop")
        await status_becomes(client, stopped, {"finished"})
        await status_becomes(client, shut, {"running"})
    # The shutdown stopped `shut` (with a final checkpoint); `stopped` was stopped over HTTP.
    steps = {
        job: json.loads((tmp_path / job / "job.json").read_text())["outcome"]["global_step"]
        for job in jobs
    }

    async with running_server(tmp_path, continue_interrupted=True) as client:
        listed = {j["id"]: j for j in (await client.get("/jobs")).json()}
        assert list(listed) == [short, stopped, shut], "the continued job is listed as newest"
        assert listed[short]["status"] == "finished" and not listed[short]["can_continue"]
        assert listed[stopped]["can_continue"], "a job stopped over HTTP waits to be asked"
        assert listed[stopped]["global_step"] == steps[stopped]
        assert listed[shut]["status"] in {"created", "running"}
        with anyio.fail_after(30):
            while (await client.get(f"/jobs/{shut}")).json()["global_step"] <= steps[shut]:  # noqa: ASYNC110
                await anyio.sleep(0.02)

        finished = await client.post(f"/jobs/{short}/continue")
        assert finished.status_code == 409 and "cannot be continued" in finished.json()["error"]
        assert (await client.delete(f"/jobs/{stopped}")).status_code == 202
        forgotten = (await client.get(f"/jobs/{stopped}")).json()
        assert forgotten["status"] == "cancelled" and not forgotten["can_continue"]
        assert (await client.post(f"/jobs/{stopped}/continue")).status_code == 409

    async with running_server(tmp_path, continue_interrupted=True) as client:
        listed = {j["id"]: j["status"] for j in (await client.get("/jobs")).json()}
        assert listed[stopped] == "cancelled", "a forgotten job stays forgotten"
        assert listed[shut] in {"created", "running"}, "continued again after this shutdown"


async def test_run_directories_that_are_not_jobs_of_the_service_are_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_server(tmp_path) as client:
        job = (await client.post("/jobs", json={"epochs": 1, "batch_size": 256})).json()["id"]
        await status_becomes(client, job, {"finished"})
    record = json.loads((tmp_path / job / "job.json").read_text())
    hostile = {
        "job-garbage": "{not json",
        "job-renamed": json.dumps({**record, "id": job}),  # copied from another job's directory
        "job-huge": json.dumps({**record, "id": "job-huge", "spec": {"epochs": 10**9}}),
        "job-unknown": json.dumps({**record, "id": "job-unknown", "spec": {"layers": 3}}),
        "job-outcome": json.dumps({**record, "id": "job-outcome", "outcome": [1]}),
        "job-fields": json.dumps({"id": "job-fields"}),
        "job-nested": "[" * 100_000 + "]" * 100_000,  # too deep for json (RecursionError)
    }
    for name, text in hostile.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "job.json").write_text(text)
    (tmp_path / "job-empty").mkdir()  # no job.json
    (tmp_path / "job-fifo").mkdir()  # reading it would wait forever for a writer
    os.mkfifo(tmp_path / "job-fifo" / "job.json")

    async with running_server(tmp_path) as client:
        listed = [j["id"] for j in (await client.get("/jobs")).json()]
    assert listed == [job]
    skipped = {r.getMessage().split(":")[0] for r in caplog.records if r.name == "service"}
    assert skipped == {str(tmp_path / name) for name in [*hostile, "job-empty", "job-fifo"]}


async def test_a_server_lock_that_is_a_link_is_refused_and_never_written_through(
    tmp_path: Path,
) -> None:
    # Regression: it was opened following links, and the server's pid overwrote the target.
    victim, runs = tmp_path / "precious.txt", tmp_path / "runs"
    victim.write_text("precious")
    runs.mkdir()
    (runs / ".server.lock").symlink_to(victim)
    with pytest.raises(RuntimeError, match=r"cannot use .*\.server\.lock as its lock"):
        load_example("service.py").hold_runs(runs)
    assert victim.read_text() == "precious"


async def test_a_second_server_on_the_same_runs_directory_is_refused(tmp_path: Path) -> None:
    # It would have taken the first server's running jobs for interrupted ones.
    first = await anyio.to_thread.run_sync(serve, tmp_path, free_port())
    try:
        command = [sys.executable, str(EXAMPLES / "service.py"), "--runs", str(tmp_path),
                   "--port", str(free_port()), "--continue-interrupted"]  # fmt: skip
        with anyio.fail_after(90):  # started instead, it would serve until killed
            second = await anyio.run_process(command, check=False)
    finally:
        first.terminate()
        _, log = await anyio.to_thread.run_sync(lambda: first.communicate(timeout=30))
    assert second.returncode != 0
    message = f"--runs {tmp_path} is in use by another server (pid {first.pid})"
    assert message in second.stderr.decode(), second.stderr.decode()[-2000:]
    assert "Application shutdown complete" in log, "the first server was left alone"


@pytest.mark.parametrize(
    ("arguments", "error"),
    [(["--port", "99999"], "argument --port: must be in 1..65535, got 99999"),
     (["--max-running", "0"], "argument --max-running: must be at least 1, got 0"),
     (["--keep-finished", "-1"], "argument --keep-finished: must be at least 0, got -1")],
)  # fmt: skip
async def test_the_service_names_a_bad_argument(
    tmp_path: Path, arguments: list[str], error: str
) -> None:
    # --port 99999 started a server that said it ran on 127.0.0.1:99999 (uvloop bound
    # 99999 modulo 65536); --max-running 0 one where every job was refused as "too busy".
    command = [sys.executable, str(EXAMPLES / "service.py"), "--runs", str(tmp_path), *arguments]
    with anyio.fail_after(90):
        done = await anyio.run_process(command, check=False)
    assert done.returncode == 2 and error in done.stderr.decode(), done.stderr.decode()[-2000:]
    with pytest.raises(ValueError, match="max_running must be at least 1"):
        load_example("service.py").create_app(tmp_path, max_running=0)


async def test_a_diverged_jobs_metrics_are_strict_json(tmp_path: Path) -> None:
    # A NaN metric made every JSONResponse that listed the job raise (Starlette refuses
    # NaN): GET /jobs answered 500 for every job; the event stream wrote a bare NaN.
    service = load_example("service.py")

    class Diverged(Callback):
        def on_step_end(self, state: LoopState) -> None:
            state.metrics.update({"val/loss": float("nan"), "train/loss": float("inf")})

    trainer = make_trainer(Diverged(), num_steps=1)
    await trainer.fit()
    data = service.snapshot_json(trainer.snapshot())
    assert data["metrics"] == {"val/loss": None, "train/loss": None}
    json.dumps(data, allow_nan=False)  # as Starlette's JSONResponse renders it
