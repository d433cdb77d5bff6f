"""The owner record's format and the loop driver's device numbers."""
from __future__ import annotations

import os
import time

import pytest

from atomicfs import locks, owner
from atomicfs.errors import CorruptFilesystem

UUID = bytes(range(16, 32))


def active() -> owner.OwnerRecord:
    now = time.time_ns()
    return owner.OwnerRecord(UUID, owner.STATE_ACTIVE, seq=123, boot_id=owner.boot_id(),
                             pid=os.getpid(), interval_s=5,
                             pid_start=owner.process_start(os.getpid()) or 0,
                             mount_time_ns=now, heartbeat_ns=now, hostname="h" * 80,
                             where="/mnt/é")


def test_round_trip_and_truncated_text() -> None:
    rec = active()
    back = owner.OwnerRecord.unpack(rec.pack(4096))
    assert back.hostname == "h" * 64 and back.where == "/mnt/é"
    assert back.seq == 123 and back.pid == os.getpid() and back.state == owner.STATE_ACTIVE
    assert len(rec.pack(8192)) == 8192


def test_damage_is_detected() -> None:
    raw = bytearray(active().pack(4096))
    raw[40] ^= 1
    with pytest.raises(CorruptFilesystem, match="checksum"):
        owner.OwnerRecord.unpack(bytes(raw))
    with pytest.raises(CorruptFilesystem, match="magic"):
        owner.OwnerRecord.unpack(bytes(4096))


def test_this_process_is_alive_and_a_reused_pid_is_not() -> None:
    rec = active()
    assert rec.local and rec.owner_alive()
    assert not owner.OwnerRecord(**{**rec.__dict__, "pid_start": 1}).owner_alive()
    assert not owner.OwnerRecord(**{**rec.__dict__, "boot_id": bytes(16)}).owner_alive()
    text = rec.describe()
    assert f"pid {os.getpid()} on this host" in text and "mounted on /mnt/é" in text


def test_kernel_device_numbers_decode_as_st_dev() -> None:
    # huge_encode_dev(): minor low byte, major, then the minor's high bits
    for major, minor in ((7, 3), (259, 5), (8, 300), (253, 1 << 19)):
        encoded = (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)
        assert locks._decode_kernel_dev(encoded) == os.makedev(major, minor)
