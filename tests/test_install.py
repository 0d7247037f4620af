"""The installed package wins over the standard library's `asynchat` on Python < 3.12."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import asynchat

PACKAGE_INIT = Path(asynchat.__file__).resolve()


def run_python(code: str, cwd: Path, *flags: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-W", "error", *flags, "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return result.stdout.strip()


def test_import_from_outside_the_repository_finds_this_package(tmp_path: Path) -> None:
    out = run_python("import asynchat; print(asynchat.__file__); print(asynchat.Trainer)", tmp_path)
    file, trainer = out.splitlines()
    assert Path(file).resolve() == PACKAGE_INIT
    assert trainer == "<class 'asynchat._trainer.Trainer'>"


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="the stdlib module is gone on 3.12+")
def test_without_site_processing_the_stdlib_module_would_win(tmp_path: Path) -> None:
    """Proves the test above depends on the .pth hook: with -S (no .pth) stdlib's is found."""
    out = run_python(
        "import importlib.util; print(importlib.util.find_spec('asynchat').origin)", tmp_path, "-S"
    )
    assert Path(out).name == "asynchat.py"
    assert Path(out).resolve() != PACKAGE_INIT


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="the hook installs nothing on 3.12+")
def test_the_precedence_finder_is_installed_once_and_only_answers_for_asynchat() -> None:
    import _asynchat_precedence

    finders = [f for f in sys.meta_path if type(f).__name__ == "AsynchatPrecedenceFinder"]
    assert len(finders) == 1
    _asynchat_precedence.install()  # idempotent
    assert [f for f in sys.meta_path if type(f).__name__ == "AsynchatPrecedenceFinder"] == finders
    finder = finders[0]
    assert finder.find_spec("asyncio", None) is None
    spec = finder.find_spec("asynchat", None)
    assert spec is not None and spec.origin is not None
    assert Path(spec.origin).resolve() == PACKAGE_INIT
