"""A launcher whose stdout and stderr go elsewhere for its second launch (a file each)."""

from __future__ import annotations

import os
import sys

import rank_jobs

from asynchat import launch

if __name__ == "__main__":
    launch(rank_jobs.say, nprocs=2, args=("first",))  # (starts the fork server)
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    for fd, path in ((1, sys.argv[1]), (2, sys.argv[2])):
        with open(path, "w") as file:
            os.dup2(file.fileno(), fd)
    launch(rank_jobs.say, nprocs=2, args=("second",))
    for fd, copy in saved.items():
        os.dup2(copy, fd)
    launch(rank_jobs.say, nprocs=2, args=("third",))
