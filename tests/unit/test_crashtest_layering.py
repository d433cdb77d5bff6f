"""The crash explorer is a user of the filesystem, not part of it: no module of the runtime
imports atomicfs.crashtest. Only the command line (which dispatches `atomicfs crashtest`)
and the demo, which sit above both, may."""
from __future__ import annotations

import ast
from pathlib import Path

import atomicfs

PACKAGE = Path(atomicfs.__file__).resolve().parent
ABOVE = {"cli.py", "demo.py", "demo_png.py"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_runtime_does_not_import_the_crash_explorer() -> None:
    runtime = [p for p in PACKAGE.glob("*.py") if p.name not in ABOVE]
    assert len(runtime) > 20
    upward = {p.name: sorted(n for n in _imports(p) if n.startswith("atomicfs.crashtest"))
              for p in runtime}
    assert {k: v for k, v in upward.items() if v} == {}
