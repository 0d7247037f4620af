"""A launcher for the signal tests: two ranks that train until a signal ends them.

python signalled_launcher.py DIRECTORY HANDLE   # HANDLE: 1 for stop_on_signals
"""

from __future__ import annotations

import sys

import rank_jobs

from asynchat import launch

if __name__ == "__main__":
    launch(rank_jobs.until_signalled, nprocs=2, args=(sys.argv[1], sys.argv[2] == "1"))
