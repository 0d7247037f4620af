"""The example service's health-route latency as its first job starts, with and without
``asynchat.preload(freeze=True)`` at start-up.

The first optimizer a process builds makes torch import ``torch._dynamo``, on the job's
compute thread; the garbage collections of that import pause every thread, the event loop
among them. ``examples/service.py`` calls ``asynchat.preload(freeze=True)`` (which also
collects and freezes what start-up made) before it serves; the baseline is the same server
with that call made a no-op. Each round starts a server of each
kind (``python examples/service.py`` on 127.0.0.1, its own ``--runs`` directory), polls
``GET /health`` back to back from a client thread, and posts the server's first job: the
table gives the slowest answer and the p99 over the job's first seconds (and over one idle
second before it), medians over the rounds, and the ratio to the baseline's.

Run: python benchmarks/first_job.py [--rounds 3] [--seconds 4]
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from tempfile import TemporaryDirectory

from _common import machine, median, percentile, table

from asynchat._launch import free_port

SERVICE = Path(__file__).resolve().parents[1] / "examples" / "service.py"
#: Runs the example service, with ``asynchat.preload`` made a no-op when asked.
RUN_SERVICE = """
import runpy, sys
import asynchat
if sys.argv.pop(1) == "off":
    asynchat.preload = lambda **_: None
del sys.argv[0]  # (-c)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def request(port: int, method: str = "GET", path: str = "/health", body: str = "") -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"content-type": "application/json"} if body else {}
        connection.request(method, path, body=body or None, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def poll(port: int, seconds: float) -> list[float]:
    """Round-trip seconds of back-to-back health requests for ``seconds``."""
    latencies = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        started = time.perf_counter()
        request(port)
        latencies.append(time.perf_counter() - started)
    return latencies


def first_job(preload: bool, seconds: float) -> tuple[list[float], list[float]]:
    """Health latencies over one idle second, then over the first ``seconds`` of the
    server's first job."""
    port = free_port()
    with TemporaryDirectory() as runs:
        command = [sys.executable, "-c", RUN_SERVICE, "on" if preload else "off", str(SERVICE),
                   "--port", str(port), "--runs", runs]  # fmt: skip
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    request(port)
                    break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise RuntimeError("the service did not start") from None
                    time.sleep(0.1)
            idle = poll(port, 1.0)
            during: list[float] = []
            poller = threading.Thread(target=lambda: during.extend(poll(port, seconds)))
            poller.start()
            status = request(port, "POST", "/jobs", json.dumps({"epochs": 3}))
            poller.join()
            if status != 201:
                raise RuntimeError(f"POST /jobs answered {status}")
            return idle, during
        finally:
            server.terminate()
            server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    options = parser.parse_args()
    variants = {"nothing at start-up (baseline)": False, "preload, collect, freeze": True}
    measured: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
    for _ in range(options.rounds):
        for name, preload in variants.items():
            idle, during = first_job(preload, options.seconds)
            measured[name].append((max(idle), max(during), percentile(during, 99)))
    base = median([m[1] for m in measured["nothing at start-up (baseline)"]])
    rows = []
    for name, rounds in measured.items():
        idle_max, job_max, job_p99 = (median([r[i] for r in rounds]) * 1e3 for i in range(3))
        rows.append((name, f"{idle_max:.1f}", f"{job_max:.1f}", f"{job_p99:.1f}",
                     f"{job_max / 1e3 / base:.2f}x"))  # fmt: skip
    print(machine())
    print(f"GET /health back to back; medians of {options.rounds} rounds, the job's first "
          f"{options.seconds:g} s\n")  # fmt: skip
    print(table(["variant", "idle max ms", "first job max ms", "p99 ms", "max vs baseline"],
                rows))  # fmt: skip


if __name__ == "__main__":
    main()
