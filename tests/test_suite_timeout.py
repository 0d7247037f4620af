"""The suite's own safety net: a test that hangs fails the run in pytest-timeout's time, on
every backend the suite runs on, instead of holding CI until its limit."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Job, finished, wait_for_line

REPOSITORY = Path(__file__).resolve().parent.parent

HANGING = """
import anyio
import pytest

pytestmark = pytest.mark.anyio


@pytest.fixture(params=[pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"), "trio"])
def anyio_backend(request):
    return request.param


async def test_hangs():
    await anyio.Event().wait()
"""


@pytest.mark.parametrize("backend", ["uvloop", "trio"])
def test_a_hung_test_ends_the_run_with_its_stacks(tmp_path: Path, backend: str) -> None:
    """With SIGALRM (pytest-timeout's default) the failure raised in uvloop's run loop, or in
    trio's under anyio's pytest runner, never got out: the run hung for good."""
    (tmp_path / "test_hanging.py").write_text(HANGING)
    command = [sys.executable, "-m", "pytest", "-c", str(REPOSITORY / "pyproject.toml"),
               "--rootdir", str(tmp_path), "-p", "no:cacheprovider", "--timeout", "2",
               "-k", backend, str(tmp_path / "test_hanging.py")]  # fmt: skip
    began = time.monotonic()
    run = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    took = time.monotonic() - began
    assert run.returncode != 0, run.stdout
    assert "Timeout" in run.stdout + run.stderr, run.stdout + run.stderr
    assert "test_hanging.py" in run.stdout, "the run names the hung test's file"
    assert took < 30, f"the run took {took:.0f} s to end"


def test_a_job_that_hangs_fails_its_test_in_the_time_given_with_its_stacks(
    tmp_path: Path,
) -> None:
    script = tmp_path / "hung.py"
    script.write_text(
        "import faulthandler, signal, threading\n"
        "faulthandler.register(signal.SIGUSR1, all_threads=True)\n"
        "print('ready', flush=True)\n"
        "threading.Event().wait()\n"
    )
    with Job(str(script), cwd=tmp_path) as job:
        assert job.line() == "ready"
        began = time.monotonic()
        with pytest.raises(pytest.fail.Exception) as silent:
            job.line(timeout=1)
    assert time.monotonic() - began < 10
    assert job.returncode == -signal.SIGKILL
    assert "no line on its stdout within 1 s" in str(silent.value)
    assert "Current thread" in str(silent.value) and "hung.py" in str(silent.value)

    with Job(str(script), cwd=tmp_path) as job:
        assert job.line() == "ready"
        with pytest.raises(pytest.fail.Exception) as unended:
            job.ended(timeout=1)
    assert "not ended within 1 s" in str(unended.value) and "hung.py" in str(unended.value)


def test_a_process_that_never_says_its_line_or_never_ends_fails_its_test(tmp_path: Path) -> None:
    def started(code: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip

    hangs = "import time; print('step 1', flush=True); time.sleep(600)"
    with started(hangs) as process:
        began = time.monotonic()
        with pytest.raises(pytest.fail.Exception, match="did not say 'step 3' within 1 s"):
            wait_for_line(process, "step 3", timeout=1)
        assert time.monotonic() - began < 15 and process.returncode == -signal.SIGKILL
    said = r"(?s)returncode 0\); it said:\nstep 1"  # (a loop over readline() spun forever)
    with started("print('step 1')") as process, pytest.raises(pytest.fail.Exception, match=said):
        wait_for_line(process, "step 3", timeout=30)
    unended = r"(?s)not ended within 1 s.*step 1"
    with started(hangs) as process, pytest.raises(pytest.fail.Exception, match=unended):
        finished(process, timeout=1)
    assert process.returncode == -signal.SIGKILL
