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
