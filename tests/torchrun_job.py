"""Run under torchrun: launch() (or launch_async(), with "async") sees RANK/WORLD_SIZE and
runs only this process's rank."""

from __future__ import annotations

import sys

import anyio
import rank_jobs

from asynchat import launch, launch_async

if __name__ == "__main__":
    if sys.argv[2:] == ["async"]:
        anyio.run(lambda: launch_async(rank_jobs.all_reduce_rank, nprocs=2, args=(sys.argv[1],)))
    else:
        launch(rank_jobs.all_reduce_rank, nprocs=2, args=(sys.argv[1],))
