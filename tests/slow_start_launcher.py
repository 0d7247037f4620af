"""A launcher whose ranks are slow to start: each imports this script again (as its main
module, before it takes its signals back from the fork server), and that import waits 3 s
here, having written ``importing-<pid>``. A signal passed on to the ranks meanwhile must
still end them.

python slow_start_launcher.py DIRECTORY
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import rank_jobs

from asynchat import launch

if __name__ == "__mp_main__":  # a rank, importing its launcher's main module
    Path(sys.argv[1], f"importing-{os.getpid()}").touch()
    time.sleep(3)
elif __name__ == "__main__":
    launch(rank_jobs.until_signalled, nprocs=2, args=(sys.argv[1], True))
