"""A launcher for the signal tests: two ranks that run until a signal ends them.

python signalled_launcher.py DIRECTORY HOW   # HOW: "0" trains, "1" trains under
                                             # stop_on_signals, "stubborn" ignores SIGINT,
                                             # "terminal" as "1", on its stdin's terminal
"""

from __future__ import annotations

import fcntl
import sys
import termios

import rank_jobs

from asynchat import launch

if __name__ == "__main__":
    directory, how = sys.argv[1:]
    if how == "terminal":  # the terminal becomes this session's, as a login shell's does
        fcntl.ioctl(sys.stdin.fileno(), termios.TIOCSCTTY, 0)
    if how == "stubborn":
        launch(rank_jobs.ignoring_ctrl_c, nprocs=2, args=(directory,))
    else:
        launch(rank_jobs.until_signalled, nprocs=2, args=(directory, how != "0"))
