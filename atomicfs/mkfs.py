"""`atomicfs mkfs`: write an empty filesystem onto a block device or image file."""
from __future__ import annotations

import logging
import os
import stat
import time

from atomicfs import format as fmt
from atomicfs import owner
from atomicfs.device import Device
from atomicfs.errors import CorruptFilesystem, DeviceError, UserError
from atomicfs.metadata import XATTR_ATOMIC_UNIT, Metadata
from atomicfs.native import Buffer
from atomicfs.options import check_atomic_unit
from atomicfs.probe import foreign_signature, wipe_signatures
from atomicfs.sizes import format_size, is_power_of_two
from atomicfs.superblock import read_superblock, write_superblock_sync

log = logging.getLogger(__name__)


def mkfs(target: str, size: int | None = None, atomic_unit: int = 0,
         block_size: int = 4096, force: bool = False) -> fmt.Superblock:
    """Format target; UserError (nothing written) on any problem with the request."""
    if not is_power_of_two(block_size) or not \
            fmt.MIN_BLOCK_SIZE <= block_size <= fmt.MAX_BLOCK_SIZE:
        raise UserError(f"block size {block_size} must be a power of two from "
                        f"{fmt.MIN_BLOCK_SIZE} to {fmt.MAX_BLOCK_SIZE}")
    try:
        check_atomic_unit(atomic_unit, block_size)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if size is not None and size < fmt.MIN_SIZE:
        raise UserError(f"size {format_size(size)} is below the minimum of "
                        f"{format_size(fmt.MIN_SIZE)}")
    created = False
    if not os.path.exists(target):
        if size is None:
            raise UserError(f"{target} does not exist; give --size to create an image file")
        _create_image(target, size)
        created = True
    try:
        return _format(target, size, atomic_unit, block_size, force, created)
    except BaseException:
        if created:
            os.unlink(target)
        raise


def _create_image(target: str, size: int) -> None:
    """A sparse image file of size bytes; nothing is left behind when that fails."""
    try:
        f = open(target, "xb")
    except OSError as exc:
        raise UserError(f"cannot create {target}: {exc.strerror}") from None
    try:
        with f:
            f.truncate(size)
    except OSError as exc:
        os.unlink(target)
        raise UserError(f"cannot create {target} of {format_size(size)}: "
                        f"{exc.strerror}") from None


def too_small(target: str) -> str | None:
    """Why a regular file cannot hold an atomicfs (None if its size is no reason)."""
    try:
        st = os.stat(target)
    except OSError:
        return None
    if stat.S_ISREG(st.st_mode) and st.st_size < fmt.MIN_SIZE:
        what = "empty" if st.st_size == 0 else f"only {format_size(st.st_size)}"
        return (f"{target} is {what}, too small to hold an atomicfs "
                f"(at least {format_size(fmt.MIN_SIZE)})")
    return None


def _open_unowned(target: str, created: bool) -> Device:
    """Open target exclusively on this host, and refuse an atomicfs on it whose owner
    record names a live owner (another host, which no lock here shows)."""
    dev = owner.open_device(target)
    try:
        if not created:
            try:
                sb = read_superblock(dev)
            except (UserError, DeviceError):
                return dev  # no atomicfs here, or none that could be mounted
            owner.check(dev, sb, "mkfs")
    except BaseException:
        dev.close()
        raise
    return dev


def _format(target: str, size: int | None, atomic_unit: int, block_size: int, force: bool,
            created: bool) -> fmt.Superblock:
    st = os.stat(target)
    resize = size is not None and stat.S_ISREG(st.st_mode) and st.st_size != size \
        and not created
    if resize and size is not None and st.st_size > size and not force:
        raise UserError(f"{target} is larger than --size; use --force to shrink it")
    # The first open is exclusive (it refuses a mounted target) and decides whether the
    # target may be touched at all, before a resize changes anything.
    dev = _open_unowned(target, created)
    try:
        foreign = None if created else _existing(dev)
        if foreign and not force:
            raise UserError(f"{target} holds {foreign}; use --force to overwrite it")
        if resize and size is not None:
            _resize(target, size)
    finally:
        dev.close()
    if foreign and foreign != OURS:
        wipe_signatures(target)
    dev = owner.open_device(target)
    try:
        dev_size = dev.caps.size
        if size is not None and size > dev_size:
            raise UserError(f"--size {format_size(size)} exceeds {target} "
                            f"({format_size(dev_size)})")
        fs_size = size if size is not None else dev_size
        if fs_size < fmt.MIN_SIZE:
            raise UserError(f"{target} is {format_size(fs_size)}, below the minimum of "
                            f"{format_size(fmt.MIN_SIZE)}")
        if dev.caps.logical_block_size > block_size:
            raise UserError(f"block size {block_size} is below the device sector size "
                            f"{dev.caps.logical_block_size}")
        return _write_empty_fs(dev, fs_size, atomic_unit, block_size)
    finally:
        dev.close()


def _resize(target: str, size: int) -> None:
    try:
        os.truncate(target, size)
    except OSError as exc:
        raise UserError(f"cannot resize {target} to {format_size(size)}: "
                        f"{exc.strerror}") from None


OURS = "an atomicfs filesystem"


def _existing(dev: Device) -> str | None:
    """What the target holds already: our own superblock, or what libblkid finds."""
    if dev.read_sync(0, 4096).bytes()[:8] == fmt.MAGIC:
        return OURS
    return foreign_signature(dev.path)


def _write_empty_fs(dev: Device, fs_size: int, atomic_unit: int,
                    block_size: int) -> fmt.Superblock:
    bs = block_size
    total = fs_size // bs
    log_blocks = fmt.default_log_blocks(total, bs)
    log_start = fmt.OWNER_BLOCK + 1
    data_start = log_start + log_blocks
    if data_start + 1024 > total:
        raise UserError("target too small for the log and data areas")
    now = time.time_ns()
    sb = fmt.Superblock(uuid=fmt.new_uuid(), block_size=bs, total_blocks=total,
                        log_start=log_start, log_blocks=log_blocks, data_start=data_start,
                        atomic_unit=atomic_unit, mkfs_time_ns=now, ckpt_time_ns=now,
                        flags=fmt.FLAG_OWNER_RECORD)
    md = Metadata(bs)
    root = md.make_root(os.getuid(), os.getgid(), 0o755, now)
    if atomic_unit:
        md.set_xattr(root, XATTR_ATOMIC_UNIT, str(atomic_unit).encode())
    snapshot = md.serialize()
    nblocks = 1 + (len(snapshot) + bs - 1) // bs
    buf = Buffer(nblocks * bs)
    buf.write(bs, snapshot)
    header = fmt.SnapshotHeader(sb.uuid, 1, len(snapshot), md.next_ino,
                                buf.crc32c(bs, len(snapshot)), [(data_start, nblocks)])
    buf.write(0, header.pack(bs))
    # An old log (of any filesystem) must not look like ours: clear its first blocks.
    zeros = Buffer(min(log_blocks, 16) * bs)
    dev.writev_sync(log_start * bs, [(zeros, 0, zeros.size)], "log")
    dev.writev_sync(data_start * bs, [(buf, 0, buf.size)], "snapshot")
    owner.write_record(dev, sb, owner.clean_record(sb), sync=False)
    dev.flush_sync()
    sb.snap_block = data_start
    sb.snap_seq = 1
    sb.next_ino = md.next_ino
    for seq in (0, 1):  # both slots valid; the next checkpoint overwrites slot 0
        sb.seq = seq
        write_superblock_sync(dev, sb)
    try:
        sb.validate()
    except CorruptFilesystem as exc:  # pragma: no cover - geometry bug
        raise UserError(f"internal error: {exc}") from exc
    log.info("formatted %s: %d blocks of %d, log %d blocks", dev.path, total, bs, log_blocks)
    return sb
