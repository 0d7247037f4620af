"""Random pause, resume, stop and cancellation of six trainers in one event loop: the long
version of tests/test_concurrent.py's chaos test.

Each trial runs ``chaos(seed)`` from the test: six long runs in one event loop, and for
``--seconds`` a random request to a random trainer every 0-``--gap`` seconds; every loop
must begin and end once and end finished or cancelled, with no engine thread left at work.
A failed trial prints its assertion and the run exits 1.

Run: python benchmarks/control_chaos.py [--trials 20] [--seed 0] [--seconds 1.5]
                                         [--gap 0.05] [--backends asyncio,trio]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import anyio
from _common import machine, table

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))  # the trial the test runs

from test_concurrent import chaos  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--gap", type=float, default=0.05)
    parser.add_argument("--backends", default="asyncio,trio")
    args = parser.parse_args()
    print(f"# {machine()}")
    rows, failed = [], 0
    for backend in args.backends.split(","):
        ended = {"finished": 0, "cancelled": 0}
        bad, started, threads = 0, time.perf_counter(), set()
        for trial in range(args.trials):
            seed = args.seed + trial
            try:
                counts = anyio.run(
                    lambda seed=seed: chaos(seed, seconds=args.seconds, gap=args.gap),
                    backend=backend,
                )
            except AssertionError as exc:
                bad += 1
                print(f"{backend} seed {seed}: {exc!r}", flush=True)
                continue
            for status, n in counts.items():
                ended[status] += n
            threads.add(threading.active_count())
        elapsed = time.perf_counter() - started
        rows.append([backend, args.trials, bad, ended["finished"], ended["cancelled"],
                     "-".join(map(str, sorted(threads))), f"{elapsed:.0f}"])  # fmt: skip
        failed += bad
    headers = ["backend", "trials", "failed", "loops finished", "loops cancelled",
               "threads after", "seconds"]  # fmt: skip
    print(table(headers, rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
