"""The eight phases of a loop, in the order they run."""

from __future__ import annotations

import enum


class Phase(str, enum.Enum):
    """A point in the loop where callbacks run; the value is the hook's method name.

    HAT's eight phases keep their names and order; ``on_before_update`` is an extra phase
    inside the batch processor, run only when an optimizer update is due, after the
    gradients are complete (and unscaled, with fp16) and before ``optimizer.step()``: the
    place for gradient clipping.

    ::

        on_loop_begin
        for each epoch:
            on_epoch_begin
            for each step:
                on_step_begin
                for each batch in the step:      # inside the batch processor
                    on_batch_begin
                    forward / loss / backward
                    on_batch_end
                on_before_update             # extra phase: only when an update is due
                optimizer update (when due)
                on_step_end
            on_epoch_end
        on_loop_end
    """

    ON_LOOP_BEGIN = "on_loop_begin"
    ON_EPOCH_BEGIN = "on_epoch_begin"
    ON_STEP_BEGIN = "on_step_begin"
    ON_BATCH_BEGIN = "on_batch_begin"
    ON_BATCH_END = "on_batch_end"
    ON_BEFORE_UPDATE = "on_before_update"
    ON_STEP_END = "on_step_end"
    ON_EPOCH_END = "on_epoch_end"
    ON_LOOP_END = "on_loop_end"

    def __str__(self) -> str:
        return self.value
