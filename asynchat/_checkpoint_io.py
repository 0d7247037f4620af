"""Checkpoint files: atomic writes, a manifest with checksums, and finding the newest valid one.

A checkpoint directory holds ``step-000001234.ckpt`` files and ``manifest.json``. Every file is
written to a hidden temporary name in the same directory, fsynced, renamed into place and the
directory fsynced, so a crash at any moment leaves each completed checkpoint intact and never
a partial file under a checkpoint's name. The manifest lists each checkpoint with its step,
epoch, monitored metric and SHA-256, and is replaced the same way after each checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

FORMAT = "asynchat-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
SUFFIX = ".ckpt"


class CheckpointError(Exception):
    """A checkpoint could not be found, read or used."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (corrupt, truncated or missing) and an older one used."""


def checkpoint_name(global_step: int) -> str:
    return f"step-{global_step:09d}{SUFFIX}"


def atomic_write(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent, old, or complete."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)  # the bytes are on disk before the name points at them
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # the rename itself survives a crash


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_temporaries(directory: Path) -> None:
    """Delete temporary files a killed writer left behind (they never hold a checkpoint)."""
    for tmp in directory.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def serialize(obj: Mapping[str, Any]) -> tuple[bytes, str]:
    buffer = io.BytesIO()
    torch.save(dict(obj), buffer)
    data = buffer.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def read_manifest(directory: Path) -> list[dict[str, Any]]:
    """The manifest's entries, oldest first; empty if there is none or it is unreadable."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        entries = manifest["checkpoints"]
        assert isinstance(entries, list)
        return entries
    except FileNotFoundError:
        return []
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        warnings.warn(
            f"{directory / MANIFEST} is unreadable ({exc}); looking at the checkpoint files "
            "themselves",
            CheckpointWarning,
            stacklevel=2,
        )
        return []


def write_manifest(directory: Path, entries: list[dict[str, Any]]) -> None:
    text = json.dumps({"format": FORMAT, "version": VERSION, "checkpoints": entries}, indent=1)
    atomic_write(directory / MANIFEST, text.encode())


def manifest_entry(
    file: str, digest: str, size: int, progress: Mapping[str, Any], metric: float | None
) -> dict[str, Any]:
    return {
        "file": file,
        "global_step": progress["global_step"],
        "epoch": progress["epoch"],
        "metric": metric,
        "sha256": digest,
        "bytes": size,
        "time": time.time(),
    }


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Any], Path]:
    """Load a checkpoint file, or the newest valid checkpoint in a directory.

    In a directory, a newest checkpoint that is missing, truncated, corrupt or does not match
    its manifest checksum is reported with a :class:`CheckpointWarning` and the next older
    one is tried. Returns the checkpoint and the file it came from.
    """
    path = Path(path)
    if path.is_dir():
        return _load_newest(path)
    if not path.exists():
        raise CheckpointError(f"resume_from={str(path)!r}: no such file or directory")
    return _load_file(path, _expected_digest(path)), path


def _expected_digest(path: Path) -> str | None:
    for entry in read_manifest(path.parent):
        if entry.get("file") == path.name:
            return str(entry["sha256"])
    return None


def _load_newest(directory: Path) -> tuple[dict[str, Any], Path]:
    entries = read_manifest(directory)
    candidates: list[tuple[Path, str | None]] = [
        (directory / e["file"], e.get("sha256"))
        for e in sorted(entries, key=lambda e: (e["global_step"], e["time"]), reverse=True)
    ]
    listed = {p.name for p, _ in candidates}
    unlisted = sorted(
        (p for p in directory.glob(f"*{SUFFIX}") if p.name not in listed), reverse=True
    )
    candidates += [(p, None) for p in unlisted]  # written before a crash hit the manifest
    candidates.sort(key=lambda c: c[0].name, reverse=True)  # names sort by global step
    problems: list[str] = []
    for file, digest in candidates:
        try:
            return _load_file(file, digest), file
        except CheckpointError as exc:
            problems.append(str(exc))
            warnings.warn(f"{exc}; trying an older checkpoint", CheckpointWarning, stacklevel=3)
    tried = "; ".join(problems) if problems else "it holds no checkpoint"
    raise CheckpointError(f"resume_from={str(directory)!r}: no valid checkpoint ({tried})")


def _load_file(file: Path, digest: str | None) -> dict[str, Any]:
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{file} cannot be read: {exc}") from exc
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(f"{file} does not match its manifest checksum (truncated or corrupt)")
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{file} is not a loadable checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(
            f"{file} is not an asynchat checkpoint (a torch file without the "
            f"'format': {FORMAT!r} entry); to load plain weights use model.load_state_dict"
        )
    if obj.get("version") != VERSION:
        raise CheckpointError(
            f"{file} has checkpoint version {obj.get('version')!r}, expected {VERSION}"
        )
    return obj
