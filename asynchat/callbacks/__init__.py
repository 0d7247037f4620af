"""Callbacks shipped with asynchat: checkpointing with resume, and more.

Every callback here keeps to the engine's rule: per-step work runs in ``def`` hooks on the
compute thread, never forcing a host/device sync; anything slow (writing files) runs on a
thread of the callback's own, joined before the loop ends.
"""

from asynchat._checkpoint_io import CheckpointError, CheckpointWarning, load_checkpoint
from asynchat.callbacks._checkpoint import Checkpoint

__all__ = ["Checkpoint", "CheckpointError", "CheckpointWarning", "load_checkpoint"]
