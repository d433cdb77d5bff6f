"""Metadata.snapshot_bytes is the size the next snapshot will have: space for it is what
keeps a full filesystem able to checkpoint, so it must be exact after any change."""
from __future__ import annotations

import os
import random
import stat

from atomicfs.metadata import Metadata
from tests.fs.helpers import Driver


def _exact(md: Metadata) -> None:
    assert md.snapshot_bytes == len(md.serialize())


def test_snapshot_size_tracks_every_kind_of_change() -> None:
    md = Metadata(4096)
    root = md.make_root(0, 0, 0o755, 1)
    _exact(md)
    rng = random.Random(5)
    files = []
    for i in range(200):
        f = md.new_inode(stat.S_IFREG | 0o644, 0, 0, 2)
        md.add_entry(root, b"f%d" % i + b"x" * rng.randrange(200), f, 3)
        files.append(f)
        for _ in range(rng.randrange(4)):
            md.map_extent(f, rng.randrange(64), 1000 + rng.randrange(5000), rng.randrange(1, 9))
        md.set_xattr(f, b"user.a", os.urandom(rng.randrange(100)))
    _exact(md)
    for f in files[::3]:
        md.set_xattr(f, b"user.a", b"shorter")
        md.set_xattr(f, b"user.b", b"new")
        md.truncate_extents(f, rng.randrange(32))
    _exact(md)
    link = md.new_inode(stat.S_IFLNK | 0o777, 0, 0, 4)
    md.set_symlink(link, b"some/target")
    md.add_entry(root, b"link", link, 4)
    d = md.new_inode(stat.S_IFDIR | 0o755, 0, 0, 4)
    md.add_entry(root, b"dir", d, 4)
    _exact(md)
    for name in [n for n in list(root.entries or {}) if n.startswith(b"f1")]:
        child = md.remove_entry(root, name, 6)
        if child.xattrs:
            md.del_xattr(child, next(iter(child.xattrs)))
        md.delete_inode(child)
    md.remove_entry(root, b"link", 6)
    md.delete_inode(link)
    _exact(md)
    # what a snapshot loads is counted the same way
    copy = Metadata(4096)
    copy.load(md.serialize())
    assert copy.snapshot_bytes == md.snapshot_bytes


async def test_snapshot_size_after_namespace_operations(drv: Driver) -> None:
    md = drv.fs.md
    await drv.mkdir("d")
    await drv.create("d/f", os.urandom(300_000))
    await drv.symlink("target", "d/s")
    await drv.link("d/f", "hl")
    await drv.setxattr("d/f", "user.k", b"v" * 500)
    await drv.rename("d/f", "moved-with-a-longer-name")
    await drv.fs.vol.wb.sync_all()  # data written: extents mapped
    await drv.setattr("hl", st_size=70_000)
    await drv.unlink("d/s")
    _exact(md)
