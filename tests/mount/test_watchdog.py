"""On a real mount, `atomicfs stat MOUNTPOINT` names the oldest request in flight and what it
waits for (issue 17: a hang must explain itself)."""
from __future__ import annotations

import os
import threading
import time

from tests.conftest import MountFactory, cli


def test_stat_shows_the_oldest_request_and_its_wait(image: str, mounter: MountFactory) -> None:
    m = mounter(image, "delay=1500")  # every device request takes 1.5 s
    path = m / "f"
    done = threading.Event()

    def fsync_writer() -> None:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            os.pwrite(fd, b"x" * 65536, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
            done.set()

    t = threading.Thread(target=fsync_writer)
    t.start()
    try:
        deadline = time.monotonic() + 20
        oldest = None
        while time.monotonic() < deadline and not done.is_set():
            req = m.stat()["requests"]
            oldest = req["oldest"]
            if oldest and oldest["kind"] == "fsync" and oldest["waiting_for"]:
                break
            time.sleep(0.05)
        assert oldest and oldest["kind"] == "fsync", oldest
        assert "device" in oldest["waiting_for"] or "log batch" in oldest["waiting_for"], \
            oldest
        text = cli("stat", m.path).stdout
        assert "requests: " in text and "oldest fsync" in text, text
    finally:
        t.join(60)
    assert done.is_set()
    assert m.stat()["requests"]["oldest"] is None  # nothing but the stat request itself
