"""The on-disk owner record: who serves a filesystem, kept alive by a heartbeat.

In the spirit of ext4's multiple mount protection (MMP). Host locks (atomicfs.locks) keep
a second opener on this host out; the record also catches what they cannot see: a second
host on shared storage, a path whose lock could not be taken, a copy of a live image. It
lives in its own block (format.OWNER_BLOCK, present when the superblock has
FLAG_OWNER_RECORD), never in the superblock slots, so heartbeats never race a checkpoint's
superblock write.

A mount *claims* the record: it writes its boot id, pid (and the pid's start time, so a
reused pid is not taken for the owner), host name, mountpoint, mount time, a random
sequence number and the heartbeat interval; then every interval it checks that the record
still holds its sequence and writes the next one with the time. A clean umount writes the
record back to the clean state. A mount that finds the record in use:

* from this boot, by a process that is gone (SIGKILL, a crash of the daemon): takes over;
* otherwise (another host, or a live process here that no lock showed us): waits for the
  holder's heartbeat, at least one of its intervals, as MMP does. A sequence that moves is
  a live owner: the mount is refused, naming it. One that stays still while the heartbeat
  is more than STALE_BEATS intervals old (or for that long, whatever the clocks say) is a
  dead owner and is taken over.

The record's I/O bypasses the device's request queue: it is not filesystem state, so the
test layers (fault injection, delay, recording for the crash explorer) leave it alone.
"""
from __future__ import annotations

import errno
import logging
import os
import secrets
import socket
import struct
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import trio

from atomicfs import format as fmt
from atomicfs.device import Device
from atomicfs.errors import CorruptFilesystem, DeviceError, InUse, NotAtomicfs, UserError
from atomicfs.native import Buffer, crc32c
from atomicfs.superblock import read_superblock


log = logging.getLogger(__name__)

MAGIC = b"AFSOWNR1"
VERSION = 1
STATE_CLEAN = 0
STATE_ACTIVE = 1
HEARTBEAT_S = 5  # ext4's default MMP interval
STALE_BEATS = 4  # heartbeats a live owner may miss before its record counts as stale
MAX_INTERVAL_S = 60
# magic, version, state, fs uuid, sequence, boot id, pid, interval (s), pid start time
# (clock ticks after boot), mount time ns, heartbeat time ns, host name, mountpoint
_REC = struct.Struct("<8sHH16sQ16sIIQQQ64s256s")


class OwnerLost(Exception):
    """The record no longer holds our claim: another host or program wrote it."""


@dataclass(frozen=True)
class OwnerRecord:
    uuid: bytes
    state: int = STATE_CLEAN
    seq: int = 0
    boot_id: bytes = bytes(16)
    pid: int = 0
    interval_s: int = 0
    pid_start: int = 0
    mount_time_ns: int = 0
    heartbeat_ns: int = 0
    hostname: str = ""
    where: str = ""

    def pack(self, size: int) -> bytes:
        body = _REC.pack(MAGIC, VERSION, self.state, self.uuid, self.seq, self.boot_id,
                         self.pid, self.interval_s, self.pid_start, self.mount_time_ns,
                         self.heartbeat_ns, _fit(self.hostname, 64), _fit(self.where, 256))
        return body + struct.pack("<I", crc32c(body)) + bytes(size - _REC.size - 4)

    @classmethod
    def unpack(cls, raw: bytes) -> "OwnerRecord":
        if raw[:8] != MAGIC:
            raise CorruptFilesystem("owner record magic missing")
        (_, version, state, uid, seq, boot, pid, interval, pid_start, mount_ns, beat_ns,
         host, where) = _REC.unpack_from(raw)
        (crc,) = struct.unpack_from("<I", raw, _REC.size)
        if crc != crc32c(raw[: _REC.size]):
            raise CorruptFilesystem("owner record checksum mismatch")
        if version != VERSION or state not in (STATE_CLEAN, STATE_ACTIVE):
            raise CorruptFilesystem(f"owner record of unknown version {version}/state {state}")
        return cls(uid, state, seq, boot, pid, interval, pid_start, mount_ns, beat_ns,
                   _text(host), _text(where))

    @property
    def local(self) -> bool:
        return self.boot_id == boot_id()

    def owner_alive(self) -> bool:
        """For a record of this boot: is its process still the one that wrote it?"""
        return self.local and process_start(self.pid) == self.pid_start

    def describe(self) -> str:
        """Who holds it, for a one-line message."""
        host = "this host" if self.local else f"host {self.hostname or '?'}"
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC",
                              time.gmtime(self.mount_time_ns / 1e9))
        age = max(0.0, (time.time_ns() - self.heartbeat_ns) / 1e9)
        where = f"mounted on {self.where} " if self.where else ""
        return (f"atomicfs pid {self.pid} on {host} ({where}since {since}, last heartbeat "
                f"{age:.0f}s ago)")


def _fit(text: str, size: int) -> bytes:
    raw = text.encode(errors="replace")[:size]
    return raw + bytes(size - len(raw))


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode(errors="replace")


def boot_id() -> bytes:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return bytes.fromhex(f.read().strip().replace("-", ""))
    except (OSError, ValueError):
        return bytes(16)


def process_start(pid: int) -> int | None:
    """The start time of a live process (clock ticks after boot); None if there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] == "Z":
        return None
    return int(fields[19])


# ----------------------------------------------------------------------------------- I/O

def has_record(sb: fmt.Superblock) -> bool:
    return bool(sb.flags & fmt.FLAG_OWNER_RECORD)


def _where(dev: "Device", sb: fmt.Superblock) -> tuple[int, int]:
    """Offset and I/O size of the record block (aligned for O_DIRECT)."""
    if sb.log_start <= fmt.OWNER_BLOCK:
        raise CorruptFilesystem("the superblock names an owner record inside the log")
    return fmt.OWNER_BLOCK * sb.block_size, min(sb.block_size,
                                                max(fmt.MIN_BLOCK_SIZE, dev.caps.dio_align))


def read_record(dev: "Device", sb: fmt.Superblock) -> OwnerRecord:
    """The record on disk; CorruptFilesystem if it is unreadable as one."""
    off, size = _where(dev, sb)
    buf = Buffer(size)
    try:
        n = os.preadv(dev.fd, [buf.view()], off)
    except OSError as exc:
        raise DeviceError(exc.errno, f"owner record read failed: {exc.strerror}") from None
    if n != size:
        raise DeviceError(errno.EIO, "owner record read came short")
    return OwnerRecord.unpack(buf.bytes())


def write_record(dev: "Device", sb: fmt.Superblock, rec: OwnerRecord, sync: bool) -> None:
    off, size = _where(dev, sb)
    buf = Buffer(size)
    buf.write(0, rec.pack(size))
    try:
        n = os.pwritev(dev.fd, [buf.view()], off, os.RWF_DSYNC if sync else 0)
    except OSError as exc:
        raise DeviceError(exc.errno, f"owner record write failed: {exc.strerror}") from None
    if n != size:
        raise DeviceError(errno.EIO, "owner record write came short")


def clean_record(sb: fmt.Superblock) -> OwnerRecord:
    """What mkfs and a clean umount leave: no owner, nothing that changes between mounts
    (a refused mount that claimed and released leaves the image as it found it)."""
    return OwnerRecord(sb.uuid)


# ------------------------------------------------------------------------- the protocol

def check(dev: "Device", sb: fmt.Superblock, what: str) -> OwnerRecord | None:
    """Refuse (InUse) if a live owner holds the filesystem, waiting for its heartbeat if
    needed; otherwise the stale record found (None if clean). Writes nothing."""
    if not has_record(sb):
        return None
    try:
        _where(dev, sb)
    except CorruptFilesystem as exc:
        raise UserError(f"{dev.path}: filesystem damaged: {exc}; run `atomicfs fsck` for "
                        "details") from None
    try:
        rec = read_record(dev, sb)
    except DeviceError as exc:
        raise UserError(f"{dev.path}: {exc}") from None
    except CorruptFilesystem as exc:
        # A torn heartbeat write of a dead owner, or a live owner's block we cannot read:
        # watch it for one default interval.
        log.info("%s: %s; watching it for %ds", dev.path, exc, HEARTBEAT_S + 1)
        return _wait_for_owner(dev, sb, OwnerRecord(sb.uuid, STATE_ACTIVE,
                                                    interval_s=HEARTBEAT_S), what)
    if rec.state == STATE_CLEAN or rec.uuid != sb.uuid:
        return None
    if rec.local and not rec.owner_alive():
        log.info("%s: the owner record names %s, which is gone", dev.path, rec.describe())
        return rec
    if rec.local and rec.pid == os.getpid():
        # This very process, which holds the host lock on the object now: so no other
        # open of it here serves it (a copy of an image taken while it was open, or a
        # volume closed without releasing the record). Stale, as if its owner were gone.
        log.info("%s: the owner record names this process; taking it over", dev.path)
        return rec
    return _wait_for_owner(dev, sb, rec, what)


def fsck_notes(dev: "Device", sb: fmt.Superblock) -> list[str]:
    """For fsck: NotAtomicfs (it cannot be checked) if a live owner serves the filesystem
    (another host: the host locks did not see it); else notes on a stale owner record or
    on the lack of one."""
    try:
        stale = check(dev, sb, "fsck")
    except UserError as exc:
        raise NotAtomicfs(str(exc)) from None
    if stale is not None and stale.state == STATE_ACTIVE:
        return [f"the owner record names {stale.describe()}, which is gone; the next mount "
                "takes it over"]
    if not has_record(sb):
        return ["no owner record (made before they existed): only this host's locks keep a "
                "second mount out; `atomicfs mkfs` a new one to get it"]
    return []


def _wait_for_owner(dev: "Device", sb: fmt.Superblock, rec: OwnerRecord,
                    what: str) -> OwnerRecord:
    interval = min(max(rec.interval_s, 1), MAX_INTERVAL_S)
    limit = STALE_BEATS * interval + 1
    log.info("%s: in use by %s; waiting up to %ds for its heartbeat", dev.path,
                rec.describe(), limit)
    started = time.monotonic()
    while True:
        time.sleep(min(interval + 1, limit))
        try:
            now = read_record(dev, sb)
        except CorruptFilesystem:
            now = rec
        except DeviceError as exc:
            raise UserError(f"{dev.path}: {exc}") from None
        if now != rec:
            if now.state == STATE_CLEAN:
                return now
            raise InUse(f"{dev.path}: in use by {now.describe()}; {what} refused")
        waited = time.monotonic() - started
        age = (time.time_ns() - rec.heartbeat_ns) / 1e9
        if age > STALE_BEATS * interval or waited >= limit:
            log.info("%s: no heartbeat from %s for %.0fs: taking it as gone", dev.path,
                        rec.describe(), waited)
            return rec


class Owner:
    """This process's claim on a filesystem's owner record."""

    def __init__(self, dev: "Device", sb: fmt.Superblock, rec: OwnerRecord) -> None:
        self.dev = dev
        self.sb = sb
        self.rec = rec
        self.where = rec.where
        self.lost: OwnerLost | None = None

    @classmethod
    def claim(cls, dev: "Device", sb: fmt.Superblock, what: str = "mount"
              ) -> "Owner | None":
        """Take the record (InUse if a live owner holds it); None for a filesystem made
        before owner records existed: it has only the host locks."""
        if not has_record(sb):
            log.info("%s: no owner record on this filesystem (made before they existed); "
                     "only this host's locks keep a second mount out", dev.path)
            return None
        stale = check(dev, sb, what)
        if stale is not None and stale.state == STATE_ACTIVE:
            log.warning("%s: taking over the owner record of %s", dev.path, stale.describe())
        now = time.time_ns()
        pid = os.getpid()
        rec = OwnerRecord(sb.uuid, STATE_ACTIVE, secrets.randbits(63), boot_id(), pid,
                          HEARTBEAT_S, process_start(pid) or 0, now, now,
                          socket.gethostname())
        try:
            write_record(dev, sb, rec, sync=True)
        except DeviceError as exc:
            raise UserError(f"{dev.path}: {exc}") from None
        return cls(dev, sb, rec)

    def _beat(self) -> None:
        try:
            on_disk = read_record(self.dev, self.sb)
        except CorruptFilesystem as exc:
            raise OwnerLost(f"the owner record was overwritten ({exc})") from None
        if on_disk != self.rec:
            raise OwnerLost(f"the owner record now names {on_disk.describe()}")
        rec = replace(self.rec, seq=(self.rec.seq + 1) & ((1 << 63) - 1),
                      heartbeat_ns=time.time_ns(), where=self.where)
        write_record(self.dev, self.sb, rec, sync=False)
        self.rec = rec

    async def run(self, on_lost: Callable[[BaseException], None],
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Beat every interval (the first at once, to record the mountpoint); if another
        claim replaced ours, stop and call on_lost, which must stop all changes."""
        task_status.started()
        failing = False
        while True:
            try:
                await trio.to_thread.run_sync(self._beat)
                failing = False
            except OwnerLost as exc:
                self.lost = exc
                log.error("%s: %s: another host or program took this filesystem; no more "
                          "changes are written", self.dev.path, exc)
                on_lost(exc)
                return
            except OSError as exc:
                if not failing:  # once per run of failures
                    log.warning("%s: owner heartbeat failed: %s", self.dev.path, exc)
                failing = True
            await trio.sleep(self.rec.interval_s)

    def release(self) -> None:
        """Write the clean record back, unless someone else's claim replaced ours."""
        if self.lost is not None:
            return
        try:
            if read_record(self.dev, self.sb) != self.rec:
                log.warning("%s: the owner record is no longer ours; left as it is",
                            self.dev.path)
                return
            write_record(self.dev, self.sb, clean_record(self.sb), sync=True)
        except (OSError, CorruptFilesystem) as exc:
            log.warning("%s: cannot clear the owner record: %s", self.dev.path, exc)


def open_device(path: str, **kw: Any) -> Device:
    """Device.open, with a refusal that names the holder the owner record names."""
    try:
        return Device.open(path, **kw)
    except InUse as exc:
        holder = holder_of(exc.path) if exc.path else None
        if holder is None:
            raise
        raise InUse(f"{exc.path}: in use by {holder}", exc.path, exc.detail) from None


def holder_of(path: str) -> str | None:
    """Who the owner record of the filesystem at path names, if it names a live one."""
    try:
        dev = Device.open(path, readonly=True, exclusive=False)
    except UserError:
        return None
    try:
        sb = read_superblock(dev)
        if not has_record(sb):
            return None
        rec = read_record(dev, sb)
    except (UserError, OSError, CorruptFilesystem):
        return None
    finally:
        dev.close()
    if rec.state != STATE_ACTIVE or (rec.local and not rec.owner_alive()):
        return None
    return rec.describe()
