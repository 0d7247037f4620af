"""The README's example runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(tmp_path: Path) -> None:
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    script = tmp_path / "example.py"
    script.write_text(code)
    result = subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"epoch {i}" for i in range(5)]
    assert lines[-1].endswith("step 250")


def test_readme_commands_are_what_ci_runs() -> None:
    readme = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    assert len(commands) >= 2
    assert commands[1] in ci.splitlines(), "the README's test command is the one .ci/run runs"
    assert readme.index(commands[0]) < readme.index(commands[1])


def test_the_readme_loop_diagram_is_the_one_in_phase() -> None:
    import inspect

    from asynchat import Phase

    readme = README.read_text()
    section = readme[readme.index("## The loop") :]
    block = re.findall(r"```\n(.*?)\n```", section, re.S)[0]
    doc = inspect.cleandoc(Phase.__doc__ or "")
    diagram = doc.split("::\n\n", 1)[1].split("\n\n", 1)[0]
    assert block == inspect.cleandoc("\n" + diagram)
