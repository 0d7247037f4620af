"""loss_fn=model_loss: a model that computes its own loss (Hugging Face's ``labels``,
nanoGPT's ``targets``) trains as one scored by a loss function does."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import load_example, make_data, make_model, sgd
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassAccuracy

from asynchat import BasicBatchProcessor, Callback, LoopState, Predictor, Trainer, model_loss
from asynchat.callbacks import Validation


@pytest.fixture
def anyio_backend() -> Any:
    return ("asyncio", {})


class Labelled(Dataset[dict[str, torch.Tensor]]):
    """``make_data``'s samples as dicts: ``{"features": x, <key>: y}``."""

    def __init__(self, n: int = 96, key: str = "labels") -> None:
        self.data, self.key = make_data(n), key

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        x, y = self.data[index]
        return {"features": x, self.key: y}


class ScoresItself(nn.Module):
    """``make_model``'s network, scoring itself: Hugging Face's contract (a dict with
    ``"logits"``, and ``"loss"`` when given ``labels``)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_model()

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        logits = self.net(features)
        if labels is None:
            return {"logits": logits}
        return {"logits": logits, "loss": F.cross_entropy(logits, labels)}


@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    loss: torch.Tensor | None


class WithAttribute(ScoresItself):
    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        scored = super().forward(features, labels)
        return Output(scored["logits"], scored.get("loss"))


class GPTStyle(ScoresItself):
    """nanoGPT's ``forward(idx, targets=None) -> (logits, loss)``."""

    def forward(self, features: torch.Tensor, targets: torch.Tensor | None = None) -> Any:  # type: ignore[override]
        scored = super().forward(features, targets)
        return scored["logits"], scored.get("loss")


class Losses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.outputs: list[Any] = []

    def on_step_end(self, state: LoopState) -> None:
        assert state.loss is not None
        self.losses.append(state.loss.item())
        self.outputs.append(state.outputs)


def assert_same_and_trained(ours: nn.Module, theirs: nn.Module) -> None:
    initial = make_model()
    for mine, other, before in zip(
        ours.parameters(), theirs.parameters(), initial.parameters(), strict=True
    ):
        assert torch.equal(mine, other)
        assert not torch.equal(mine, before)


def labelled_loader(key: str = "labels") -> DataLoader[dict[str, torch.Tensor]]:
    return DataLoader(Labelled(key=key), batch_size=16)


@pytest.mark.anyio
async def test_a_model_that_scores_itself_trains_as_one_scored_by_a_loss_function() -> None:
    # The same network, data, order and optimizer: cross-entropy computed in the model on
    # the batch's labels, or by loss_fn on its logits, gives the same weights to the bit.
    scored = ScoresItself()
    losses = Losses()
    await Trainer(
        scored, labelled_loader(), sgd, loss_fn=model_loss, num_epochs=3, callbacks=[losses]
    ).fit()
    plain = make_model()
    pairs = DataLoader(make_data(96), batch_size=16)
    await Trainer(plain, pairs, sgd, loss_fn=nn.CrossEntropyLoss(), num_epochs=3).fit()
    assert_same_and_trained(scored.net, plain)
    assert losses.losses[-1] < losses.losses[0]
    assert set(losses.outputs[0]) == {"logits", "loss"}, "state.outputs: the model's own"


@pytest.mark.anyio
@pytest.mark.parametrize(("model", "key"), [(WithAttribute, "labels"), (GPTStyle, "targets")])
async def test_the_loss_is_found_in_an_attribute_or_a_tuple(
    model: type[nn.Module], key: str
) -> None:
    network = model()
    losses = Losses()
    trainer = Trainer(
        network, labelled_loader(key), sgd, loss_fn=model_loss, num_epochs=3, callbacks=[losses]
    )
    await trainer.fit()
    assert len(losses.losses) == 18 and losses.losses[-1] < losses.losses[0]


@pytest.mark.anyio
async def test_a_predictor_scores_with_the_models_loss() -> None:
    model = ScoresItself()
    losses = Losses()
    await Predictor(model, labelled_loader(), loss_fn=model_loss, callbacks=[losses]).fit()
    data = make_data(96)
    with torch.no_grad():
        expected = [
            F.cross_entropy(model.net(data.tensors[0][i : i + 16]), data.tensors[1][i : i + 16])
            for i in range(0, 96, 16)
        ]
    assert losses.losses == pytest.approx([e.item() for e in expected])


@pytest.mark.anyio
async def test_an_optimizer_that_evaluates_again_gets_the_models_loss() -> None:
    # LBFGS evaluates the loss again at new weights, each time through the model's own.
    def lbfgs(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.LBFGS(model.parameters(), lr=0.5, line_search_fn="strong_wolfe")

    scored = ScoresItself()
    await Trainer(scored, labelled_loader(), lbfgs, loss_fn=model_loss, num_epochs=2).fit()
    plain = make_model()
    pairs = DataLoader(make_data(96), batch_size=16)
    await Trainer(plain, pairs, lbfgs, loss_fn=nn.CrossEntropyLoss(), num_epochs=2).fit()
    assert_same_and_trained(scored.net, plain)


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
async def test_a_compiled_step_computes_the_models_loss_too() -> None:
    eager, compiled = ScoresItself(), ScoresItself()
    for model, options in ((eager, False), (compiled, {"backend": "eager"})):
        processor = BasicBatchProcessor(model_loss, compile=options)
        trainer = Trainer(model, labelled_loader(), sgd, batch_processor=processor, num_epochs=2)
        await trainer.fit()
    for ours, theirs in zip(compiled.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs)


class Tuples(ScoresItself):
    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        scored = super().forward(features, labels)
        return scored["loss"], scored["loss"] * 2, scored["logits"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("model", "data", "error", "match"),
    [
        (ScoresItself, DataLoader(make_data(32), batch_size=16), TypeError,
         r"loss_fn=model_loss needs batches that are dicts.*got a list"),
        (ScoresItself, DataLoader(Labelled(32, key="label_ids"), batch_size=16), TypeError,
         r"unexpected keyword argument 'label_ids'"),
        (ScoresItself, [{"features": torch.randn(4, 8)}], ValueError,
         r"returned a dict with the keys \['logits'\], with no loss in it.*does the batch hold"),
        (Tuples, DataLoader(Labelled(32), batch_size=16), ValueError,
         r"returned a tuple, with no loss in it"),
    ],
    ids=["pairs", "a-name-the-model-does-not-take", "no-labels", "two-scalars"],
)  # fmt: skip
async def test_what_holds_no_loss_is_named(
    model: type[nn.Module], data: Any, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        await Trainer(model(), data, sgd, loss_fn=model_loss, num_epochs=1).fit()


@pytest.mark.anyio
async def test_the_example_learns_the_digits_with_the_models_own_loss(tmp_path: Path) -> None:
    example = load_example("digits_own_loss.py")
    accuracy = await example.train(epochs=4, out=tmp_path)
    assert accuracy > 0.95
    listed = json.loads((tmp_path / "checkpoints" / "manifest.json").read_text())
    assert [c["global_step"] for c in listed["checkpoints"]] == [135, 180]


@pytest.mark.anyio
async def test_metrics_given_the_models_dict_say_what_to_select() -> None:
    # Regression: torchmetrics' "'dict' object has no attribute 'ndim'", and nothing more.
    accuracy = MulticlassAccuracy(3, average="micro")
    validation = Validation(labelled_loader(), metrics={"accuracy": accuracy})
    trainer = Trainer(
        ScoresItself(), labelled_loader(), sgd, loss_fn=model_loss, num_epochs=1,
        callbacks=[validation],
    )  # fmt: skip
    with pytest.raises(AttributeError, match="ndim") as raised:
        await trainer.fit()
    assert "the model's outputs are a dict, which the metrics got as they are: pass select=" in (
        "".join(getattr(raised.value, "__notes__", []))
    )
    chosen = Validation(
        labelled_loader(), metrics={"accuracy": MulticlassAccuracy(3, average="micro")},
        select=lambda s: (s.outputs["logits"], s.batch["labels"]),
    )  # fmt: skip
    state = await Trainer(
        ScoresItself(), labelled_loader(), sgd, loss_fn=model_loss, num_epochs=1,
        callbacks=[chosen],
    ).fit()  # fmt: skip
    assert 0 <= state.metrics["val/accuracy"] <= 1
