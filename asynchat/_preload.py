"""What a process's first training imports, imported ahead of it (:func:`preload`)."""

from __future__ import annotations

import atexit
import gc
import importlib

from asynchat._checks import flag

#: What torch imports the first time a process trains, on the compute thread: the first
#: optimizer built imports ``torch._dynamo`` (``Optimizer.__init__`` is wrapped to keep
#: dynamo out of it), with sympy and ``torch.fx``: about 150,000 objects.
FIRST_TRAINING_IMPORTS = ("torch._dynamo",)


def preload(*, freeze: bool = False) -> None:
    """Import now what the first training of this process would import as it starts.

    The first optimizer a process builds makes torch import ``torch._dynamo`` (0.5-1 s of
    CPU). Imported on the compute thread as a job starts, its garbage collections, each
    one over every object of the process, pause every thread, the event loop among them
    (measured on a 2-core machine: ``examples/service.py``'s health route answered in up to
    171 ms as the server's first job started, 32 ms with this called before serving). A
    service calls it at start-up, before it serves, with ``freeze=True``: then every object
    the process holds so far is collected and frozen (``gc.collect()``, ``gc.freeze()``),
    so that the collector's later full passes skip what start-up made
    (``benchmarks/loop_pauses.py``; README, *A training service*), and unfrozen again as
    the process exits. Frozen objects are never freed, so without that the interpreter's
    teardown finds them still alive: with torch 2.15's CUDA build (``torch._dynamo``
    imports triton) triton's extension then wrote some 30 lines of ``nanobind: leaked
    ...`` at every exit. The ranks :func:`asynchat.launch` starts have it done by the
    process they are forked from. Calling it again costs nothing (with ``freeze``, what
    was made since is frozen too). ``import asynchat`` leaves it out: a process that never
    trains (a launcher, a predictor) would pay for it at every start.
    """
    flag("freeze", freeze)
    for name in FIRST_TRAINING_IMPORTS:
        importlib.import_module(name)
    if freeze:
        gc.collect()
        gc.freeze()
        # Unfrozen as the process exits (once, however often this is called), so that its
        # teardown frees those objects as it frees the rest.
        atexit.unregister(gc.unfreeze)
        atexit.register(gc.unfreeze)
