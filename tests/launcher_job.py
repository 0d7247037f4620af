"""A launcher for the orphan test: launches two ranks that train until killed."""

from __future__ import annotations

import sys

import rank_jobs

from asynchat import launch

if __name__ == "__main__":
    launch(rank_jobs.ddp_fault, nprocs=2, args=("none", sys.argv[1]))
