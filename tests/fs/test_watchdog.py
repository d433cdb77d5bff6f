"""The watchdog: work in flight is visible with what it waits for, and slow work is logged
once (issue 17: the next hang, if any, must explain itself)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import trio

from atomicfs.mkfs import mkfs
from atomicfs.options import parse_mount_options
from tests.fs.helpers import Ctx, open_fs


# (the fsync writes the log batch in its own task: it waits for the device write itself)
@pytest.mark.daemon_log(allow=[r"^fsync 1 has run for \d+ s, waiting for (log batch 1 to be"
                               r"|device log write at)",
                               r"^fsync 1 finished after [\d.]+ s$"])
async def test_a_slow_fsync_is_shown_and_logged_with_what_it_waits_for(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    img = str(tmp_path / "fs.img")
    mkfs(img, size=64 << 20)
    async with open_fs(img, parse_mount_options(["delay=300"])) as d:
        fs, vol = d.fs, d.fs.vol
        vol.watchdog.threshold = 0.1
        fi, _ = await fs.create(1, b"f", 0o644, os.O_RDWR, Ctx())
        await fs.write(fi.fh, 0, b"x" * 65536)
        seen: list[dict[str, object]] = []

        async def look() -> None:
            await trio.sleep(0.15)
            oldest = vol.mount_stats()["requests"]["oldest"]
            seen.append(oldest)
            assert vol.watchdog.check() == 1  # what the watchdog task does periodically
            assert vol.watchdog.check() == 0  # once

        caplog.set_level(logging.WARNING, logger="atomicfs.watchdog")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(look)
            with trio.fail_after(30):
                await fs.fsync(fi.fh, False)
        await fs.release(fi.fh)
        assert seen and seen[0] is not None
        assert seen[0]["kind"] == "fsync"
        assert float(seen[0]["age_s"]) >= 0.1  # type: ignore[arg-type]
        assert "device" in str(seen[0]["waiting_for"]) or "log batch" in \
            str(seen[0]["waiting_for"])
        slow = [r.getMessage() for r in caplog.records if "has run for" in r.getMessage()]
        assert any(m.startswith("fsync") for m in slow), slow
        assert vol.mount_stats()["requests"]["reported_slow"] >= 1
