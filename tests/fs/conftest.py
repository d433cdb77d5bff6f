"""Fixtures for driving the Operations object without a mount."""
from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator

import pyfuse3
import pytest

from tests.fs.helpers import Driver, fake_readdir_reply, make_image, open_fs


@pytest.fixture(autouse=True)
def _readdir_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    # readdir_reply writes into the kernel's buffer; without a kernel, collect entries.
    monkeypatch.setattr(pyfuse3, "readdir_reply", fake_readdir_reply)


@pytest.fixture
def fs_image(tmp_path: Path) -> str:
    return make_image(str(tmp_path / "fs.img"))


@pytest.fixture
async def drv(fs_image: str) -> AsyncIterator[Driver]:
    async with open_fs(fs_image) as d:
        yield d
