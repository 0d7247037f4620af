"""asynchat: an async, coroutine-based execution engine for PyTorch training and prediction.

The public names live here; the implementation is in private modules.
"""

from asynchat._callback import Callback, Hook, PipeBase
from asynchat._distributed import DataParallelTrainer, DistributedDataParallelTrainer
from asynchat._errors import AsynchatError, CheckpointError, InUseError, ProfilerError
from asynchat._events import EventKind, LoopEvent, LoopSnapshot
from asynchat._every import every
from asynchat._graphs import CudaGraphBatchProcessor
from asynchat._launch import LaunchError, launch, launch_async
from asynchat._loop import LoopBase
from asynchat._mailbox import AwaitableFuture
from asynchat._phase import Phase
from asynchat._predictor import Predictor
from asynchat._preload import preload
from asynchat._processor import (
    BasicBatchProcessor,
    BatchProcessor,
    MultiBatchProcessor,
    RunPhase,
    model_loss,
)
from asynchat._sharded import FullyShardedDataParallelTrainer
from asynchat._signals import stop_on_signals
from asynchat._state import LoopState, LoopStatus
from asynchat._trainer import Trainer
from asynchat._transfer import to_host

__version__ = "0.1.0"

__all__ = [
    "AsynchatError",
    "AwaitableFuture",
    "BasicBatchProcessor",
    "BatchProcessor",
    "Callback",
    "CheckpointError",
    "CudaGraphBatchProcessor",
    "DataParallelTrainer",
    "DistributedDataParallelTrainer",
    "EventKind",
    "FullyShardedDataParallelTrainer",
    "Hook",
    "InUseError",
    "LaunchError",
    "LoopBase",
    "LoopEvent",
    "LoopSnapshot",
    "LoopState",
    "LoopStatus",
    "MultiBatchProcessor",
    "Phase",
    "PipeBase",
    "Predictor",
    "ProfilerError",
    "RunPhase",
    "Trainer",
    "__version__",
    "every",
    "launch",
    "launch_async",
    "model_loss",
    "preload",
    "stop_on_signals",
    "to_host",
]
