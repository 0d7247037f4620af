"""Compiled steps: BasicBatchProcessor(compile=...) trains like eager, compiling on the
compute thread; bad options are named at construction."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import rank_jobs
import torch
from conftest import make_loader, make_model
from torch import nn

from asynchat import BasicBatchProcessor, Trainer, launch


@pytest.fixture
def anyio_backend() -> Any:
    return ("asyncio", {})


def trainer(compile: bool | dict[str, Any]) -> Trainer:
    return Trainer(
        make_model(),
        make_loader(96, 16),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
        batch_processor=BasicBatchProcessor(nn.CrossEntropyLoss(), compile=compile),
        num_epochs=3,
        device="cpu",
    )


@pytest.mark.slow
@pytest.mark.anyio
# torch's own inductor import warns (torch.utils.mkldnn uses torch.jit.script_method).
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
async def test_a_compiled_step_trains_like_eager_and_compiles_on_the_compute_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compiled_on: list[str] = []
    real_compile = torch.compile

    def recording_compile(*args: Any, **kwargs: Any) -> Any:
        compiled_on.append(threading.current_thread().name)
        return real_compile(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    eager = await trainer(False).fit()
    assert compiled_on == []
    compiled_trainer = trainer({"dynamic": False})
    compiled = await compiled_trainer.fit()
    assert compiled_on == [f"asynchat-{compiled_trainer.name}"], "once, on the compute thread"
    for key, value in eager.model.state_dict().items():
        torch.testing.assert_close(compiled.model.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    assert compiled.global_step == eager.global_step == 18


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_a_compiled_step_of_several_ranks_trains_like_eager_on_every_rank(
    tmp_path: Path, kind: str
) -> None:
    # The README names compile= as the way to fewer launches under DDP and FSDP (the
    # CUDA-graph processor is one device's): two gloo ranks, gradients accumulated.
    ranks = {}
    for compiled in (False, True):
        out = tmp_path / str(compiled)
        out.mkdir()
        launch(rank_jobs.compiled_run, nprocs=2, args=(str(out), kind, compiled))
        ranks[compiled] = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    eager, compiled_ranks = ranks[False][0], ranks[True]
    assert [r["global_step"] for r in compiled_ranks] == [eager["global_step"]] * 2 == [8, 8]
    assert eager["graphs"] == 0 and all(r["graphs"] > 0 for r in compiled_ranks), "compiled"
    for key, value in eager["model"].items():
        assert torch.equal(compiled_ranks[0]["model"][key], compiled_ranks[1]["model"][key])
        torch.testing.assert_close(compiled_ranks[0]["model"][key], value, rtol=1e-5, atol=1e-6)


def test_compile_options_are_checked_at_construction() -> None:
    with pytest.raises(TypeError, match=r"compile=\{'modee': 'max-autotune'\}: not torch"):
        BasicBatchProcessor(nn.MSELoss(), compile={"modee": "max-autotune"})
    with pytest.raises(TypeError, match="compile must be True, False or a dict"):
        BasicBatchProcessor(nn.MSELoss(), compile="yes")  # type: ignore[arg-type]
    assert BasicBatchProcessor(nn.MSELoss(), compile={"mode": "reduce-overhead"}).compile_options


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
async def test_each_processor_compiles_in_a_cache_of_its_own() -> None:
    """torch.compile keeps graphs, and a limit of recompiles, per code object: shared by every
    processor, a service's ninth model architecture would run eager without a word. Here the
    limit is 1, so two architectures in one cache would leave the second eager.

    (The limit is set with dynamo's own ``config.patch``: pytest's monkeypatch undid it by
    deleting the setting, and every later compile in the process failed with "recompile_limit
    does not exist", which the suite's order hid.)"""
    import torch._dynamo.utils

    with torch._dynamo.config.patch(recompile_limit=1):
        await compile_two_architectures()
    assert torch._dynamo.config.recompile_limit == 8, "the setting is back"


async def compile_two_architectures() -> None:
    assert torch._dynamo.config.recompile_limit == 1
    counters = torch._dynamo.utils.counters["stats"]
    graphs = counters["unique_graphs"]
    for hidden in (1, 3):  # two architectures: 1 and 3 hidden layers
        layers = [
            nn.Linear(8, 16),
            *(nn.Sequential(nn.ReLU(), nn.Linear(16, 16)) for _ in range(hidden)),
        ]
        model = nn.Sequential(*layers, nn.Linear(16, 3))
        processor = BasicBatchProcessor(nn.CrossEntropyLoss(), compile={"dynamic": False})
        await Trainer(model, make_loader(32, 16), lambda m: torch.optim.SGD(m.parameters()),
                      batch_processor=processor, num_steps=2, device="cpu").fit()  # fmt: skip
    assert counters["unique_graphs"] - graphs == 2, "both architectures ran compiled"
