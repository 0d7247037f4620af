"""Run under torchrun: launch() sees RANK/WORLD_SIZE and runs only this process's rank."""

from __future__ import annotations

import sys

import rank_jobs

from asynchat import launch

if __name__ == "__main__":
    launch(rank_jobs.all_reduce_rank, nprocs=2, args=(sys.argv[1],))
