"""to_host: host copies of device values, awaited without blocking the event loop."""

from __future__ import annotations

import pytest
import torch

from asynchat import to_host

pytestmark = pytest.mark.anyio


async def test_cpu_tensors_are_copied_in_nested_structures() -> None:
    a, b = torch.arange(3.0), torch.ones(2, requires_grad=True)
    out = await to_host({"a": a, "pair": (b, 7), "list": [a]})
    assert torch.equal(out["a"], a) and out["pair"][1] == 7
    assert not out["pair"][0].requires_grad
    a.add_(1)
    assert torch.equal(out["a"], torch.arange(3.0)), "the result does not change with the source"
    assert torch.equal(out["list"][0], torch.arange(3.0))


async def test_non_tensors_pass_through() -> None:
    assert await to_host(None) is None
    assert await to_host("text") == "text"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
async def test_cuda_tensors_arrive_in_pinned_host_memory() -> None:
    x = torch.arange(1000.0, device="cuda") * 2
    out = await to_host(x)
    assert out.device.type == "cpu" and out.is_pinned()
    assert torch.equal(out, torch.arange(1000.0) * 2)


async def test_in_a_def_hook_it_says_to_read_the_tensor_there() -> None:
    """A ``def`` hook runs on the compute thread, where no event loop runs: ``to_host`` there
    handed back a coroutine that nothing would await (the hook then failed on it, and Python
    warned later that it was never awaited)."""
    from conftest import make_trainer

    from asynchat import Callback, LoopState

    class Reads(Callback):
        def on_step_end(self, state: LoopState) -> None:
            state.loop.to_host(state.loss)

    with pytest.raises(RuntimeError, match=r"loop\.to_host\(\) is awaited in async code .*"
                       r"a def hook runs on the compute thread"):  # fmt: skip
        await make_trainer(Reads()).fit()


def test_outside_async_code_it_raises_at_once() -> None:
    with pytest.raises(RuntimeError, match=r"asynchat\.to_host\(\) is awaited in async code"):
        to_host(torch.ones(2))
