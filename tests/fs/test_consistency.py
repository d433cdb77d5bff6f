"""Metadata that passes its checksums but contradicts itself: fsck names it as damage and
the open (what a mount does) refuses it with one line; fsck --repair fixes it, after which
both agree it is clean. Each case is one of the issue's list."""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Callable

import pytest
import trio

from atomicfs import format as fmt
from atomicfs.errors import UserError
from atomicfs.fsck import fsck
from atomicfs.metadata import XATTR_ATOMIC_UNIT
from atomicfs.mkfs import mkfs
from atomicfs.options import MountOptions
from atomicfs.volume import Volume
from tests.fs.helpers import open_fs
from tests.mount.test_badinput import records, rewrite_snapshot



def _edit(rtype: int, ino: int, edit: Callable[[tuple], tuple]) -> Callable[[bytes], bytes]:
    """Rewrite the records of type rtype whose first field is ino."""
    def mutate(stream: bytes) -> bytes:
        out = []
        for t, raw in records(stream):
            if t == rtype and struct.unpack_from("<Q", raw, 5)[0] == ino:
                rec = fmt.decode_records(raw).__next__()
                args = edit(rec.args)
                raw = {fmt.REC_INODE: lambda a: fmt.rec_inode(a),
                       fmt.REC_EXTENT_SET: lambda a: fmt.rec_extent_set(*a),
                       fmt.REC_XATTR_SET: lambda a: fmt.rec_xattr_set(*a)}[t](args)
            out.append(raw)
        return b"".join(out)
    return mutate


def _size(n: int) -> Callable[[tuple], tuple]:
    return lambda a: a[:5] + (n,) + a[6:]


CASES: dict[str, tuple[Callable[[dict[str, int]], Callable[[bytes], bytes]], str]] = {
    "unit not a power of two": (
        lambda i: _edit(fmt.REC_XATTR_SET, i["file"], lambda a: (a[0], a[1], b"12288")),
        "invalid atomic unit"),
    "block mapped past EOF": (
        lambda i: _edit(fmt.REC_INODE, i["file"], _size(100)), "beyond its size"),
    "block outside the data area": (
        lambda i: _edit(fmt.REC_EXTENT_SET, i["file"], lambda a: (a[0], a[1], 5, a[3])),
        "outside the data area"),
    "size past the maximum": (
        lambda i: _edit(fmt.REC_INODE, i["file"], _size(1 << 60)), "past the maximum"),
    "overlapping extents": (
        lambda i: lambda s: s + fmt.rec_extent_set(i["other"], 100, i["file_block"], 1),
        "also used by"),
    "link count": (
        lambda i: _edit(fmt.REC_INODE, i["other"], lambda a: a[:4] + (7,) + a[5:]),
        "link count 7"),
    "dangling directory entry": (
        lambda i: lambda s: b"".join(raw for t, raw in records(s)
                                     if not (t == fmt.REC_INODE and struct.unpack_from(
                                         "<Q", raw, 5)[0] == i["other"])),
        "names missing inode"),
}


@pytest.fixture
def used(tmp_path: Path) -> tuple[str, dict[str, int]]:
    img = str(tmp_path / "fs.img")
    mkfs(img, size=64 << 20)
    info: dict[str, int] = {}

    async def build() -> None:
        async with open_fs(img) as d:
            info["file"] = await d.create("f", os.urandom(3 * 4096))
            await d.setxattr("f", XATTR_ATOMIC_UNIT.decode(), b"16384")
            info["other"] = await d.create("g", os.urandom(200 * 4096))
            inode = d.fs.md.inodes[info["file"]]
            assert inode.extents is not None
            info["file_block"] = next(iter(inode.extents))[1]
    trio.run(build)
    return img, info


@pytest.mark.parametrize("case", sorted(CASES))
def test_inconsistent_metadata_is_damage_refused_and_repaired(
        used: tuple[str, dict[str, int]], case: str) -> None:
    img, info = used
    make, words = CASES[case]
    rewrite_snapshot(img, make(info))
    rep = fsck(img)
    assert not rep.clean and any(words in p for p in rep.problems), rep.problems
    with pytest.raises(UserError) as exc:
        Volume.open(img, MountOptions())
    assert "damaged" in str(exc.value) and "\n" not in str(exc.value)
    rep = fsck(img, repair=True)
    assert rep.clean and rep.fixes, (rep.problems, rep.fixes)
    Volume.open(img, MountOptions(ro=True)).close()
