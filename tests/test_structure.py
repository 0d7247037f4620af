"""The package's shape: no import cycle between its modules, not even for the type checker,
no function that has grown past what a reader takes in at once, and nothing imported that
only some jobs need."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import asynchat

PACKAGE = Path(asynchat.__file__).parent
MAX_FUNCTION_LINES = 50  # docstring included


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Each module's imports of other asynchat modules, ``TYPE_CHECKING`` blocks and
    function-local imports included."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import submodule` imports the submodule (and runs pkg's
                # __init__, which is already running or done when pkg's own module runs).
                subs = [f"{node.module}.{a.name}" for a in node.names]
                targets = [t for t in subs if t in modules] or [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def test_no_import_cycle_between_private_modules() -> None:
    graph = _imports()
    # Package __init__ files re-export their modules: an edge into one is an edge to what it
    # re-exports, so they are left out (the modules themselves must not import them back).
    inits = {name for name in graph if (PACKAGE.parent / name.replace(".", "/")).is_dir()}
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node] - inits):
            if state.get(nxt) == "open":
                cycle = [*path[path.index(nxt) :], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for module in sorted(set(graph) - inits):
        if module not in state:
            visit(module, [module])


def test_no_private_module_imports_the_package_root() -> None:
    offenders = {m for m, deps in _imports().items() if "asynchat" in deps and m != "asynchat"}
    assert not offenders, f"modules importing the package root (a cycle): {sorted(offenders)}"


def test_no_function_over_the_length_limit() -> None:
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno is not None
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({lines})")
    assert not long, "functions over the limit: " + ", ".join(long)


def test_importing_asynchat_leaves_what_only_sharded_jobs_need_unimported() -> None:
    # FSDP brings DTensor and sympy: 0.6 of the 1.8 s that ``import asynchat`` took with them
    # on this machine, paid by every process (each rank, each DataLoader worker spawned).
    heavy = ("torch.distributed.fsdp", "torch.distributed.tensor", "sympy")
    code = f"import sys, asynchat; print([m for m in {heavy!r} if m in sys.modules])"
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert found == "[]", f"import asynchat imported {found}"
