"""Requests flow down only: every import in the package points to a lower layer.

The table below is the architecture (README "Design"; DESIGN.md "Architecture"), bottom
first. A module may import only modules of lower layers; modules of one layer do not import
each other, except in the top layer (the entry points: commands, the mount helpers, the
crash explorer and the demo, which sit above the filesystem and use one another). Every
import counts, also those inside functions and under TYPE_CHECKING: a lazy or type-only
import upward is still a lower layer knowing a higher one. A new module must be placed here.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import atomicfs

PACKAGE = Path(atomicfs.__file__).resolve().parent

LAYERS: list[set[str]] = [
    {"_native", "errors", "sizes", "stats", "locks"},  # _native: the C core (cffi)
    {"native", "runtime", "probe", "fuseconn"},
    {"watchdog", "format", "daemonlog", "fuseloop"},  # fuseloop: the FUSE request loop
    {"device", "metadata", "alloc"},                # the backing store; in-memory metadata
    {"superblock", "options"},
    {"owner", "replay", "consistency"},
    {"recovery", "journal", "folio"},               # the log; the folio objects
    {"pagecache"},                                  # folio state and its transitions
    {"delalloc", "checkpoint"},
    {"submit"},                                     # the write paths of writeback
    {"writeback"},                                  # routing, write-through, fsync
    {"flusher"},                                    # dirty balancing, background flusher
    {"filemap"},                                    # buffered read/write/truncate
    {"volume", "mkfs"},                             # wiring and the facade fs uses
    {"handles", "fsck"},
    {"control"},                                    # the user.atomicfs.* attributes
    {"namespace"},
    {"fs"},                                         # pyfuse3 Operations
    {"daemon"},
    {"cli", "helpers", "manpages", "__main__", "__init__", "run", "statview",
     "crashtest", "demo", "demo_png"},
]
TOP = len(LAYERS) - 1

# The FUSE layer reaches the data path only through the Volume facade and the file map.
FUSE_LAYER = {"fs", "control", "namespace", "handles"}
BELOW_THE_FACADE = {"journal", "checkpoint", "writeback", "submit", "flusher", "delalloc",
                    "alloc", "pagecache", "folio", "replay", "superblock", "recovery"}


def _rank() -> dict[str, int]:
    return {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _unit(path: Path) -> str:
    """The table's name for a module: its file name, or `crashtest` for the subpackage."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else path.stem


def _imported_units(path: Path) -> set[str]:
    """The package's units a module imports (any import statement anywhere in it)."""
    units: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            if node.module == "atomicfs":
                units.update(alias.name for alias in node.names if alias.name != "__version__")
            elif node.module and node.module.startswith("atomicfs."):
                units.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            units.update(alias.name.split(".")[1] for alias in node.names
                         if alias.name.startswith("atomicfs."))
    return units


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _violations(rank: dict[str, int]) -> list[str]:
    found = []
    for path in _modules():
        me = _unit(path)
        for dep in sorted(_imported_units(path) - {me}):
            if rank[dep] > rank[me] or rank[dep] == rank[me] != TOP:
                found.append(f"{path.relative_to(PACKAGE)} imports {dep} "
                             f"(layer {rank[me]} -> {rank[dep]})")
            if me in FUSE_LAYER and dep in BELOW_THE_FACADE:
                found.append(f"{path.relative_to(PACKAGE)} imports {dep}, below the facade")
    return found


def test_every_module_has_a_layer() -> None:
    rank = _rank()
    units = {_unit(p) for p in _modules()}
    assert len(units) > 40
    assert units - set(rank) == set(), "place new modules in LAYERS"
    assert {n for n in rank if n != "_native"} - units == set(), "LAYERS names a gone module"
    assert sum(len(layer) for layer in LAYERS) == len(rank), "a module in two layers"


def test_every_import_points_down() -> None:
    assert _violations(_rank()) == []


@pytest.mark.parametrize("low, high", [("pagecache", "writeback"), ("device", "owner"),
                                       ("journal", "checkpoint")])
def test_an_upward_import_is_caught(low: str, high: str) -> None:
    """The check itself can fail: pretend the lower module sat above the higher one."""
    rank = _rank()
    rank[low], rank[high] = rank[high], rank[low]
    assert any(v.startswith(f"{high}.py imports {low}") for v in _violations(rank))
