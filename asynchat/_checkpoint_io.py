"""Checkpoint files: atomic writes, a manifest with checksums, and finding the newest valid one.

A checkpoint directory holds ``step-000001234.ckpt`` files (or, written by a trainer whose
state is sharded, ``step-000001234.dcp`` directories: see :mod:`asynchat._dcp`),
``manifest.json`` and a lock file.
Every file is written to a hidden temporary name unique to its writer, fsynced, renamed into
place and the directory fsynced, so a crash at any moment leaves each completed checkpoint
intact and never a partial file under a checkpoint's name. The manifest lists each checkpoint
with its step, epoch, metrics and the SHA-256 of the file, and is replaced the same
way after each checkpoint.

Nothing in the directory is trusted: the manifest is data anyone with write access could have
written. Only names this module makes (``step-<digits>.ckpt``, regular files, in the directory
itself; directories for ``.dcp``) are ever loaded or deleted; any other entry is skipped with a
:class:`CheckpointWarning`. Each checkpoint also carries a digest of its own content, so a
flipped bit is caught even when the manifest is lost.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import math
import os
import re
import shutil
import socket
import stat
import time
import uuid
import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, Literal, TypeGuard, cast

import torch

from asynchat._checks import flag
from asynchat._checks import path as check_path
from asynchat._errors import CheckpointError, CheckpointInUseError, CheckpointWarning, InUseError
from asynchat._weights import IncompatibleKeys, load_portable, plain_name, under

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: the directory lock is not available
    fcntl = None  # type: ignore[assignment]

FORMAT = "asynchat-checkpoint"
# 2: each file carries its content digest ("integrity"); 3: "optimizers" maps each of a
# Trainer's optimizers by name (1 and 2 held one "optimizer", read as the one named "default").
VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
MANIFEST = "manifest.json"
LOCK = ".asynchat.lock"
_NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)  # (POSIX; elsewhere the lock is a no-op)
NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # (POSIX: a FIFO opens without waiting)
SUFFIX = ".ckpt"
SHARDED_SUFFIX = ".dcp"
EXTRAS = "asynchat.pt"  # in a sharded checkpoint: everything but the shards
_NAME = re.compile(r"step-(\d{9,})\.(?:ckpt|dcp)")
_TEMPORARY = re.compile(r"\.(step-\d{9,}\.(?:ckpt|dcp)|manifest\.json)\.[0-9a-f-]+\.tmp")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_RUN_ID = re.compile(r"[0-9a-f]{32}")  # a loop's run_id (uuid4().hex)
# A manifest lists some 250 bytes a checkpoint: 64 MiB is a quarter of a million of them
# (with the metrics measured at its step, up to RECORDED_METRICS of them at some 40 bytes
# each: 1.5 KiB, and tens of thousands). One larger (a sparse file, say) is not read into
# memory.
MANIFEST_LIMIT = 64 << 20
#: The most metrics a manifest entry records (a step that measured more, per-class values
#: say, records none: a few thousand checkpoints of a thousand metrics would pass the limit).
RECORDED_METRICS = 32
_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def read_file(path: Path, *, limit: int | None = None) -> bytes:
    """The bytes of ``path``, which must be a regular file (a link to one is followed).

    Anything else under a checkpoint's or the manifest's name raises :class:`OSError`
    before a byte is read: reading a FIFO waits forever for a writer, ``/dev/zero`` never
    ends. So does a file of more than ``limit`` bytes.
    """
    fd = os.open(path, os.O_RDONLY | NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = _KINDS.get(stat.S_IFMT(mode), "no regular file")
            raise OSError(f"{path} is {kind}, not a regular file")
        with open(fd, "rb", closefd=False) as file:
            data = file.read() if limit is None else file.read(limit + 1)
    finally:
        os.close(fd)
    if limit is not None and len(data) > limit:
        raise OSError(f"{path} is larger than {limit} bytes")
    return data


def checkpoint_name(global_step: int, *, sharded: bool = False) -> str:
    return f"step-{global_step:09d}{SHARDED_SUFFIX if sharded else SUFFIX}"


def is_sharded(name: str) -> bool:
    return name.endswith(SHARDED_SUFFIX)


def step_of(name: str) -> int | None:
    """The global step in a checkpoint name this module made, else None."""
    match = _NAME.fullmatch(name)
    return int(match.group(1)) if match else None


# -- writing -------------------------------------------------------------------------------


def atomic_write(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent, old, or complete."""
    with atomic_file(path) as file:
        file.write(data)


@contextlib.contextmanager
def atomic_file(path: Path, *, like: os.stat_result | None = None) -> Iterator[BinaryIO]:
    """A file to write ``path``'s new content into: a temporary one, synced and renamed to
    ``path`` once the block ends without an error (removed if it raises), so that ``path``
    is either absent, old, or complete. With ``like`` (the file it replaces) it has that
    file's permissions and, where this process may give them, its owner.

    The temporary name is unique to this call (pid and a random part), so two writers never
    touch each other's temporary file.
    """
    tmp = temporary_for(path)
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb") as file:
            if like is not None:
                os.fchmod(file.fileno(), stat.S_IMODE(like.st_mode))
                if (like.st_uid, like.st_gid) != (os.getuid(), os.getgid()):
                    with contextlib.suppress(PermissionError):  # (only root gives files away)
                        os.fchown(file.fileno(), like.st_uid, like.st_gid)
            yield file
            file.flush()
            os.fsync(file.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # the rename itself survives a crash


def temporary_for(path: Path) -> Path:
    """A temporary file's name for ``path``'s new content, beside it: unique to the call
    (pid and a random part), hidden, and matched by :func:`temporaries_of`."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")


def temporaries_of(path: Path) -> re.Pattern[str]:
    """The names :func:`temporary_for` gives the temporary files of ``path``, in its
    directory (group 1: the pid of the process that made one)."""
    return re.compile(rf"\.{re.escape(path.name)}\.(\d+)-[0-9a-f]{{12}}\.tmp")


def sync_files(paths: Iterable[Path]) -> None:
    """Sync each of ``paths`` to disk: files of the callbacks' own (their logs), before a
    checkpoint that covers them is written. One that is gone is skipped, and one that
    cannot be synced is told of with a :class:`CheckpointWarning`: the checkpoint goes on."""
    for path in paths:
        try:
            # (Linux syncs a file's data whichever fd asks; O_NONBLOCK: a FIFO never blocks)
            fd = os.open(path, os.O_RDONLY | NONBLOCK)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except FileNotFoundError:
            continue
        except OSError as exc:
            warnings.warn(f"could not sync {path} to disk: {exc}", CheckpointWarning, stacklevel=2)


# The filesystems (st_dev) found unable to sync a directory: told of once each.
_UNSYNCABLE: set[int] = set()


def fsync_dir(directory: Path) -> None:
    """Sync ``directory``'s entries to disk: a rename into it then survives a crash.

    Some network and FUSE filesystems refuse to sync a directory (``EINVAL``, ``ENOTSUP``)
    though they rename atomically: told of with a :class:`CheckpointWarning` once per
    filesystem, not raised (the file's own bytes are synced already; failing every
    checkpoint there would end the run).
    """
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        device = os.fstat(fd).st_dev
        if device not in _UNSYNCABLE:
            _UNSYNCABLE.add(device)
            warnings.warn(
                f"{directory}: its filesystem cannot sync a directory ({exc.strerror}); "
                "files are written and synced all the same, but the newest rename there may "
                "not survive a machine crash (a crash of the process loses nothing)",
                CheckpointWarning,
                stacklevel=2,
            )
    finally:
        os.close(fd)


def remove_temporaries(directory: Path) -> None:
    """Delete temporary files (and sharded checkpoints' temporary directories) a killed
    writer left behind: they never hold a checkpoint.

    Only names :func:`atomic_write` and sharded saves make are touched. Call it while
    holding the directory's :class:`DirectoryLock`, so no live writer owns them.
    """
    for tmp in directory.iterdir():
        if _TEMPORARY.fullmatch(tmp.name) and not tmp.is_symlink():
            remove(tmp)


def remove(path: Path) -> None:
    """Delete a checkpoint file, or a sharded checkpoint's directory (never a link's target)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def file_digests(directory: Path) -> dict[str, str]:
    """SHA-256 of each file in a sharded checkpoint's directory but :data:`EXTRAS`."""
    return {
        path.name: _sha256(path)
        for path in sorted(directory.iterdir())
        if path.name != EXTRAS and path.is_file()
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def commit_directory(temporary: Path, final: Path) -> None:
    """Rename a complete sharded checkpoint into place (replacing one of the same step)."""
    fsync_dir(temporary)
    displaced = None
    if final.is_dir() and not final.is_symlink():
        displaced = final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}.tmp")
        os.replace(final, displaced)
    os.replace(temporary, final)
    fsync_dir(final.parent)
    if displaced is not None:
        remove(displaced)


def content_digest(obj: Any) -> str:
    """SHA-256 over a checkpoint's structure, numbers, strings and tensor bytes.

    Computed before saving and again after loading: it does not depend on how ``torch.save``
    lays the file out, so it holds inside the file itself.
    """
    digest = hashlib.sha256()
    _feed(digest, obj)
    return digest.hexdigest()


def _feed(digest: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)};".encode())
        if tensor.layout != torch.strided:
            tensor = tensor.to_dense()
        if tensor.numel():
            raw = tensor.cpu().contiguous().reshape(-1).view(torch.uint8)
            digest.update(raw.numpy().data)  # a view: no copy of the bytes
    elif isinstance(obj, Mapping):
        digest.update(b"{%d;" % len(obj))
        for key, value in obj.items():
            _feed(digest, key)
            _feed(digest, value)
    elif isinstance(obj, (list, tuple)):
        digest.update(b"[%d;" % len(obj))
        for value in obj:
            _feed(digest, value)
    else:
        digest.update(f"{type(obj).__name__}:{obj!r};".encode())


def serialize(obj: Mapping[str, Any]) -> tuple[bytes, str]:
    """``torch.save`` bytes of ``obj`` with its content digest inside, and their SHA-256
    (in memory: for small files and tests; checkpoints are written by :func:`save_file`)."""
    buffer = io.BytesIO()
    torch.save(_with_integrity(obj), buffer)
    data = buffer.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def save_file(path: Path, obj: Mapping[str, Any]) -> tuple[int, str]:
    """``torch.save`` ``obj``, with its content digest inside, into ``path`` atomically (see
    :func:`atomic_file`); the file's size and SHA-256, hashed as it is written.

    Streamed into the file: built in memory first (``io.BytesIO``), each tensor's bytes were
    copied there with the GIL held, pausing every other thread, the event loop too (while a
    512 MiB weight was saved: 284 ms, streamed 45; ``benchmarks/loop_pauses.py``).
    """
    with atomic_file(path) as file:
        hashing = _HashingWriter(file)
        try:
            torch.save(_with_integrity(obj), cast(BinaryIO, hashing))  # (it writes, flushes)
        except RuntimeError:
            if hashing.failed is not None:  # torch's words for it: "... unexpected pos ..."
                raise hashing.failed from None  # (ENOSPC, EFBIG, EIO: what the disk said)
            raise
    return hashing.size, hashing.sha256.hexdigest()


def _with_integrity(obj: Mapping[str, Any]) -> dict[str, Any]:
    content = dict(obj)
    content.pop("integrity", None)
    content["integrity"] = {"sha256": content_digest(content)}
    return content


class _HashingWriter:
    """The file ``torch.save`` writes into, hashing what it writes (hashlib and the file's
    write let the GIL go for large buffers)."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.failed: OSError | None = None  # the write's own error (torch raises another)

    def write(self, data: bytes | memoryview) -> int:
        self.sha256.update(data)
        self.size += memoryview(data).nbytes
        try:
            return self.file.write(data)
        except OSError as exc:
            self.failed = exc
            raise

    def flush(self) -> None:
        self.file.flush()


class DirectoryLock:
    """One live writer per checkpoint directory, across threads and processes.

    An exclusive ``flock`` on ``save_dir/.asynchat.lock``: the operating system releases it
    when its holder dies however it dies, so a lock left by a killed process is taken over by
    the next writer. The file records the holder (pid, host, start time) for the error a
    second writer gets. Not available off POSIX, where the lock is a no-op.

    A ``flock`` belongs to the open file, which a forked child shares: a DataLoader worker
    forked while the lock is held (and kept alive by ``persistent_workers=True``) would hold
    it after the writer released it, and refuse the next run of the same process. A forked
    child therefore closes its copies at once (:func:`_forget_locks_in_child`).

    The loggers lock their outputs the same way: ``name`` (the lock file's), ``subject`` and
    ``writer`` (what the errors name), ``in_use`` (the refusal's reason), ``refused`` (its
    class, an :class:`InUseError`) and ``error`` (the class of the other errors) say how.
    """

    _held: ClassVar[weakref.WeakSet[DirectoryLock]] = weakref.WeakSet()

    def __init__(
        self,
        directory: Path,
        *,
        name: str = LOCK,
        subject: str | None = None,
        writer: str = "Checkpoint writer",
        in_use: str = "two runs sharing a directory would overwrite and prune each other's "
        "checkpoints. Give each run its own save_dir",
        refused: type[InUseError] = CheckpointInUseError,
        error: type[Exception] = CheckpointError,
    ) -> None:
        self.directory = directory
        self.path = directory / name
        self.subject = subject if subject is not None else f"save_dir={str(directory)!r}"
        self.writer = writer
        self.in_use = in_use
        self.refused = refused
        self.error = error
        self._fd: int | None = None

    def acquire(self) -> None:
        holder = self._take()
        if holder is not None:
            raise self.refused(
                f"{self.subject} is in use by another live {self.writer} ({holder}); {self.in_use}"
            )

    def _take(self) -> str | None:
        """Open and lock the lock file as this writer's; or, if another writer holds it,
        leave everything as it was and return who that is."""
        fd = self._open()
        holder = self._lock(fd)
        if holder is None:
            self._fd = fd
            DirectoryLock._held.add(self)
        return holder

    def _open(self) -> int:
        """The lock file, opened (created if need be): a regular file in the directory and
        never what a link there points to (the holder is written into it)."""
        path = self.path
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | _NO_FOLLOW, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self.error(self._not_a_file(path, "a symbolic link")) from None
            raise self.error(
                f"{self.subject} is not writable: cannot create {path} ({exc})"
            ) from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise self.error(self._not_a_file(path, "not a regular file"))
        return fd

    def _not_a_file(self, path: Path, what: str) -> str:
        return (
            f"{self.subject}: its lock {path} is {what}; asynchat writes only a regular file "
            "there, never through a link. Remove it, or write elsewhere"
        )

    @staticmethod
    def _lock(fd: int) -> str | None:
        """Lock the open lock file ``fd`` and write this process into it; or, if another
        writer holds it, close ``fd`` and return who that is."""
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                return holder
        holder = f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        return None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def check(self) -> None:
        """Before each write: raise :class:`CheckpointError` unless this writer still holds
        the directory.

        A ``flock`` holds the open file, not its name: a lock file removed by hand (an
        operator clearing a "stale" lock) or replaced leaves the holder locking nothing, and
        the next writer takes the directory. A name that is gone is taken again (with a
        warning); one now locked by another writer stops this writer's saves, before they
        overwrite and prune the other run's checkpoints. A directory that is gone (removed
        by hand, with what it held) is made again and taken (with a warning): the run goes
        on saving rather than failing at its next save and losing all it had trained.
        """
        fd = self._fd
        if fd is None or fcntl is None:
            return
        path = self.path
        gone = not self.directory.is_dir()
        if gone:
            self._make_again()
        else:
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    return
        holder = self._take()  # (this writer keeps `fd` until it holds the new one)
        if holder is not None:
            raise self.error(
                f"{self.subject}: its lock file {path.name} was removed or replaced while "
                f"this run wrote there, and another writer has taken the directory "
                f"({holder}). This run writes nothing more there: {self.in_use}"
            )
        os.close(fd)
        warnings.warn(
            f"{self.subject}: the directory was removed while this run wrote there, with "
            "what it held; made again, and this run goes on writing there. Do not remove the "
            "directory of a live run"
            if gone
            else f"{self.subject}: its lock file {path.name} was removed while this run held "
            "it (a second writer could have taken the directory meanwhile); taken again. Do "
            "not remove the lock of a live run",
            CheckpointWarning,
            stacklevel=2,
        )

    def _make_again(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self.error(
                f"{self.subject}: the directory was removed while this run wrote there, and "
                f"cannot be made again: {exc}"
            ) from exc

    def release(self) -> None:
        fd, self._fd = self._fd, None
        DirectoryLock._held.discard(self)
        if fd is not None:
            os.close(fd)  # closing the file releases the flock


def _forget_locks_in_child() -> None:
    """In a forked child: close the inherited lock files (the parent's hold is unchanged)."""
    for lock in list(DirectoryLock._held):
        fd, lock._fd = lock._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
    DirectoryLock._held.clear()


os.register_at_fork(after_in_child=_forget_locks_in_child)


# -- the manifest --------------------------------------------------------------------------


def _entry_problem(entry: Any) -> str | None:
    """Why a manifest entry cannot be used, or None if it can."""
    if not isinstance(entry, dict):
        return f"entry {entry!r} is not an object"
    name = entry.get("file")
    if not isinstance(name, str) or step_of(name) is None:
        return f"file {name!r} is not a checkpoint name this library writes"
    step = entry.get("global_step")
    if not isinstance(step, int) or isinstance(step, bool) or step != step_of(name):
        return f"global_step {step!r} does not match the file {name!r}"
    digest = entry.get("sha256")
    if digest is not None and not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
        return f"sha256 {digest!r} of {name!r} is not a SHA-256 digest"
    run = entry.get("run")
    if run is not None and not is_run_id(run):
        return f"run {run!r} of {name!r} is not a run id"
    metric = entry.get("metric")
    if metric is not None and not _is_number(metric):
        return f"metric {metric!r} of {name!r} is not a number"
    metrics = entry.get("metrics", {})
    if not isinstance(metrics, dict) or not all(
        isinstance(k, str) and (v is None or _is_number(v)) for k, v in metrics.items()
    ):
        return f"metrics {metrics!r:.80} of {name!r} is not an object of numbers"
    if not isinstance(entry.get("time", 0.0), (int, float)):
        return f"time {entry.get('time')!r} of {name!r} is not a number"
    return None


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A directory's ``manifest.json``, read and checked once (a Checkpoint's begin had
    parsed it four times, for each of these)."""

    entries: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """Its usable entries, oldest first (those that are not, warned of and left out)."""
    ranking: tuple[str, str] | None = None
    """``(monitor, mode)``, if it ranks its checkpoints."""
    replaced: frozenset[str] = frozenset()
    """The checkpoints it names as replaced, removed after it was written (a crash may
    have come between): never loaded nor adopted (without this list, a run killed as it
    removed another run's checkpoints left files of steps further on than its own, and
    the next resume went on from the other run's). No name of ``entries`` is replaced."""
    unreadable: str | None = None
    """Why it holds no entries it could: it is damaged, no JSON, or not a Checkpoint's."""
    not_ours: Literal["json", "bytes"] | None = None
    """Set where no Checkpoint wrote it: ``"json"`` for JSON of another shape (another
    tool's ``manifest.json``: every manifest a Checkpoint wrote is an object with
    ``format`` and ``checkpoints``), ``"bytes"`` for what is no JSON (damaged, or no
    manifest at all) or cannot be read."""


def load_manifest(directory: Path, *, warn: bool = True) -> Manifest:
    """The manifest of ``directory`` (an empty one if it has none). Entries that name
    anything but a checkpoint of this directory (``../x``, an absolute path) or lack their
    keys are left out with a :class:`CheckpointWarning`; so, with ``warn``, is a manifest
    that is unreadable (the checkpoint files are then looked at themselves)."""
    manifest = _parse_manifest(directory / MANIFEST)
    if warn and manifest.unreadable is not None:
        warnings.warn(
            f"{directory / MANIFEST} is unreadable ({manifest.unreadable}); looking at the "
            "checkpoint files themselves",
            CheckpointWarning,
            stacklevel=2,
        )
    return manifest


def _parse_manifest(path: Path) -> Manifest:
    try:
        data = _read_json(path)
    except FileNotFoundError:
        return Manifest()
    except (OSError, ValueError, RecursionError) as exc:  # (nested too deep for the parser)
        return Manifest(unreadable=f"{type(exc).__name__}: {exc}", not_ours="bytes")
    if not isinstance(data, dict):
        what = f"JSON of another kind ({type(data).__name__})"
        return Manifest(unreadable=what, not_ours="json")
    if data and data.get("format") != FORMAT and "checkpoints" not in data:
        what = f"a JSON object with the keys {sorted(data)[:8]}"
        return Manifest(unreadable=what, not_ours="json")  # (an empty one holds nothing)
    listed = data.get("checkpoints")
    if not isinstance(listed, list):
        return Manifest(unreadable="its 'checkpoints' is missing or not a list")
    entries = []
    for entry in listed:
        problem = _entry_problem(entry)
        if problem is None:
            entries.append(entry)
        else:
            warnings.warn(f"{path}: {problem}; ignored", CheckpointWarning, stacklevel=4)
    monitor, mode = data.get("monitor"), data.get("mode")
    ranking = (monitor, mode) if isinstance(monitor, str) and mode in ("min", "max") else None
    names = data.get("replaced")
    names = names if isinstance(names, list) else []
    return Manifest(
        entries=entries,
        ranking=ranking,
        replaced=frozenset(n for n in names if isinstance(n, str) and step_of(n) is not None)
        - {e["file"] for e in entries},
    )


def read_manifest(directory: Path) -> list[dict[str, Any]]:
    """The manifest's usable entries, oldest first (see :func:`load_manifest`)."""
    return load_manifest(directory).entries


def _read_json(path: Path) -> Any:
    """The manifest's JSON (``RecursionError``: nested too deep for the parser)."""
    return json.loads(read_file(path, limit=MANIFEST_LIMIT))


def write_manifest(
    directory: Path,
    entries: list[dict[str, Any]],
    *,
    monitor: str | None,
    mode: str,
    replaced: Iterable[str] = (),
) -> None:
    """Write the manifest: ``entries``, and the names of the ``replaced`` checkpoints
    (another run's, that a ``Checkpoint(overwrite=True)`` removes once this manifest lists
    its own: see :attr:`Manifest.replaced`)."""
    manifest: dict[str, Any] = {"format": FORMAT, "version": VERSION}
    if monitor is not None:  # what "metric" means, for find_checkpoint(best=True)
        manifest.update(monitor=monitor, mode=mode)
    manifest["checkpoints"] = entries
    if names := sorted(replaced):
        manifest["replaced"] = names
    atomic_write(directory / MANIFEST, json.dumps(manifest, indent=1, allow_nan=False).encode())


def manifest_entry(
    file: str, digest: str | None, size: int, checkpoint: Mapping[str, Any], metric: float | None
) -> dict[str, Any]:
    """The manifest's entry for ``checkpoint``, written as ``file``. Beside the monitored
    ``metric`` it records the metrics measured at the checkpoint's step, so that a run
    resumed with another monitor ranks the checkpoints without reading them (it read each
    whole file: 1.1 s for four of 128 MiB, page cache warm); all of them or, past
    :data:`RECORDED_METRICS`, none (then that file is read if it must be ranked)."""
    progress = checkpoint["progress"]
    entry = {
        "file": file,
        "global_step": progress["global_step"],
        "epoch": progress["epoch"],
        "metric": metric if finite(metric) else None,  # (strict JSON: no NaN; ranks alike)
        "run": progress.get("run"),
        "sha256": digest,
        "bytes": size,
        "time": time.time(),
    }
    if len(measured := measured_metrics(checkpoint)) <= RECORDED_METRICS:
        entry["metrics"] = measured
    return entry


def measured_metrics(checkpoint: Mapping[str, Any]) -> dict[str, float | None]:
    """The metrics a checkpoint holds that were measured at its own step, the values of its
    weights (None for one that is not finite: strict JSON, and it never ranks)."""
    step = checkpoint["progress"]["global_step"]
    metrics, steps = checkpoint.get("metrics"), checkpoint.get("metric_steps")
    if not isinstance(metrics, dict):
        return {}
    steps = steps if isinstance(steps, dict) else {}  # (older checkpoints: none, all its own)
    return {
        name: float(value) if finite(value) else None
        for name, value in metrics.items()
        if isinstance(name, str) and _is_number(value) and steps.get(name, step) == step
    }


def measured_metric(metrics: object, name: str) -> float | None:
    """``metrics[name]`` as a float that ranks: None if absent, not a number or not finite."""
    value = metrics.get(name) if isinstance(metrics, dict) else None
    return float(value) if _is_number(value) and finite(value) else None


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def checkpoint_files(directory: Path) -> list[Path]:
    """Checkpoints in ``directory`` (names this module makes: regular files, and directories
    for sharded ones), by step."""
    found = []
    for path in directory.iterdir():
        if step_of(path.name) is None:
            continue
        right_kind = path.is_dir() if is_sharded(path.name) else path.is_file()
        if path.is_symlink() or not right_kind:
            kind = "directory" if is_sharded(path.name) else "regular file"
            warnings.warn(
                f"{path} is not a {kind} (a link, or the other kind); it is never loaded "
                "or deleted",
                CheckpointWarning,
                stacklevel=2,
            )
            continue
        found.append(path)
    return sorted(found, key=lambda p: step_of(p.name) or 0)


def finite(metric: float | None) -> bool:
    """Whether ``metric`` can rank a checkpoint (NaN and infinities never do)."""
    return metric is not None and math.isfinite(metric)


# -- loading -------------------------------------------------------------------------------


def load_checkpoint(
    path: str | os.PathLike[str], *, best: bool = False
) -> tuple[dict[str, Any], Path]:
    """Load a checkpoint file (or one sharded checkpoint's ``step-*.dcp`` directory), or the
    newest valid checkpoint in a directory of checkpoints (with ``best=True``, the valid one
    with the best monitored metric, as :func:`find_checkpoint` picks it: read once, where
    ``load_checkpoint(find_checkpoint(directory, best=True))`` reads it twice).

    In a directory, a newest checkpoint that is missing, truncated, corrupt, incomplete or
    does not match its checksums is reported with a :class:`CheckpointWarning` and the next
    older one is tried. Returns the checkpoint and the file it came from.
    """
    flag("best", best)
    return _load_best(path, "path") if best else read_checkpoint(path, "path")


def read_checkpoint(
    path: str | os.PathLike[str], argument: str, *, damaged: list[Path] | None = None
) -> tuple[dict[str, Any], Path]:
    """:func:`load_checkpoint`, its errors naming the ``argument`` that gave the path
    (``resume_from``, ``checkpoint``). From a directory, the newer checkpoints it tried
    first and found damaged (or gone) are added to ``damaged``."""
    check_path(argument, path)
    path = Path(path)
    one_sharded = is_sharded(path.name) and (path / EXTRAS).is_file()
    if path.is_dir() and not one_sharded:
        return _load_newest(path, argument, damaged)
    if not path.exists():
        raise CheckpointError(f"{argument}={str(path)!r}: no such file or directory")
    return _load_file(path, _expected_digest(path)), path


def resumable(directory: str | os.PathLike[str]) -> Path | None:
    """``directory`` if it holds a checkpoint to resume from, else None (it does not exist
    yet, or holds no checkpoint file): the one way for a script to say "resume if there is
    something to resume, else start fresh", as a restarted worker of an elastic job must::

        Trainer(..., resume_from=resumable("runs/exp/ckpt"),
                callbacks=[Checkpoint("runs/exp/ckpt", every_n_steps=100)])

    Only whether a checkpoint file is there is checked: loading it (and falling back from a
    damaged newest one) is the loop's, so a directory whose checkpoints are all damaged
    fails the run rather than silently starting it over.
    """
    check_path("directory", directory)
    directory = Path(directory)
    if not directory.is_dir():
        if directory.exists():
            raise CheckpointError(f"resumable: {str(directory)!r} is not a directory")
        return None
    return directory if checkpoint_files(directory) else None


def find_checkpoint(directory: str | os.PathLike[str], *, best: bool = False) -> Path:
    """The newest valid checkpoint file in ``directory`` or, with ``best=True``, the valid
    one with the best monitored metric (as the :class:`~asynchat.callbacks.Checkpoint` that
    wrote the directory ranked them: its ``monitor`` and ``mode`` are in the manifest).

    "Valid" means it loads and matches its checksums (each candidate is read to check);
    an invalid best is skipped with a :class:`CheckpointWarning` for the next best. Raises
    :class:`CheckpointError` when there is none.
    """
    check_path("directory", directory)
    flag("best", best)
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"find_checkpoint: {str(directory)!r} is not a directory")
    if not best:
        return _load_newest(directory, "directory")[1]
    return _load_best(directory, "directory")[1]


def _load_best(directory: str | os.PathLike[str], argument: str) -> tuple[dict[str, Any], Path]:
    """The valid checkpoint of ``directory`` with the best monitored metric, loaded, and its
    file (see :func:`find_checkpoint`); errors name the ``argument`` that gave it."""
    check_path(argument, directory)
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(
            f"{argument}={str(directory)!r} is not a directory (best=True picks among a "
            "directory's checkpoints)"
        )
    manifest = load_manifest(directory, warn=False)
    if manifest.ranking is None:
        why = "written without monitor=..." if manifest.unreadable is None else "unreadable: "
        raise CheckpointError(
            f"{directory}: its manifest ranks no checkpoint "
            f"({why}{manifest.unreadable or ''}); use best=False for the newest"
        )
    monitor, mode = manifest.ranking
    ranked = [e for e in manifest.entries if finite(e["metric"])]
    ranked.sort(key=lambda e: float(e["metric"]), reverse=mode == "max")
    for entry in ranked:
        file: Path = directory / str(entry["file"])
        try:
            if file.is_symlink():
                raise CheckpointError(f"{file} is a symbolic link, not a checkpoint file")
            return _load_file(file, entry.get("sha256")), file
        except CheckpointError as exc:
            warnings.warn(f"{exc}; trying the next best", CheckpointWarning, stacklevel=3)
    raise CheckpointError(f"{directory}: no valid checkpoint has a {monitor!r} value")


def load_weights(
    module: torch.nn.Module,
    checkpoint: str | os.PathLike[str] | Mapping[str, Any],
    *,
    prefix: str = "",
    strict: bool = True,
    best: bool = False,
) -> IncompatibleKeys:
    """Load a checkpoint's model weights into ``module``, e.g. to evaluate or deploy it.

    ``checkpoint`` is a checkpoint file, a directory (its newest valid checkpoint or, with
    ``best=True``, the valid one with the best monitored metric, read once) or a checkpoint
    already loaded. ``prefix`` takes one submodule's weights out of the whole model's:
    ``load_weights(generator, path, prefix="generator.")`` loads the entries named
    ``generator.*`` with the prefix removed. ``strict`` is passed to
    ``module.load_state_dict``, whose result (the ``missing_keys`` and ``unexpected_keys``,
    with ``strict=False``) is returned. Names are the model's uncompiled ones: ``module``
    may be compiled or not, as the trained one.
    """
    flag("strict", strict)
    flag("best", best)
    if isinstance(checkpoint, Mapping):
        if best:
            raise ValueError(
                "best=True picks among a directory's checkpoints; checkpoint is one loaded already"
            )
        loaded = checkpoint
    elif best:
        loaded = _load_best(checkpoint, "checkpoint")[0]
    else:
        loaded = read_checkpoint(checkpoint, "checkpoint")[0]
    if isinstance(loaded.get("sharded"), Mapping):
        from asynchat._dcp import load_module

        return load_module(Path(loaded["sharded"]["path"]), module, prefix=prefix, strict=strict)
    weights = loaded.get("model")
    if not isinstance(weights, Mapping):
        raise CheckpointError("the checkpoint has no 'model' entry of weights")
    chosen = under(weights, prefix)
    if not chosen:
        tops = sorted({plain_name(k).split(".", 1)[0] + "." for k in weights})
        raise CheckpointError(
            f"no weights start with prefix={prefix!r}; the checkpoint's model has {tops}"
        )
    return load_portable(module, chosen, strict=strict)


def saved_metrics(file: Path, digest: str | None) -> dict[str, float | None] | None:
    """The metrics the checkpoint ``file`` holds that were measured at its step (see
    :func:`measured_metrics`); None if it is damaged (with a :class:`CheckpointWarning`)."""
    try:
        checkpoint = _load_file(file, digest)
    except CheckpointError as exc:
        warnings.warn(f"{exc}; it is kept unranked", CheckpointWarning, stacklevel=3)
        return None
    return measured_metrics(checkpoint)


def _expected_digest(path: Path) -> str | None:
    if path.parent.is_dir():
        for entry in read_manifest(path.parent):
            if entry["file"] == path.name:
                digest = entry.get("sha256")
                return digest if isinstance(digest, str) else None
    return None


def _load_newest(
    directory: Path, argument: str, damaged: list[Path] | None = None
) -> tuple[dict[str, Any], Path]:
    manifest = load_manifest(directory)
    digests = {e["file"]: e.get("sha256") for e in manifest.entries}
    # Newest first. Files not in the manifest were written before a crash reached it; names
    # the manifest lists but that are gone are reported when tried.
    found = {p.name for p in checkpoint_files(directory)} - manifest.replaced
    names = sorted(
        found | set(digests),
        key=lambda name: step_of(name) or 0,
        reverse=True,
    )
    problems: list[str] = []
    for name in names:
        file = directory / name
        try:
            if file.is_symlink():
                raise CheckpointError(f"{file} is a symbolic link, not a checkpoint file")
            return _load_file(file, digests.get(name)), file
        except CheckpointError as exc:
            problems.append(str(exc))
            if damaged is not None:
                damaged.append(file)
            warnings.warn(f"{exc}; trying an older checkpoint", CheckpointWarning, stacklevel=3)
    tried = "; ".join(problems) if problems else "it holds no checkpoint"
    raise CheckpointError(f"{argument}={str(directory)!r}: no valid checkpoint ({tried})")


def _load_file(file: Path, digest: str | None) -> dict[str, Any]:
    """Read and check a checkpoint file, or a sharded checkpoint's :data:`EXTRAS` and shard
    files (then ``checkpoint["sharded"]["path"]`` is its directory, for DCP to load)."""
    sharded = is_sharded(file.name)
    if sharded and (file / EXTRAS).is_symlink():
        raise CheckpointError(f"{file / EXTRAS} is a symbolic link, not a checkpoint file")
    obj = _read_checkpoint(file / EXTRAS if sharded else file, digest)
    _check_complete(file, obj, sharded)
    if sharded:
        _check_shards(file, obj)
        obj["sharded"]["path"] = str(file)
    return obj


def _check_shards(directory: Path, obj: dict[str, Any]) -> None:
    """Each of DCP's files there and unchanged (their digests are in :data:`EXTRAS`)."""
    digests = obj["sharded"].get("files")
    if not isinstance(digests, Mapping) or ".metadata" not in digests:
        raise CheckpointError(f"{directory} does not list its shard files")
    for name, expected in digests.items():
        path = directory / str(name)
        if "/" in str(name) or path.is_symlink() or not path.is_file():
            raise CheckpointError(f"{directory}: its shard file {name!r} is missing")
        if _sha256(path) != expected:
            raise CheckpointError(f"{path} does not match its checksum (truncated or corrupt)")


def _why(exc: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in a line: torch's own message
    advises loading it with ``weights_only=False``, which would run any code it names
    (garbage gets that advice too)."""
    message = str(exc)
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", message)
    if found is not None:
        allow = (
            " (a type of yours that it holds loads once allowed with "
            "torch.serialization.add_safe_globals)"
            if "Unsupported global" in found.group(1)
            else ""
        )
        return (
            f"a weights-only load refused it: {found.group(1).strip()}{allow}; asynchat "
            "never unpickles a checkpoint fully, which could run any code it names"
        )
    return f"{type(exc).__name__}: {message.splitlines()[0] if message else ''}"


def _read_checkpoint(file: Path, digest: str | None) -> dict[str, Any]:
    try:
        data = read_file(file)
    except OSError as exc:
        raise CheckpointError(f"{file} cannot be read: {exc}") from exc
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(f"{file} does not match its manifest checksum (truncated or corrupt)")
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{file} is not a loadable checkpoint ({_why(exc)})") from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(
            f"{file} is not an asynchat checkpoint (a torch file without the "
            f"'format': {FORMAT!r} entry); to load plain weights use model.load_state_dict"
        )
    if obj.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{file} has checkpoint version {obj.get('version')!r}; this asynchat reads "
            f"versions {READABLE_VERSIONS}"
        )
    _check_integrity(file, obj)
    return obj


def _check_integrity(file: Path, obj: dict[str, Any]) -> None:
    integrity = obj.pop("integrity", None)
    if obj["version"] == 1:
        return  # written before checkpoints carried their own digest
    expected = integrity.get("sha256") if isinstance(integrity, dict) else None
    if not isinstance(expected, str):
        raise CheckpointError(f"{file} has no content digest (its 'integrity' entry is missing)")
    if content_digest(obj) != expected:
        raise CheckpointError(
            f"{file} does not match its own content digest (bit rot or tampering)"
        )


_PROGRESS_KEYS = ("epoch", "steps_in_epoch", "epoch_exhausted", "global_step")


def _check_complete(file: Path, obj: dict[str, Any], sharded: bool) -> None:
    progress = obj.get("progress")
    if not isinstance(progress, dict) or any(key not in progress for key in _PROGRESS_KEYS):
        raise CheckpointError(f"{file} has no complete 'progress' entry {_PROGRESS_KEYS}")
    _check_progress(file, progress)
    if sharded and not isinstance(obj.get("sharded"), dict):
        raise CheckpointError(f"{file} has no 'sharded' entry")
    for key in ("sharded" if sharded else "model", "processor", "callbacks", "metrics", "rng"):
        if key not in obj:
            raise CheckpointError(f"{file} has no {key!r} entry")
    if "ranks" in obj and not _are_rank_parts(obj["ranks"]):  # a distributed trainer's
        raise CheckpointError(
            f"{file} has a malformed 'ranks' entry (each rank's part: a dict with 'rng', "
            "'metrics' and 'callbacks')"
        )


def _check_progress(file: Path, progress: dict[str, Any]) -> None:
    """Counts that are counts, and the step the file is named after (a file renamed by
    hand would be taken for a newer or older checkpoint than it is)."""
    for key in ("epoch", "steps_in_epoch", "global_step"):
        value = progress[key]
        if not _count(value, least=0):
            raise CheckpointError(
                f"{file}: its progress has {key}={value!r}, which is no count of "
                "this library's (a whole number, 0 or more)"
            )
    for key in ("world_size", "batch_size"):  # (None: a loader without a batch size)
        value = progress.get(key, 1)
        if value is not None and not _count(value, least=1):
            raise CheckpointError(
                f"{file}: its progress has {key}={value!r}, not a whole number of 1 or more"
            )
    if not isinstance(progress["epoch_exhausted"], bool):
        raise CheckpointError(
            f"{file}: its progress has epoch_exhausted={progress['epoch_exhausted']!r}, "
            "not True or False"
        )
    run = progress.get("run")  # (absent from older checkpoints)
    if run is not None and not is_run_id(run):
        raise CheckpointError(f"{file}: its progress has run={run!r}, which is no run id")
    named = step_of(file.name)
    if named is not None and named != progress["global_step"]:
        raise CheckpointError(
            f"{file} holds global step {progress['global_step']}, not the step its name "
            f"says ({named}): renamed by hand? A checkpoint is found by its name's step"
        )


def is_run_id(value: object) -> bool:
    """Whether ``value`` is a loop's ``run_id`` (``uuid4().hex``)."""
    return isinstance(value, str) and _RUN_ID.fullmatch(value) is not None


def _count(value: object, *, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _are_rank_parts(ranks: object) -> bool:
    return isinstance(ranks, list) and bool(ranks) and all(map(_is_rank_part, ranks))


def _is_rank_part(part: object) -> bool:
    return (
        isinstance(part, dict)
        and "rng" in part
        and isinstance(part.get("metrics"), dict)
        and isinstance(part.get("callbacks"), dict)
    )


def check_loadable(checkpoint: Mapping[str, Any]) -> None:
    """Refuse, before anything is written, a checkpoint that resuming could not load: one
    holding a value ``torch.load(weights_only=True)`` refuses (a numpy number, a dataclass,
    an enum in a callback's ``state_dict()``). Every save of such a run succeeded and none
    could be resumed. Its tensors are left out of the check; the rest (small) is written
    and read back as resuming reads it, so what ``torch.serialization.add_safe_globals``
    allows passes."""
    if _plain(checkpoint):  # the usual case, told by a walk alone
        return
    skeleton = _without_tensors(checkpoint)
    try:
        _read_back(skeleton)
    except Exception as exc:
        where, value = _first_unloadable(skeleton, "checkpoint") or ("checkpoint", skeleton)
        kind = type(value)
        raise CheckpointError(
            f"{where} is a {kind.__module__}.{kind.__qualname__}, which a checkpoint cannot "
            "hold: resuming loads checkpoints with torch.load(weights_only=True), which "
            "refuses it, so none written by this run could be resumed. Keep tensors "
            "and plain Python values (float(x), int(x), str, lists, dicts) in state_dict(), "
            "or allow the type, in every process that saves or resumes, with "
            f"torch.serialization.add_safe_globals([{kind.__qualname__}])"
        ) from exc


# What the check reads into, and the values it knows resuming loads without reading back.
_MAPPINGS = (dict, collections.OrderedDict)
_SEQUENCES = (list, tuple, set, frozenset)
_PLAIN = frozenset({type(None), bool, int, float, str, bytes})


def _plain(obj: Any) -> bool:
    """Whether ``obj`` is tensors and plain values in dicts, lists, tuples and sets."""
    kind = type(obj)
    if kind in _PLAIN or isinstance(obj, torch.Tensor):
        return True
    if kind in _MAPPINGS:
        return all(_plain(key) and _plain(value) for key, value in obj.items())
    if kind in _SEQUENCES:
        return all(_plain(value) for value in obj)
    return False


def _without_tensors(obj: Any) -> Any:
    """``obj`` with every tensor in its dicts, lists, tuples and sets made None."""
    kind = type(obj)
    if isinstance(obj, torch.Tensor):
        return None
    if kind in _MAPPINGS:
        return kind((key, _without_tensors(value)) for key, value in obj.items())
    if kind in _SEQUENCES:
        return kind(_without_tensors(value) for value in obj)
    return obj


def _read_back(obj: Any) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)


def _first_unloadable(obj: Any, where: str) -> tuple[str, Any] | None:
    """Where in ``obj`` the first value that does not read back is, and the value."""
    kind = type(obj)
    parts: list[tuple[str, Any]]
    if kind in _MAPPINGS:
        parts = [(f"{where}'s key {key!r}", key) for key in obj]
        parts += [(f"{where}[{key!r}]", value) for key, value in obj.items()]
    elif kind in _SEQUENCES:
        parts = [(f"{where}[{index}]", value) for index, value in enumerate(obj)]
    else:
        try:
            _read_back(obj)
        except Exception:
            return where, obj
        return None
    for path, part in parts:
        if (found := _first_unloadable(part, path)) is not None:
            return found
    return None
