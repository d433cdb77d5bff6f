"""The page cache holds its limit and the daemon's memory stays bounded: a small file pins a
folio sized to its data, clean folios are evicted as soon as the cache passes its limit,
writers are throttled while folios that cannot be evicted fill it, and the daemon's RSS
stays within cache_size plus the overhead the README documents."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tests.conftest import Mount, MountFactory, cli, make_image

MiB = 1 << 20
# The README's bound: resident memory at most the size at start-up + cache_size + 1 KiB
# per cached folio + 3 KiB per inode + 32 MiB (log batches, snapshot serialisation,
# allocator arenas).
PER_FOLIO = 1024
PER_INODE = 3072
FIXED = 32 * MiB


def vm_rss(pid: int) -> int:
    """The daemon's resident set in bytes (/proc/PID/status VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def check_bounds(m: Mount, base_rss: int, when: str) -> dict[str, int]:
    st = m.stat()
    cache = st["cache"]
    assert cache["bytes"] + cache["spare_bytes"] <= cache["limit"], (when, cache)
    rss = vm_rss(m.pid)
    bound = base_rss + cache["limit"] + PER_FOLIO * cache["folios"] + \
        PER_INODE * st["space"]["inodes"] + FIXED
    assert rss <= bound, (when, rss, bound, cache)
    return cache


def _data(seed: int, n: int) -> bytes:
    return hashlib.blake2b(str(seed).encode()).digest()[:16] * (n // 16) + b"x" * (n % 16)


def test_small_and_large_files_stay_within_cache_size(tmp_path: Path,
                                                      mounter: MountFactory) -> None:
    img = make_image(tmp_path / "fs.img", "1G")
    m = mounter(img, "cache_size=16M")
    base = vm_rss(m.pid)
    os.mkdir(m / "small")
    os.mkdir(m / "atomic")
    os.setxattr(m / "atomic", "user.atomicfs.atomic_unit", b"16384")
    n_small = 6000
    for i in range(n_small):
        with open(m / f"small/{i}", "wb") as f:
            f.write(_data(i, 100))
    check_bounds(m, base, "after small files")
    # a 100-byte file caches one block, not a whole 64 KiB folio
    assert m.stat(f"small/{n_small - 1}")["folios"]["bytes"] == 4096
    # an atomic unit fixes the folio size: those pin 16 KiB each, and still fit
    for i in range(1500):
        with open(m / f"atomic/{i}", "wb") as f:
            f.write(_data(-i, 100))
    check_bounds(m, base, "after small atomic files")
    for i in range(8):
        with open(m / f"large{i}", "wb") as f:
            for k in range(8):
                f.write(_data(1000 * i + k, MiB))
    check_bounds(m, base, "after large files")
    # a small file's folio grows as the file does (to the next power of two of blocks)
    with open(m / "small/1", "ab") as f:
        f.write(_data(7, 20000))
    assert m.stat("small/1")["folios"]["bytes"] == 32768
    m.control("sync")
    cache = check_bounds(m, base, "after sync")
    assert cache["dirty_bytes"] == 0
    # everything reads back, through the bounded cache
    for i in range(0, n_small, 7):
        with open(m / f"small/{i}", "rb") as f:
            assert f.read() == (_data(i, 100) if i != 1 else _data(1, 100) + _data(7, 20000))
    for i in range(0, 1500, 7):
        with open(m / f"atomic/{i}", "rb") as f:
            assert f.read() == _data(-i, 100)
    with open(m / "large3", "rb") as f:
        assert f.read() == b"".join(_data(3000 + k, MiB) for k in range(8))
    check_bounds(m, base, "after reads")
    m.umount()
    assert cli("fsck", img).returncode == 0


def test_default_cache_many_small_files(tmp_path: Path, mounter: MountFactory) -> None:
    """With the default cache, 20,000 small files took the daemon to 1.25 GiB: each pinned
    a 64 KiB folio. Now they take a block each, and clean ones go when the cache is full."""
    img = make_image(tmp_path / "fs.img", "1G")
    m = mounter(img)
    base = vm_rss(m.pid)
    os.mkdir(m / "d")
    n = 20000
    for i in range(n):
        with open(m / f"d/{i}", "wb") as f:
            f.write(_data(i, 100))
    cache = check_bounds(m, base, "after 20000 small files")
    assert cache["bytes"] <= n * 4096 + 16 * MiB  # about a block per file
    m.control("sync")
    check_bounds(m, base, "after sync")
    m.umount()
