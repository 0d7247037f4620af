"""The phases of a loop, in the order they run: the one place the loop's diagram lives."""

from __future__ import annotations

import enum


class Phase(enum.StrEnum):
    """A point in the loop where callbacks run; the value is the hook's method name.

    The loop, with every phase in its place (this is the one copy of the diagram: the README's
    is checked against it by a test)::

        on_loop_begin
        for each epoch:                         # until num_epochs epochs or num_steps steps
            on_epoch_begin
            for each step:                      # one item of the data loader
                on_step_begin
                for each batch in the step:     # inside the batch processor
                    on_batch_begin
                    forward / loss / backward
                    on_batch_end
                on_before_update                # extra: only when an update is due; grads unscaled
                optimizer update (when due)
                on_step_end
            on_epoch_end
        on_loop_end

    ``on_before_update`` runs inside the batch processor only when an optimizer update is due,
    after the gradients are complete (and unscaled, with fp16) and before
    ``optimizer.step()``: the place for gradient clipping.

    From HAT: the eight other phases keep HAT's names and order. HAT's ``CallbackMixin`` has
    13 hooks; its ``on_optimizer_step_begin`` is ``on_before_update`` here, and its
    ``on_forward_begin/end`` and ``on_backward_begin/end`` have no phase (write a
    :class:`~asynchat.BatchProcessor` for work between forward and backward). HAT's
    ``global_step_id`` is 0 at the first ``on_step_end``; ``state.global_step`` counts steps
    completed, so it is 1 there.
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
