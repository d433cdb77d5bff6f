"""Drive atomicfs.fs.AtomicFS without a mount: a Volume on a real image file, FUSE requests
made as plain calls. pyfuse3.RequestContext and SetattrFields cannot be built from Python,
so small stand-ins carry the attributes the Operations read."""
from __future__ import annotations

import errno
import os
import stat
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

import pyfuse3
import pytest
import trio

from atomicfs.fs import AtomicFS
from atomicfs.mkfs import mkfs
from atomicfs.options import MountOptions
from atomicfs.volume import Volume

ROOT = pyfuse3.ROOT_INODE


@dataclass
class Ctx:
    """Stand-in for pyfuse3.RequestContext."""
    uid: int = 0
    gid: int = 0
    pid: int = 1
    umask: int = 0o022


@dataclass
class Fields:
    """Stand-in for pyfuse3.SetattrFields."""
    update_atime: bool = False
    update_mtime: bool = False
    update_ctime: bool = False
    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_size: bool = False


def make_image(path: str, size: int = 64 << 20) -> str:
    mkfs(path, size=size)
    return path


@asynccontextmanager
async def open_fs(image: str, opts: MountOptions | None = None) -> AsyncIterator["Driver"]:
    """A started Volume with its Operations; shut down cleanly (like umount) on exit."""
    vol = Volume.open(image, opts or MountOptions())
    try:
        async with trio.open_nursery() as nursery:
            await vol.start(nursery)
            fs = AtomicFS(vol)
            yield Driver(fs)
            vol.delalloc.check()  # no reservation leaked by what the test did
            assert await vol.shutdown()
            nursery.cancel_scope.cancel()
    finally:
        vol.close()


async def expect_errno(code: int, aw: Awaitable[Any]) -> None:
    """aw must fail with FUSEError(code)."""
    with pytest.raises(pyfuse3.FUSEError) as info:
        await aw
    assert info.value.errno == code, \
        f"expected {errno.errorcode[code]}, got {errno.errorcode.get(info.value.errno)}"


class Driver:
    """Path-level helpers over the Operations object (paths relative to the root)."""

    def __init__(self, fs: AtomicFS, ctx: Ctx | None = None) -> None:
        self.fs = fs
        self.ctx = ctx or Ctx()

    async def ino(self, path: str) -> int:
        ino = ROOT
        for part in path.strip("/").split("/"):
            if part:
                ino = (await self.fs.lookup(ino, part.encode(), self.ctx)).st_ino
        return ino

    async def split(self, path: str) -> tuple[int, bytes]:
        head, _, tail = path.strip("/").rpartition("/")
        return await self.ino(head), tail.encode()

    async def attr(self, path: str) -> pyfuse3.EntryAttributes:
        return await self.fs.getattr(await self.ino(path), self.ctx)

    async def mkdir(self, path: str, mode: int = 0o755) -> pyfuse3.EntryAttributes:
        parent, name = await self.split(path)
        return await self.fs.mkdir(parent, name, mode, self.ctx)

    async def rmdir(self, path: str) -> None:
        parent, name = await self.split(path)
        await self.fs.rmdir(parent, name, self.ctx)

    async def create(self, path: str, data: bytes = b"", mode: int = 0o644) -> int:
        parent, name = await self.split(path)
        fi, attr = await self.fs.create(parent, name, mode, os.O_RDWR, self.ctx)
        if data:
            assert await self.fs.write(fi.fh, 0, data) == len(data)
        await self.fs.release(fi.fh)
        return attr.st_ino

    async def open(self, path: str, flags: int = os.O_RDWR) -> int:
        return (await self.fs.open(await self.ino(path), flags, self.ctx)).fh

    async def read(self, path: str, off: int = 0, size: int = 1 << 30) -> bytes:
        fh = await self.open(path, os.O_RDONLY)
        try:
            return bytes(await self.fs.read(fh, off, size))
        finally:
            await self.fs.release(fh)

    async def write(self, path: str, off: int, data: bytes) -> None:
        fh = await self.open(path)
        try:
            assert await self.fs.write(fh, off, data) == len(data)
        finally:
            await self.fs.release(fh)

    async def unlink(self, path: str) -> None:
        parent, name = await self.split(path)
        await self.fs.unlink(parent, name, self.ctx)

    async def rename(self, old: str, new: str, flags: int = 0) -> None:
        p1, n1 = await self.split(old)
        p2, n2 = await self.split(new)
        await self.fs.rename(p1, n1, p2, n2, flags, self.ctx)

    async def link(self, old: str, new: str) -> pyfuse3.EntryAttributes:
        parent, name = await self.split(new)
        return await self.fs.link(await self.ino(old), parent, name, self.ctx)

    async def symlink(self, target: str, path: str) -> pyfuse3.EntryAttributes:
        parent, name = await self.split(path)
        return await self.fs.symlink(parent, name, target.encode(), self.ctx)

    async def mknod(self, path: str, mode: int, rdev: int = 0) -> pyfuse3.EntryAttributes:
        parent, name = await self.split(path)
        return await self.fs.mknod(parent, name, mode, rdev, self.ctx)

    async def setattr(self, path: str, **changes: int) -> pyfuse3.EntryAttributes:
        """setattr with fields named like EntryAttributes (st_size=..., st_mode=...)."""
        attr = pyfuse3.EntryAttributes()
        fields = Fields()
        names = {"st_size": "size", "st_mode": "mode", "st_uid": "uid", "st_gid": "gid",
                 "st_atime_ns": "atime", "st_mtime_ns": "mtime"}
        for key, value in changes.items():
            setattr(attr, key, value)
            setattr(fields, f"update_{names[key]}", True)
        return await self.fs.setattr(await self.ino(path), attr, fields, None, self.ctx)

    async def listdir(self, path: str, batch: int = 100,
                      between: Callable[[], Awaitable[None]] | None = None) -> list[bytes]:
        """All names readdir returns, fetched `batch` at a time as the kernel does when
        its buffer fills; `between` runs after each batch (to change the directory)."""
        fh = await self.fs.opendir(await self.ino(path), self.ctx)
        names: list[bytes] = []
        try:
            start = 0
            while True:
                token = ReaddirToken(batch)
                await self.fs.readdir(fh, start, token)  # type: ignore[arg-type]
                names += [n for n, _ in token.entries]
                if not token.entries:
                    return names
                start = token.entries[-1][1]
                if between is not None:
                    await between()
        finally:
            await self.fs.releasedir(fh)

    async def setxattr(self, path: str, name: str, value: bytes) -> None:
        await self.fs.setxattr(await self.ino(path), name.encode(), value, self.ctx)

    async def getxattr(self, path: str, name: str) -> bytes:
        return await self.fs.getxattr(await self.ino(path), name.encode(), self.ctx)

    async def listxattr(self, path: str) -> list[bytes]:
        return list(await self.fs.listxattr(await self.ino(path), self.ctx))

    async def removexattr(self, path: str, name: str) -> None:
        await self.fs.removexattr(await self.ino(path), name.encode(), self.ctx)


class ReaddirToken:
    """Stand-in for the kernel's readdir buffer: room for `room` entries."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.entries: list[tuple[bytes, int]] = []


def fake_readdir_reply(token: ReaddirToken, name: bytes, attr: pyfuse3.EntryAttributes,
                       next_id: int) -> bool:
    if len(token.entries) >= token.room:
        return False
    token.entries.append((name, next_id))
    return True


def is_dir(attr: pyfuse3.EntryAttributes) -> bool:
    return stat.S_ISDIR(attr.st_mode)
