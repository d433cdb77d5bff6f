"""Device.readv: small reads run inline when nothing else of the device is in flight;
larger ones, and any read while another request is in flight, go through the I/O threads.
Either way the data is the device's."""
from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from atomicfs import device as devmod
from atomicfs.device import Device
from atomicfs.native import Buffer


def _image(tmp_path: Path) -> str:
    img = tmp_path / "dev.img"
    with open(img, "wb") as f:
        for i in range(64):
            f.write(bytes([i]) * 65536)
    return str(img)


async def test_small_reads_run_inline_only_when_the_device_is_idle(tmp_path: Path) -> None:
    dev = Device.open(_image(tmp_path))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(dev.run_reaper)
            small = Buffer(4096)
            await dev.readv(3 * 65536, [(small, 0, 4096)])
            assert small.bytes() == bytes([3]) * 4096
            assert (dev.inline_reads, dev.read_ios) == (1, 1)
            large = Buffer(devmod.INLINE_READ_MAX + 4096)
            await dev.readv(5 * 65536, [(large, 0, large.size)])
            assert large.bytes(0, 65536) == bytes([5]) * 65536
            assert large.bytes(65536, 4096) == bytes([6]) * 4096
            assert (dev.inline_reads, dev.read_ios) == (1, 2)  # through the queue

            # while another request is in flight (a write held 0.5 s), a small read queues
            dev.set_delay(0.5)
            data = Buffer(4096)
            nursery.start_soon(dev.writev, 60 * 65536, [(data, 0, 4096)], "data")
            await trio.testing.wait_all_tasks_blocked()
            assert dev._pending
            await dev.readv(9 * 65536, [(small, 0, 4096)])
            assert small.bytes() == bytes([9]) * 4096
            assert dev.inline_reads == 1 and dev._pending  # the write is still in flight
            nursery.cancel_scope.cancel()
    finally:
        dev.close()
