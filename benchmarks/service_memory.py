"""Memory of the example service over many jobs: finished jobs are evicted, memory levels off.

An in-process server (`examples/service.py`, `keep_finished=10`, `max_running=4`) gets
``--jobs`` one-epoch jobs, four at a time (a 429 is retried); the process's RSS and the
number of listed jobs are printed along the way.

Run: python benchmarks/service_memory.py [--jobs 250]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import anyio
import httpx
import uvicorn
from _common import machine

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

from conftest import load_example  # noqa: E402

DONE = ("finished", "failed", "cancelled")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def main(jobs: int) -> None:
    print(f"# {machine()}")
    marks = {10, 50, 100, 150, 200, jobs}
    with tempfile.TemporaryDirectory() as runs:
        app = load_example("service.py").create_app(Path(runs), max_running=4, keep_finished=10)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve)
            while not server.started:  # noqa: ASYNC110 - uvicorn offers no event for this
                await anyio.sleep(0.01)
            port = server.servers[0].sockets[0].getsockname()[1]
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
                started = 0
                while started < jobs:
                    response = await c.post("/jobs", json={"epochs": 1, "batch_size": 256})
                    if response.status_code == 429:
                        await anyio.sleep(0.05)
                        continue
                    started += 1
                    if started in marks:
                        listed = len((await c.get("/jobs")).json())
                        print(f"jobs started {started:4d}: RSS {rss_mb():5.0f} MB, listed {listed}")
                while any(j["status"] not in DONE for j in (await c.get("/jobs")).json()):  # noqa: ASYNC110 - polling the HTTP API
                    await anyio.sleep(0.1)
                listed = len((await c.get("/jobs")).json())
                print(f"all finished:      RSS {rss_mb():5.0f} MB, listed {listed}")
            server.should_exit = True


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=250)
    args = parser.parse_args()
    anyio.run(main, args.jobs, backend="asyncio", backend_options={"use_uvloop": True})
