"""Callbacks shipped with asynchat.

Every callback here keeps to the engine's rule: per-step work runs in ``def`` hooks on the
compute thread and never forces a host/device sync; anything slow (writing files) runs on a
thread the callback owns and joins before the loop ends. Optional dependencies are imported
when a callback that needs them is created: ``torchmetrics`` (MetricUpdater, Validation with
metrics), ``rich`` (Progress on a terminal), ``tensorboard`` (TensorBoardLogger).
"""

from asynchat._checkpoint_io import find_checkpoint, load_checkpoint, load_weights, resumable
from asynchat._errors import CheckpointError, CheckpointWarning, ProfilerError
from asynchat.callbacks._checkpoint import Checkpoint
from asynchat.callbacks._control import EarlyStopping, NonFiniteLossError, TerminateOnNaN
from asynchat.callbacks._loggers import JSONLinesLogger, ScalarLogger, TensorBoardLogger
from asynchat.callbacks._metrics import MetricUpdater
from asynchat.callbacks._model import ExponentialMovingAverage, FreezeModule, GradClip
from asynchat.callbacks._profiler import Profiler
from asynchat.callbacks._progress import Progress
from asynchat.callbacks._schedule import (
    LRSchedule,
    constant,
    cosine,
    one_cycle,
    poly,
    step_decay,
)
from asynchat.callbacks._stats import LossMonitor, StatsMonitor
from asynchat.callbacks._validation import Validation

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointWarning",
    "EarlyStopping",
    "ExponentialMovingAverage",
    "FreezeModule",
    "GradClip",
    "JSONLinesLogger",
    "LRSchedule",
    "LossMonitor",
    "MetricUpdater",
    "NonFiniteLossError",
    "Profiler",
    "ProfilerError",
    "Progress",
    "ScalarLogger",
    "StatsMonitor",
    "TensorBoardLogger",
    "TerminateOnNaN",
    "Validation",
    "constant",
    "cosine",
    "find_checkpoint",
    "load_checkpoint",
    "load_weights",
    "one_cycle",
    "poly",
    "resumable",
    "step_decay",
]
