"""The demo's instrument: the recording block device (a loop device over a recording FUSE
file) and ext4 against atomicfs under the same power cuts, in a short form; the picture.

Torn pages on ext4 are a matter of where the random crash points fall: every fsync writes
the file's dirty pages and then flushes, and a cut between the two may tear a page that is
being overwritten. Between one state in fifteen and one in four does (4..15 of 60 in eight runs
with different seeds); over 150 states the chance of none is below one in ten thousand.
The cuts just before flushes involve no chance: each leaves every write the flush would
have covered torn, and ext4 tears a page in about two of three of them.
"""
from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from atomicfs.crashtest.blockdev import recording_device
from atomicfs.crashtest.compare import FsResult, Tally, compare, table
from atomicfs.crashtest.recording import Recording
from atomicfs.crashtest.workloads.base import Verdict
from atomicfs.demo_png import CELL_H, CELL_W, LOST, TORN, write_page_grid
from tests.conftest import need

pytestmark = pytest.mark.mount


def _no_leftovers(tmp: Path) -> None:
    with open("/proc/mounts") as f:
        assert str(tmp) not in f.read()
    assert str(tmp) not in os.popen("losetup -a").read()


def test_recording_device_records_every_write_and_flush(mount_env: None,
                                                        tmp_path: Path) -> None:
    """Writes and an fsync through the loop device: the image at the end is the base plus
    the recorded writes in order, and the fsync reached the recording as a flush after
    the last write."""
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    rec = tmp_path / "r.rec"
    expect = bytearray(8 << 20)
    with recording_device(str(image), str(rec), str(tmp_path)) as dev:
        fd = os.open(dev, os.O_RDWR)
        try:
            for k in range(20):
                data = bytes([k + 1]) * (4096 * (1 + k % 4))
                off = (k * 37 % 1800) * 4096
                os.pwrite(fd, data, off)
                expect[off: off + len(data)] = data
            os.fsync(fd)
        finally:
            os.close(fd)
    _no_leftovers(tmp_path)
    assert image.read_bytes() == bytes(expect)
    replay = bytearray(8 << 20)
    with Recording(str(rec)) as r:
        assert r.writes and r.flush_pairs
        for w in r.writes:
            replay[w.offset: w.offset + w.length] = r.data(w)
        last_flush_start = max(start for start, _ in r.flush_pairs)
        assert all(w.event < last_flush_start for w in r.writes)
    assert bytes(replay) == bytes(expect)


@pytest.mark.daemon_log(allow=[r"taking over the owner record of atomicfs pid \d+ on this host \("])
def test_ext4_tears_pages_atomicfs_does_not(mount_env: None, tmp_path: Path) -> None:
    need(shutil.which("mkfs.ext4") and shutil.which("e2fsck"), "e2fsprogs")
    results = compare(150, seed=3, tear=4096, scale=0.5, flush_cuts=20,
                      workdir=str(tmp_path))
    print(table(results))
    ext4, afs = results
    assert (ext4.name, afs.name) == ("ext4", "atomicfs")
    assert ext4.states == afs.states == 150
    assert 0 < ext4.flush_cuts.states <= 20 and 0 < afs.flush_cuts.states <= 20
    assert ext4.torn_pages > 0, "ext4 tore no page: the recording device or tear model broke"
    assert ext4.flush_cuts.torn_pages > 0
    # ext4 keeps what fsync promised: the recording device passes flushes faithfully.
    assert ext4.lost_writes == ext4.flush_cuts.lost_writes == 0, ext4.problems
    assert ext4.failures == ext4.flush_cuts.failures == 0, ext4.problems
    assert not afs.failed, afs.problems + afs.flush_cuts.problems
    _no_leftovers(tmp_path)

    png = write_page_grid(results, str(tmp_path / "grid.png"))
    width, height, pixels = _read_png(png)
    assert width > 2 * len(ext4.pages) * 3 and height > 100
    red = {(k // 3) % width for k in range(0, len(pixels), 3)
           if tuple(pixels[k: k + 3]) == TORN}
    # Torn cells appear in the ext4 panel only.
    assert red and max(red) < width // 2


def _read_png(path: str) -> tuple[int, int, bytes]:
    """A strict reader of the writer's PNGs: signature, CRCs, 8-bit RGB, filter 0 rows."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos: pos + 4])
        kind, body = data[pos + 4: pos + 8], data[pos + 8: pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n: pos + 12 + n])
        assert crc == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + n
    width, height, depth, color, _, _, _ = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, color) == (8, 2) and b"IEND" in chunks
    raw = zlib.decompress(chunks[b"IDAT"])
    stride = 1 + 3 * width
    assert len(raw) == stride * height
    assert all(raw[y * stride] == 0 for y in range(height))
    return width, height, b"".join(raw[y * stride + 1: (y + 1) * stride]
                                   for y in range(height))


def test_page_grid_marks_torn_and_lost_pages(tmp_path: Path) -> None:
    pages = [("a", 0), ("a", 1), ("b", 0)]
    rows = [Verdict(), Verdict(torn_units=1, torn_at=[("a", 1)]),
            Verdict(lost_writes=1, lost_at={("b", 0)})]
    r = FsResult(name="x", states=3, torn_pages=1, torn_states=1, pages=pages, rows=rows)
    width, height, pixels = _read_png(write_page_grid([r], str(tmp_path / "g.png")))
    colours = [tuple(pixels[k: k + 3]) for k in range(0, len(pixels), 3)]
    cell = (CELL_W - 1) * CELL_H  # one page in one state
    assert colours.count(TORN) == cell and colours.count(LOST) == cell


def test_demo_command(mount_env: None, tmp_path: Path) -> None:
    """`python -m atomicfs.demo`, the power cuts alone in a short form: the table, the
    picture's path, exit 0; bad options are one line."""
    need(shutil.which("mkfs.ext4") and shutil.which("e2fsck"), "e2fsprogs")
    png = tmp_path / "pages.png"
    res = subprocess.run([sys.executable, "-m", "atomicfs.demo", "--crash-only", "--states",
                          "20", "--png", str(png)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r"random cuts: crash states +20 +20\n", res.stdout), res.stdout
    assert re.search(r"torn 16 KiB pages +\d+ \(in \d+ states\) +0 \(in 0 states\)",
                     res.stdout)
    assert re.search(r"lost fsynced writes +0 \(in 0 states\) +0 \(in 0 states\)",
                     res.stdout)
    assert re.search(r"cuts just before a flush +\d+ +\d+\n", res.stdout), res.stdout
    assert f"torn ones red): {png}\n" in res.stdout and _read_png(str(png))
    bad = subprocess.run([sys.executable, "-m", "atomicfs.demo", "--tear", "1000"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "multiple of 512" in bad.stderr


def test_failed_counts_every_kind_of_finding() -> None:
    assert not FsResult(name="x", states=5).failed
    assert FsResult(name="x", lost_writes=1).failed
    assert FsResult(name="x", flush_cuts=Tally(torn_pages=1)).failed
    assert FsResult(name="x", flush_cuts=Tally(failures=1)).failed
