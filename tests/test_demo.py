"""The README's demo trains a real model to at least 95% validation accuracy."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("digits_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", [("asyncio", {"use_uvloop": True})], ids=["uvloop"])
async def test_digits_demo_reaches_95_percent(tmp_path: Path) -> None:
    digits = load_example()
    accuracy = await digits.train(epochs=15, out=tmp_path)
    assert accuracy >= 0.95
    weights = torch.load(tmp_path / "best.pt", weights_only=True)
    model = digits.make_model()
    model.load_state_dict(weights)
    assert not list(tmp_path.glob("*.tmp")), "no partial file is left behind"
