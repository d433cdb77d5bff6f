"""Folio state changes only through the named transitions of pagecache.py (folio.py
defines the objects): no other module of the package assigns a folio's state fields."""
from __future__ import annotations

import ast
from pathlib import Path

import atomicfs

PACKAGE = Path(atomicfs.__file__).resolve().parent
OWNERS = {"pagecache.py", "folio.py"}
# Fields only a Folio has in this package: any assignment to them is a folio's.
FOLIO_ONLY = {"uptodate", "reserved", "io", "io_mask", "locked", "pins", "group",
              "dirty_since", "in_lru", "_event"}
# Fields other objects have too (Mapping.dirty, DataRun.buf, WriteOutcome.logged_seq):
# a folio's when the object is named as one.
SHARED = {"dirty", "atomic", "logged_seq", "buf"}
FOLIO_NAMES = {"f", "fo", "folio", "member", "head"}


def _is_folio(expr: ast.expr) -> bool:
    text = ast.unparse(expr)
    return text.split(".")[-1] in FOLIO_NAMES or "folio" in text.lower()


def _assignments(source: str, name: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        else:
            continue
        for target in targets:
            for sub in ast.walk(target):
                if isinstance(sub, ast.Attribute) and (
                        sub.attr in FOLIO_ONLY or sub.attr in SHARED and _is_folio(sub.value)):
                    found.append(f"{name}:{node.lineno}: {ast.unparse(target)}")
    return found


def test_only_the_page_cache_changes_folio_state() -> None:
    modules = [p for p in PACKAGE.rglob("*.py") if p.name not in OWNERS]
    assert len(modules) > 40
    found = [a for p in modules for a in _assignments(p.read_text(), p.name)]
    assert found == []


def test_the_check_sees_a_direct_change() -> None:
    source = ("def f(folio, m, run):\n"
              "    folio.uptodate |= 1\n"
              "    folio.dirty = 0\n"
              "    m.dirty.add(1)\n"
              "    run.buf = None\n")
    assert _assignments(source, "x.py") == ["x.py:2: folio.uptodate", "x.py:3: folio.dirty"]
