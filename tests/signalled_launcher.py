"""A launcher for the signal tests: two ranks that run until a signal ends them.

python signalled_launcher.py DIRECTORY HOW   # HOW: "0" trains, "1" trains under
                                             # stop_on_signals, "stubborn" ignores SIGINT
"""

from __future__ import annotations

import sys

import rank_jobs

from asynchat import launch

if __name__ == "__main__":
    directory, how = sys.argv[1:]
    if how == "stubborn":
        launch(rank_jobs.ignoring_ctrl_c, nprocs=2, args=(directory,))
    else:
        launch(rank_jobs.until_signalled, nprocs=2, args=(directory, how == "1"))
