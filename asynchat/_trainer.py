"""Trainer: LoopBase with an optimizer."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch

from asynchat._callback import Callback
from asynchat._checks import optimizer_trains
from asynchat._data import DataSource
from asynchat._errors import CheckpointError, CheckpointWarning
from asynchat._loop import LoopBase, Models
from asynchat._processor import BasicBatchProcessor, BatchProcessor, LossFn
from asynchat._settings import changed, class_name, plain

OptimizerFactory = Callable[[torch.nn.Module], torch.optim.Optimizer]
OptimizerSpec = torch.optim.Optimizer | OptimizerFactory
DEFAULT = "default"  # the name of a Trainer's only optimizer


class Trainer(LoopBase):
    """Trains ``model`` on ``data_loader`` for ``num_epochs`` epochs or ``num_steps`` steps.

    Args:
        model: the module to train, moved to ``device`` on the compute thread when the run
            starts; or a mapping of names to modules (several models, such as a GAN's two),
            held as one ``nn.ModuleDict`` (``state.model.generator``), each wrapped on its
            own by the distributed trainers. A model in ``eval()`` mode (one just loaded) is
            put in ``train()`` mode; in a model already in ``train()`` mode, submodules you
            put in ``eval()`` (frozen layers) stay so. Every submodule's mode is put back
            when the run ends. While it trains, no other loop may run on the model (or on a
            submodule or weight of it) except from this trainer's hooks: see
            :class:`~asynchat.LoopBase`.
        data_loader: a re-iterable of batches, e.g. a ``torch.utils.data.DataLoader`` (an
            iterator, read once, only with ``num_epochs=1``); or an async iterable, read on
            the event loop (an async generator, an anyio memory object stream: README,
            *Async data*).
        optimizer: a ``torch.optim.Optimizer`` over the model's parameters, or a factory
            ``optimizer(model)`` called once the model is on its device; or a mapping of
            names to either, for a step with several updates (``{"d": ..., "g": ...}``; see
            :class:`~asynchat.BatchProcessor`'s step API). ``state.optimizers`` maps the
            names to the optimizers (one optimizer is named ``"default"``); checkpoints hold
            every optimizer's state by name.
        batch_processor: what one step does; default ``BasicBatchProcessor(loss_fn)``.
        loss_fn: shortcut for ``batch_processor=BasicBatchProcessor(loss_fn=loss_fn)``.
        device: ``None`` picks CUDA when available, else the CPU.
        num_epochs, num_steps: exactly one bounds the loop.
        callbacks: :class:`~asynchat.Callback` instances, run in this order within a phase.
        prefetch: how many batches to read and stage ahead on a data thread where none of
            the user's code runs in the reading (a DataLoader with workers; a list of
            batches for a GPU); 0: read everything on the compute thread. A map-style
            DataLoader without workers and a list or tuple of batches on the CPU are always
            read on the compute thread, an ``IterableDataset`` or a generator on the data
            thread one batch at a time while the step waits: the user's data code never runs
            alongside a step, so its random draws keep a hand-written loop's order. With a
            data thread, ``stop()`` and cancellation end the loop even while the data loader
            is blocked in ``__next__`` (after a 10 s grace and a warning naming it); on the
            compute thread they wait for the read.
        name: used in thread names, errors and ``repr``.
        resume_from: a checkpoint file, or a directory whose newest valid checkpoint is used
            (see :class:`asynchat.callbacks.Checkpoint`). Model, optimizer, grad scaler,
            callbacks with state, counters, RNG states and the position in the data are
            restored; ``num_epochs``/``num_steps`` count from the start of the first run.
    """

    training: ClassVar[bool] = True

    def __init__(
        self,
        model: Models,
        data_loader: DataSource,
        optimizer: OptimizerSpec | Mapping[str, OptimizerSpec],
        *,
        batch_processor: BatchProcessor | None = None,
        loss_fn: LossFn | None = None,
        device: str | torch.device | int | None = None,
        num_epochs: int | None = None,
        num_steps: int | None = None,
        callbacks: Iterable[Callback] = (),
        prefetch: int = 2,
        name: str | None = None,
        resume_from: str | os.PathLike[str] | None = None,
    ) -> None:
        specs = _optimizer_specs(optimizer)
        batch_processor = _step_processor(batch_processor, loss_fn)
        super().__init__(
            model,
            data_loader,
            batch_processor=batch_processor,
            device=device,
            num_epochs=num_epochs,
            num_steps=num_steps,
            callbacks=callbacks,
            prefetch=prefetch,
            name=name,
            resume_from=resume_from,
        )
        for key, spec in specs.items():
            if isinstance(spec, torch.optim.Optimizer):
                optimizer_trains(spec, self.model, name=_label(specs, key))
        self._optimizer_specs = specs
        self._built_with: dict[str, list[dict[str, Any]]] = {}  # each optimizer's settings

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer (with several: the one whose update came last); ``None`` before the
        run when it comes from a factory."""
        if self.state.optimizers:
            return self.state.optimizer
        only = next(iter(self._optimizer_specs.values()))
        if len(self._optimizer_specs) == 1 and isinstance(only, torch.optim.Optimizer):
            return only
        return None

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The optimizers by name, once the run has built them (see ``state.optimizers``)."""
        return dict(self.state.optimizers)

    def _configure(self) -> None:
        optimizers = {}
        for name, spec in self._optimizer_specs.items():
            optimizer = spec
            if not isinstance(optimizer, torch.optim.Optimizer):
                optimizer = spec(self.model)  # type: ignore[operator]
                if not isinstance(optimizer, torch.optim.Optimizer):
                    hint = (
                        "; for several optimizers pass a mapping of names to factories"
                        if isinstance(optimizer, (list, tuple))
                        else ""
                    )
                    raise TypeError(
                        f"the {_label(self._optimizer_specs, name)} factory must return a "
                        f"torch.optim.Optimizer, got {_short(optimizer)}{hint}"
                    )
                optimizer_trains(optimizer, self.model, name=_label(self._optimizer_specs, name))
            optimizers[name] = optimizer
        self.state.optimizers = optimizers
        self.state.optimizer = next(iter(optimizers.values())) if len(optimizers) == 1 else None
        self._built_with = {name: _settings(o) for name, o in optimizers.items()}

    def _extra_state(self) -> dict[str, Any]:
        optimizers = self.state.optimizers
        kinds = {
            "optimizer_classes": {name: class_name(o) for name, o in optimizers.items()},
            "optimizer_settings": self._built_with,
        }
        if self.shards_state:  # the optimizers' state is in the shards; their names here
            return {"sharded": {"optimizers": sorted(optimizers)}, **kinds}
        return {"optimizers": {name: o.state_dict() for name, o in optimizers.items()}, **kinds}

    def _optimizer_map(self) -> dict[str, torch.optim.Optimizer]:
        return dict(self.state.optimizers)

    def _check_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        optimizers = self.state.optimizers
        source = self.resumed_from or "the checkpoint"
        if "sharded" in checkpoint:  # the states are in the shards, their names here
            names: list[str] | None = list(checkpoint["sharded"].get("optimizers", []))
        else:
            states = _optimizer_states(checkpoint)
            names = None if states is None else list(states)
        if names is None:
            raise CheckpointError(f"{source} has no optimizer state; was it saved by a Predictor?")
        if set(names) != set(optimizers):
            raise CheckpointError(
                f"{source} holds the optimizers {sorted(names)} but this Trainer has "
                f"{sorted(optimizers)}: resume with the same optimizer names"
            )
        for name, kind in checkpoint.get("optimizer_classes", {}).items():
            if kind != class_name(optimizers[name]):
                raise CheckpointError(
                    f"{source} holds the state of a {kind} (optimizer {name!r}), which a "
                    f"{class_name(optimizers[name])} cannot go on from: resume with a {kind}, "
                    "or start a new run from the weights alone "
                    "(asynchat.callbacks.load_weights(model, path) before training)"
                )

    def _load_extra_state(self, checkpoint: dict[str, Any]) -> None:
        if "sharded" not in checkpoint:  # else loaded with the model, from the shards
            saved = _optimizer_states(checkpoint)
            assert saved is not None  # _check_checkpoint refused a checkpoint without them
            for name, optimizer in self.state.optimizers.items():
                load_optimizer(optimizer, saved[name])
        saved = checkpoint.get("optimizer_settings")  # (absent from older checkpoints)
        for name, built in self._built_with.items():
            loaded = _settings_in(saved.get(name) if isinstance(saved, dict) else None)
            if loaded is not None:
                _warn_replaced(name, built, loaded)
                self._built_with[name] = loaded  # those the run goes on with
        if checkpoint["progress"]["global_step"] > 0:
            for optimizer in self.state.optimizers.values():
                # The run stepped its optimizers before the checkpoint. torch's schedulers
                # warn when they step before the optimizer has, which a run resumed at an
                # epoch's end does (its first act is the epoch's schedule step); the flag is
                # the one torch's wrapper of optimizer.step() sets.
                optimizer._opt_called = True  # type: ignore[attr-defined]


def _optimizer_states(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The optimizers' states a whole (not sharded) checkpoint holds, by name; formats 1
    and 2 held one, ``optimizer``. None: it holds none (a Predictor's)."""
    if "optimizers" in checkpoint:
        return dict(checkpoint["optimizers"])
    return {DEFAULT: checkpoint["optimizer"]} if "optimizer" in checkpoint else None


def load_optimizer(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """``optimizer.load_state_dict(saved)``, keeping its tensor hyper-parameters (a tensor
    ``lr``) as the same tensors on their device, given the saved values: torch would put
    the loaded (host) tensors in their place, where a captured graph no longer reads."""
    kept = [
        {k: v for k, v in g.items() if isinstance(v, torch.Tensor)} for g in optimizer.param_groups
    ]
    optimizer.load_state_dict(saved)
    for group, tensors in zip(optimizer.param_groups, kept, strict=True):
        for key, tensor in tensors.items():
            with torch.no_grad():
                tensor.copy_(group[key])
            group[key] = tensor


# The keys a schedule adds to a param group (an optimizer given as itself may hold them),
# and those that are no setting.
_NO_SETTINGS = frozenset(
    {"initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum", "params", "param_names"}
)


def _settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each param group's settings as the optimizer was built (its ``lr`` before a schedule
    moved it), those of plain values (what a checkpoint holds and a comparison can tell)."""
    settings = []
    for group in optimizer.param_groups:
        values = {k: _plain(v) for k, v in group.items() if k not in _NO_SETTINGS}
        values["lr"] = _plain(group.get("initial_lr", group["lr"]))
        settings.append({k: v for k, v in values.items() if plain(v)})
    return settings


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value


def _settings_in(saved: Any) -> list[dict[str, Any]] | None:
    """A checkpoint's ``optimizer_settings`` of one optimizer, if they are what
    :func:`_settings` makes (the file is checked, as any other part of it)."""
    if not isinstance(saved, list) or not all(isinstance(group, dict) for group in saved):
        return None
    if not all(isinstance(k, str) and plain(v) for group in saved for k, v in group.items()):
        return None
    return saved


def _warn_replaced(name: str, built: list[dict[str, Any]], saved: list[dict[str, Any]]) -> None:
    """torch's ``load_state_dict`` gives each param group the saved settings: a run resumed
    with another ``lr`` (or weight decay, or ``fused=True``) trained on at the saved one
    without a word. Said, with a :class:`CheckpointWarning`, where the settings this run
    built its optimizer with differ from those the checkpoint's run went on with."""
    differ = [
        text for ours, theirs in zip(built, saved, strict=False) for text in changed(ours, theirs)
    ]
    if differ:
        warnings.warn(
            f"optimizer {name!r} was built with {', '.join(dict.fromkeys(differ))}: a "
            "resumed run goes on with the checkpoint's settings (torch's load_state_dict "
            "restores them with the optimizer's state). To train on with others, set them "
            "in param_groups in a callback's on_loop_begin, or start a new run from the "
            "weights alone (asynchat.callbacks.load_weights)",
            CheckpointWarning,
            stacklevel=4,
        )


def _step_processor(
    batch_processor: BatchProcessor | None, loss_fn: LossFn | None
) -> BatchProcessor:
    """The processor a Trainer runs: the one given, or ``BasicBatchProcessor(loss_fn)``."""
    if batch_processor is None:
        if loss_fn is None:
            raise ValueError(
                "Trainer needs a loss: pass loss_fn=... (e.g. torch.nn.CrossEntropyLoss()) "
                "or batch_processor=..."
            )
        batch_processor = BasicBatchProcessor(loss_fn)
    elif loss_fn is not None:
        raise ValueError(
            "pass either loss_fn or batch_processor, not both: loss_fn is a shortcut for "
            "batch_processor=BasicBatchProcessor(loss_fn=...)"
        )
    return batch_processor


def _optimizer_specs(optimizer: Any) -> dict[str, OptimizerSpec]:
    """The optimizers (or factories) by name, checked; one optimizer is named ``"default"``."""
    if isinstance(optimizer, Mapping):
        if not optimizer:
            raise ValueError("optimizer must not be an empty mapping: name at least one")
        specs = dict(optimizer)
        for name in specs:
            if not isinstance(name, str) or not name:
                raise TypeError(f"optimizer names must be non-empty strings, got {name!r}")
    else:
        specs = {DEFAULT: optimizer}
    for name, spec in specs.items():
        if isinstance(spec, type) and issubclass(spec, torch.optim.Optimizer):
            # Callable, so taken for a factory: SGD(model) failed at the first step with
            # torch's "optimizer can only optimize Tensors, but one of the params is Linear".
            raise TypeError(
                f"{_label(specs, name)} is the class {spec.__name__}, not an optimizer; pass "
                f"{spec.__name__}(model.parameters(), lr=...) or a factory "
                f"lambda model: torch.optim.{spec.__name__}(model.parameters(), lr=...)"
            )
        if not isinstance(spec, torch.optim.Optimizer) and not callable(spec):
            got = _short(spec)
            hint = (
                "; for several optimizers pass a mapping of names, optimizer={'d': ..., 'g': ...}"
                if isinstance(spec, (list, tuple))
                else ""
            )
            raise TypeError(
                f"{_label(specs, name)} must be a torch.optim.Optimizer or a factory "
                f"optimizer(model), got {got}{hint}"
            )
    return specs


def _short(value: Any) -> str:
    """``value``'s repr if short, else its type (an optimizer's repr runs to many lines)."""
    text = repr(value)
    return text if len(text) <= 60 and "\n" not in text else f"a {type(value).__name__}"


def _label(specs: Mapping[str, Any], name: str) -> str:
    return "optimizer" if len(specs) == 1 and name == DEFAULT else f"optimizer[{name!r}]"
