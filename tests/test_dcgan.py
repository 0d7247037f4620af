"""The DCGAN example: two optimizers in one custom step, pictures on disk, exact resume."""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import load_example
from test_checkpoint import assert_bitwise_equal

from asynchat.callbacks import find_checkpoint, load_weights

HERE = Path(__file__).resolve().parent


def read_png(path: Path) -> tuple[int, int, bytes]:
    """Width, height and the decompressed rows of a grayscale PNG (what write_png makes)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks: dict[bytes, bytes] = {}
    at = 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length : at + 12 + length])
        assert crc == zlib.crc32(kind + body), f"bad CRC in {kind!r}"
        chunks[kind] = chunks.get(kind, b"") + body
        at += 12 + length
    width, height = struct.unpack(">II", chunks[b"IHDR"][:8])
    return width, height, zlib.decompress(chunks[b"IDAT"])


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
async def test_dcgan_trains_both_networks_and_writes_a_sample_grid(tmp_path: Path) -> None:
    dcgan = load_example("dcgan.py")
    trainer = dcgan.make_trainer(tmp_path, epochs=1, progress=False)
    generator_before = [p.clone() for p in trainer.model.generator.parameters()]
    state = await trainer.fit()
    assert state.global_step == 29  # 1797 digits in batches of 64
    for name in ("d", "g"):
        assert 0 < state.metrics[f"train/mean_loss/{name}"] < 20
    moved = [not torch.equal(a, b) for a, b in zip(generator_before, trainer.model.generator.parameters(), strict=True)]  # fmt: skip  # noqa: E501
    assert all(moved), "the generator trained"

    width, height, rows = read_png(tmp_path / "samples" / "epoch-001.png")
    assert (width, height) == (8 * 34 + 2, 8 * 34 + 2)
    pixels = torch.tensor(list(rows)).reshape(height, width + 1)[:, 1:]  # a filter byte a row
    assert pixels.float().std() > 5, "the grid is a picture, not a blank"

    checkpoint = torch.load(find_checkpoint(tmp_path / "checkpoints"), weights_only=True)
    assert sorted(checkpoint["optimizers"]) == ["d", "g"]
    generator = dcgan.GAN().generator
    load_weights(generator, tmp_path / "checkpoints", prefix="generator.")
    for mine, trained in zip(generator.parameters(), trainer.model.generator.parameters(), strict=True):  # fmt: skip  # noqa: E501
        assert torch.equal(mine, trained)


def run_job(mode: str, out: Path, total: int, k: int, directory: Path) -> None:
    subprocess.run(
        [sys.executable, str(HERE / "gan_job.py"), mode, str(out), str(total), str(k),
         str(directory)],
        check=True, timeout=300, cwd=HERE,
    )  # fmt: skip


@pytest.mark.slow
def test_dcgan_stopped_mid_epoch_resumes_in_a_new_process_bitwise(tmp_path: Path) -> None:
    """35 steps straight == 12 steps, stop, resume in a new process to 35 (past an epoch's
    end, where the sample grid runs), with both optimizers' states equal to the bit."""
    total, k = 35, 12
    out = tmp_path / "result"
    run_job("straight", out, total, k, tmp_path / "straight")
    run_job("first", out, total, k, tmp_path / "resumed")
    run_job("resume", out, total, k, tmp_path / "resumed")
    loaded: dict[str, Any] = {
        mode: torch.load(f"{out}.{mode}", weights_only=True)
        for mode in ("straight", "first", "resume")
    }
    assert loaded["first"]["global_step"] == k
    straight, resumed = loaded["straight"], loaded["resume"]
    assert resumed["global_step"] == straight["global_step"] == total
    assert_bitwise_equal(resumed["model"], straight["model"], "model")
    assert_bitwise_equal(resumed["optimizers"], straight["optimizers"], "optimizers")
    assert_bitwise_equal(resumed["torch_rng"], straight["torch_rng"], "torch RNG")
    assert (tmp_path / "resumed" / "samples" / "epoch-001.png").exists()
