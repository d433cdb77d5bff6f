"""The user.atomicfs.* attributes: per-file settings, statistics, limits and control.

Settings are stored attributes that pass from a directory to what is created in it:
`user.atomicfs.atomic_unit` (a size, stored in bytes), `user.atomicfs.writethrough` (0, 1
durable, 2 the RFC's write-through) and `user.atomicfs.atomic_strict` (0, 1). An invalid
value is EINVAL and changes nothing; a new unit re-shapes the file's cache first.

Virtual attributes serve the command line and the preload library: `user.atomicfs.stat`
(read, any file; JSON; the root's, which names the image and the options, only for root
and the mount's owner), `user.atomicfs.limits` (read, regular files: the statx
atomic-write limits) and `user.atomicfs.control` (write; on the root directory sync,
checkpoint, commit, flush, drop_caches, and the test knobs inject=, delay=, fault=; on a
regular file the write announcements of the preload library, see `Control._announce`).
None is listed.

fs.py keeps the generic xattr rules (namespaces, sizes, storage) and hands these names here.
"""
from __future__ import annotations

import errno
import json
import logging

import pyfuse3

from atomicfs import format as fmt
from atomicfs.device import parse_inject
from atomicfs.handles import Handle, Handles
from atomicfs.metadata import INHERITED_XATTRS, XATTR_ATOMIC_UNIT, XATTR_WRITETHROUGH, Inode
from atomicfs.options import check_atomic_unit, parse_delay
from atomicfs.sizes import parse_size
from atomicfs.volume import Volume

log = logging.getLogger(__name__)

PREFIX = b"user.atomicfs."
XATTR_STAT = b"user.atomicfs.stat"
XATTR_CONTROL = b"user.atomicfs.control"
XATTR_LIMITS = b"user.atomicfs.limits"
SETTINGS = INHERITED_XATTRS
MAX_ANNOUNCED = 1024  # open write announcements per file (one per writing thread, really)
# Test knobs of the control attribute: root only, on mounts started with a test knob or
# `testing` (MountOptions.testing).
KNOB_CONTROLS = ("inject", "delay", "fault")
FAULTS = ("request", "daemon")


class InjectedFault(RuntimeError):
    """Raised on purpose by the `fault=` control, to test how failures are contained."""


class InjectedDaemonFault(InjectedFault):
    """`fault=daemon`: the one exception fs.py lets through to pyfuse3, whose main loop,
    and with it the daemon, ends on it."""


class Announced:
    """A write the preload library announced before issuing it (RWF_ATOMIC,
    RWF_WRITETHROUGH, RWF_DSYNC): the write request at exactly (off, length) of the file
    gets these semantics, whichever thread's it is, until the announcer withdraws it."""

    __slots__ = ("off", "length", "atomic", "writethrough", "durable")

    def __init__(self, off: int, length: int, flags: str) -> None:
        self.off = off
        self.length = length
        self.atomic = "a" in flags
        self.writethrough = "w" in flags
        self.durable = "d" in flags


class Control:
    """The atomicfs attributes of one mount, and the write semantics they give."""

    def __init__(self, vol: Volume, handles: Handles, owner: int) -> None:
        self.vol = vol
        self.handles = handles
        self.owner = owner  # who mounted it
        self.announced: dict[int, dict[str, Announced]] = {}  # ino -> token -> write
        self.fault_next_request = False

    def check_fault(self, request: str) -> None:
        """The `fault=request` knob: the next request fails unexpectedly."""
        if self.fault_next_request:
            self.fault_next_request = False
            raise InjectedFault(f"fault injection in {request}")

    # ------------------------------------------------------------------ attributes

    def getxattr(self, node: Inode, name: bytes, ctx: pyfuse3.RequestContext
                 ) -> bytes | None:
        """A virtual attribute's value; None for a name that is stored as any other."""
        if name == XATTR_STAT:
            if node.ino == fmt.ROOT_INO and ctx.uid not in (0, self.owner):
                raise pyfuse3.FUSEError(errno.EACCES)
            return self._stat_json(node).encode()
        if name == XATTR_LIMITS and node.is_reg:
            return self._limits(node)
        return None

    async def setxattr(self, node: Inode, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> bool:
        """Serve a write of a virtual attribute; False for a name that is stored."""
        if name == XATTR_CONTROL:
            await self._control(node, value, ctx)
            return True
        if name == XATTR_STAT:
            raise pyfuse3.FUSEError(errno.EPERM)
        return False

    def validate_setting(self, node: Inode, name: bytes, value: bytes) -> bytes:
        """A setting's value as stored; EINVAL (nothing changed) for invalid values."""
        text = value.strip(b"\0 \n")
        if name == XATTR_ATOMIC_UNIT:
            try:  # the size grammar of every option (16k, 16K, 16384); stored in bytes
                unit = parse_size(text.decode("ascii"))
                check_atomic_unit(unit, self.vol.bs)
            except ValueError:
                raise pyfuse3.FUSEError(errno.EINVAL) from None
            if unit and self.vol.opts.atomic_path == "hardware" and \
                    not self.vol.hardware_ok(unit):
                raise pyfuse3.FUSEError(errno.EINVAL)
            return str(unit).encode()
        if text not in ((b"0", b"1", b"2") if name == XATTR_WRITETHROUGH else (b"0", b"1")):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return text

    async def apply_setting(self, node: Inode, name: bytes, value: bytes | None) -> None:
        """Before a setting is stored (value None: removed): a regular file with a new
        atomic unit gets folios of the new size."""
        if name == XATTR_ATOMIC_UNIT and node.is_reg:
            unit = int(value) if value is not None else 0
            if self.vol.effective_unit(node) != unit:
                await self.vol.change_folio_size(node)

    def inherit(self, parent: Inode, inode: Inode) -> None:
        """A directory's settings pass to what is created in it; a new file in a directory
        without a unit gets the mount's default unit."""
        if not (inode.is_reg or inode.is_dir):
            return
        md = self.vol.md
        for name in SETTINGS:
            value = parent.xattrs.get(name)
            if value is not None:
                md.set_xattr(inode, name, value)
        if inode.atomic_unit == -1 and self.vol.opts.atomic_unit and inode.is_reg:
            md.set_xattr(inode, XATTR_ATOMIC_UNIT, str(self.vol.opts.atomic_unit).encode())

    def _limits(self, node: Inode) -> bytes:
        """statx atomic-write limits of a file, as the preload library reports them:
        unit_min, unit_max, segments_max, unit_max_opt. Any power of two from the block
        size to 1 MiB at an aligned offset is one write request and one write group (one
        log batch); the file's own unit (or the device's atomic limit) is what is fast."""
        unit = self.vol.effective_unit(node)
        # atomic_strict refuses writes that are not whole units: its minimum is the unit
        low = unit if unit and self.vol.strict_of(node) else self.vol.bs
        return f"{low} {fmt.MAX_ATOMIC_UNIT} 1 {unit}\n".encode()

    def _stat_json(self, node: Inode) -> str:
        if node.ino == fmt.ROOT_INO:
            data = self.vol.mount_stats()
            data["file"] = self.vol.file_stats(node)
        else:
            data = self.vol.file_stats(node, self.handles.writethrough_open(node))
        return json.dumps(data, sort_keys=True)

    # -------------------------------------------------------------------- control

    async def _control(self, node: Inode, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        """Commands of the command line and of tests, on the root directory; the write
        announcements of the preload library on regular files (the kernel has checked
        that the caller may write the file)."""
        cmd, eq, arg = value.decode(errors="replace").strip(" \n\0").partition("=")
        if node.is_reg and cmd in ("write_begin", "write_end"):
            self._announce(node, cmd, arg)
            return
        if node.ino != fmt.ROOT_INO:
            raise pyfuse3.FUSEError(errno.EINVAL)
        if ctx.uid not in (0, self.owner, node.uid):
            raise pyfuse3.FUSEError(errno.EPERM)
        if eq and cmd not in KNOB_CONTROLS:
            raise pyfuse3.FUSEError(errno.EINVAL)  # the other commands take no value
        if cmd in KNOB_CONTROLS:
            if ctx.uid != 0 or not self.vol.opts.testing:
                log.warning("control %s refused: a test knob, for root on mounts started "
                            "with a test knob or `testing`", cmd)
                raise pyfuse3.FUSEError(errno.EPERM)
            try:
                self._knob(cmd, arg)
            except ValueError as exc:
                log.warning("control %s refused: %s", cmd, exc)
                raise pyfuse3.FUSEError(errno.EINVAL) from None
        elif cmd == "sync":
            if not await self.vol.sync():
                raise pyfuse3.FUSEError(errno.EIO)
        elif cmd == "checkpoint":
            await self.vol.checkpoint()
        elif cmd == "commit":  # make everything logged so far durable
            await self.vol.commit()
        elif cmd == "flush":  # background writeback of all dirty data, now
            await self.vol.flush()
        elif cmd == "drop_caches":
            self.vol.drop_caches()
        else:
            raise pyfuse3.FUSEError(errno.EINVAL)

    def _knob(self, cmd: str, arg: str) -> None:
        """A test knob, validated as the mount option of its name (ValueError)."""
        if cmd == "inject":
            self.vol.dev.set_inject(parse_inject(arg))
        elif cmd == "delay":
            self.vol.dev.set_delay(parse_delay(arg) / 1000.0)
        elif arg == "request":  # the next request fails unexpectedly
            self.fault_next_request = True
        elif arg == "daemon":  # the serving task dies
            raise InjectedDaemonFault("fault injection: the daemon's serving task is killed")
        else:
            raise ValueError(f"fault must be one of {', '.join(FAULTS)}, not {arg!r}")

    # ----------------------------------------------------- the preload library's writes

    def _announce(self, node: Inode, cmd: str, arg: str) -> None:
        """The preload library's side channel, on a regular file (setxattr of
        user.atomicfs.control; FUSE's setxattr carries no file handle, so it is per file):

            write_begin=TOKEN:OFF:LEN:FLAGS   the write request at exactly (OFF, LEN)
                                              is atomic (a) and durable (d); requests
                                              within it are written through as the RFC
                                              defines it (w). OFF * (O_APPEND): any
                                              request of LEN bytes.
            write_end=TOKEN                   withdraw it (after the write returned)

        Race argument: an announcement is not consumed by the first matching request but
        stays until its announcer withdraws it, so another thread's write of the same range
        in between only gets the stronger semantics too (harmless), and the announcer's own
        write can never lose them. The kernel sends a page-cache write of whole pages up to
        max_write (1 MiB) as one request, so the announced write arrives whole; an atomic
        announcement the daemon cannot honour (not a power of two from the block size to
        1 MiB, offset not aligned to its length) is refused with EINVAL before the write."""
        per_file = self.announced.setdefault(node.ino, {})
        if cmd == "write_end":
            if per_file.pop(arg, None) is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            if not per_file:
                del self.announced[node.ino]
            return
        token, off_s, len_s, flags = (arg.split(":") + ["", "", "", ""])[:4]
        if not (token and (off_s.isdigit() or off_s == "*") and len_s.isdigit()) or \
                set(flags) - set("awd"):
            raise pyfuse3.FUSEError(errno.EINVAL)
        off, length = int(off_s) if off_s != "*" else -1, int(len_s)
        if "a" in flags and (length & (length - 1) or not self.vol.bs <= length
                             <= fmt.MAX_ATOMIC_UNIT or off > 0 and off % length):
            raise pyfuse3.FUSEError(errno.EINVAL)
        if len(per_file) >= MAX_ANNOUNCED and token not in per_file:
            raise pyfuse3.FUSEError(errno.EAGAIN)
        per_file[token] = Announced(off, length, flags)

    def closed(self, inode: Inode) -> None:
        """The file's last handle closed: drop announcements of a writer that died before
        withdrawing them."""
        if inode.opens <= 0:
            self.announced.pop(inode.ino, None)

    def write_semantics(self, h: Handle, off: int, length: int) -> tuple[bool, str | None]:
        """Whether this write request is one atomic write, and its write-through mode
        ("durable", "rfc" or None), from the handle, the file and the announcements."""
        atomic = writethrough = durable = False
        for ann in self.announced.get(h.inode.ino, {}).values():
            if ann.off in (off, -1) and ann.length == length:
                atomic |= ann.atomic
                durable |= ann.durable
            if ann.off <= off and off + length <= ann.off + ann.length or \
                    ann.off == -1 and ann.length == length:  # a piece of a large write
                writethrough |= ann.writethrough
        if atomic:
            self.vol.counters.atomic_writes_announced += 1
        mode = self.vol.writethrough_mode(h.inode)
        if h.writethrough or durable:
            mode = "durable"
        elif mode is None and (h.direct or writethrough):
            mode = "rfc"
        return atomic, mode
