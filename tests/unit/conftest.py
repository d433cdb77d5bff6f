"""Fixtures of the unit layer: real image files formatted by atomicfs.mkfs (no root, no FUSE)."""
from __future__ import annotations

from pathlib import Path

import pytest

from atomicfs import format as fmt
from atomicfs.mkfs import mkfs


@pytest.fixture
def fs_image(tmp_path: Path) -> str:
    """A freshly formatted sparse image of the minimum size (64 MiB, 8 MiB log)."""
    path = str(tmp_path / "fs.img")
    mkfs(path, size=fmt.MIN_SIZE)
    return path
