"""The DCGAN example as a job for the resume test, run as a subprocess.

    python gan_job.py straight OUT TOTAL K DIR   # TOTAL steps in one go
    python gan_job.py first    OUT TOTAL K DIR   # K steps, checkpoint, stop()
    python gan_job.py resume   OUT TOTAL K DIR   # resume from DIR up to TOTAL

Writes ``OUT.<mode>``: the weights, both optimizers' states and the RNG state at the end.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import anyio
import torch
from conftest import StopAt, load_example

from asynchat import LoopState


def result(state: LoopState) -> dict[str, Any]:
    return {
        "global_step": state.global_step,
        "model": state.model.state_dict(),
        "optimizers": {name: o.state_dict() for name, o in state.optimizers.items()},
        "torch_rng": torch.get_rng_state(),
    }


async def main(mode: str, out: str, total: int, k: int, directory: Path) -> None:
    dcgan = load_example("dcgan.py")
    extra = (StopAt(k),) if mode == "first" else ()
    trainer = dcgan.make_trainer(
        directory, steps=total, resume=mode == "resume", extra=extra, progress=False
    )
    state = await trainer.fit()
    torch.save(result(state), f"{out}.{mode}")


if __name__ == "__main__":
    mode, out, total, k, directory = sys.argv[1:]
    anyio.run(main, mode, out, int(total), int(k), Path(directory))
