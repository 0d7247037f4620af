"""Predictor: LoopBase in eval mode without gradients, with a streaming way to read outputs."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Iterable
from typing import Any, ClassVar

import anyio
import torch

from asynchat._callback import Callback
from asynchat._checks import flag, positive_int
from asynchat._compute import ComputeThread
from asynchat._data import DataSource
from asynchat._loop import LoopBase, Models
from asynchat._processor import BasicBatchProcessor, BatchProcessor, LossFn
from asynchat._ranks import sharded_over_ranks
from asynchat._state import LoopState
from asynchat._transfer import HostCopy


class Predictor(LoopBase):
    """Runs ``model`` over ``data_loader`` once, in ``eval()`` mode (unless ``train_mode``)
    under ``torch.no_grad()``.

    Every submodule's train/eval mode is put back afterwards, so a Predictor can validate a
    model between a Trainer's epochs (see *One model, several loops* in
    :class:`~asynchat.LoopBase`: predictors in ``eval()`` mode may share a model; one in
    ``train_mode`` holds it alone). ``fit()`` is HAT's name for the run: here it predicts.

    Under :func:`~asynchat.launch` each rank's Predictor runs over that rank's data alone,
    unless the model is sharded over the ranks (a
    :class:`~asynchat.FullyShardedDataParallelTrainer`'s ``trainer.model``: its forward
    gathers the parameters from every rank). Then run one on every rank at the same point:
    the ranks step together, as a distributed trainer's do, each running as many batches as
    the rank with the fewest (with a warning when they differ), and ``stop()``, ``pause()``
    or a cancellation on one rank acts on all of them at the same boundary;
    :meth:`~asynchat.LoopBase.sum_over_ranks` then sums over the ranks. Run inline in a
    distributed trainer (its Validation), it steps with the trainer's agreements instead.

    Args:
        model, data_loader, batch_processor, device, callbacks, prefetch, name: as for
            :class:`~asynchat.Trainer` (a Predictor has no optimizer, always one epoch, and
            does not resume).
        loss_fn: shortcut for ``BasicBatchProcessor(loss_fn)``: batches that carry targets
            get a ``state.loss``.
        train_mode: run the model in ``train()`` mode (still without gradients), e.g. to
            sample a GAN's generator with batch statistics as DCGAN does. BatchNorm layers
            then update their running statistics.
    """

    training: ClassVar[bool] = False

    def __init__(
        self,
        model: Models,
        data_loader: DataSource,
        *,
        batch_processor: BatchProcessor | None = None,
        loss_fn: LossFn | None = None,
        device: str | torch.device | int | None = None,
        callbacks: Iterable[Callback] = (),
        prefetch: int = 2,
        name: str | None = None,
        train_mode: bool = False,
    ) -> None:
        if batch_processor is None:
            batch_processor = BasicBatchProcessor(loss_fn)
        elif loss_fn is not None:
            raise ValueError("pass either loss_fn or batch_processor, not both")
        super().__init__(
            model,
            data_loader,
            batch_processor=batch_processor,
            device=device,
            num_epochs=1,
            callbacks=callbacks,
            prefetch=prefetch,
            name=name,
        )
        flag("train_mode", train_mode)
        self._train_mode = train_mode
        self._streaming = False

    def _steps_with_ranks(self) -> bool:
        return sharded_over_ranks(self.model)  # each forward gathers from every rank

    @property
    def streaming(self) -> bool:
        """Whether :meth:`stream` runs this predictor (until its generator is closed)."""
        return self._streaming

    async def stream(self, *, buffer: int = 8) -> AsyncGenerator[Any, None]:
        """Run the predictor, yielding each batch's outputs, on the host, as they are computed.

        ::

            async with contextlib.aclosing(predictor.stream()) as outputs:
                async for batch_outputs in outputs:
                    ...

        Each batch's outputs are copied to the host on the compute thread (a non-blocking copy
        on CUDA, awaited here without blocking the event loop). At most ``buffer`` batches wait
        unread; past that the predictor waits for the consumer, so nothing is dropped. Leaving
        the loop early stops the predictor after the step in progress (``aclosing`` makes that
        happen at once rather than when the generator is garbage-collected).
        """
        positive_int("buffer", buffer)
        with self._lifecycle(cancelled=anyio.get_cancelled_exc_class()):
            self._streaming = True  # once the model is ours: a refusal names it
            try:
                async with ComputeThread(self.device, name=f"asynchat-{self.name}") as compute:
                    run = self._attach(compute)
                    self._append_callback(_EmitOutputs(compute))  # once the run is ours alone
                    items = compute.run_streaming(
                        run.run,
                        on_cancel=self._request_cancel,
                        on_close=lambda: self.stop("the stream was closed"),
                        buffer=buffer,
                    )
                    # aclosing: when this generator is closed early, the inner one must be
                    # closed too (it stops the job and serves it to its end) before the
                    # thread is joined.
                    async with contextlib.aclosing(items):
                        async for copied in items:
                            yield await copied.landed()
            finally:
                self._streaming = False


class _EmitOutputs(Callback):
    """The last hook at ``on_batch_end`` of a streaming Predictor: hands the outputs over."""

    def __init__(self, compute: ComputeThread) -> None:
        self.compute = compute

    def on_batch_end(self, state: LoopState) -> None:
        self.compute.emit(HostCopy(state.outputs))
