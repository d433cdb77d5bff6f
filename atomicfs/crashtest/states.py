"""Crash states drawn from a recording, and the images built from them.

A recording (atomicfs.crashtest.recording) starts at mount time on a copy of a freshly made
image, the *base*: the base plus every completed write, in completion order, is the image
at unmount.

A crash at point c (the first c events happened, the rest did not) leaves on the device:

* every write that completed before the start of the last flush that ended before c
  (the device promised those);
* of the other writes that were submitted before c (completed or still in flight), any
  subset, each absent, whole, or torn: some of its `tear`-byte chunks written and the
  others not. Writes submitted with RWF_ATOMIC are whole or absent, never torn.

`CrashState` is one such choice, drawn deterministically from a seed; `StateBuilder` turns
it into an image file quickly (see its docstring for the method and why).
"""
from __future__ import annotations

import errno
import os
import random
from dataclasses import dataclass, field
from typing import Iterable

from atomicfs.crashtest.recording import Recording


# --------------------------------------------------------------------------- crash states

WHOLE, TORN = "whole", "torn"


@dataclass
class Applied:
    """One in-flight write put into a crash state: whole, or only some chunks."""

    write: int  # index into Recording.writes
    mode: str
    chunks: list[tuple[int, int]] = field(default_factory=list)  # (offset in write, length)


@dataclass
class CrashState:
    index: int
    crash_point: int  # events [0, crash_point) happened
    durable_start: int  # writes completed before this event index are all there
    applied: list[Applied]
    in_flight: int  # how many writes were candidates

    @property
    def torn_writes(self) -> int:
        return sum(1 for a in self.applied if a.mode == TORN)

    def describe(self) -> str:
        parts = [f"{a.write}{'' if a.mode == WHOLE else '~'}" for a in self.applied]
        return (f"state {self.index}: crash at event {self.crash_point}, durable before "
                f"event {self.durable_start}, {self.in_flight} in flight, applied "
                f"[{' '.join(parts)}]")


def choose_states(rec: Recording, count: int, seed: int, tear: int,
                  first_index: int = 0) -> list[CrashState]:
    """count crash states, deterministic from seed, sorted by crash point."""
    if rec.n_events == 0:
        return []
    rng = random.Random(seed)
    points = sorted(rng.randint(1, rec.n_events) for _ in range(count))
    states = []
    for k, c in enumerate(points):
        srng = random.Random(f"{seed}:{k}:{c}")
        states.append(_choose_state(rec, first_index + k, c, tear, srng))
    return states


def _choose_state(rec: Recording, index: int, c: int, tear: int,
                  rng: random.Random) -> CrashState:
    candidates = rec.in_flight_writes(c)
    # Vary how much of the window survives, so that both nearly-empty and nearly-full
    # windows occur, not only the 50/50 mixes.
    keep = rng.choice((0.1, 0.5, 0.9, rng.random()))
    torn_share = rng.choice((0.0, 0.3, 0.7))
    applied = []
    for i in candidates:
        if rng.random() >= keep:
            continue
        w = rec.writes[i]
        if not w.atomic and w.length > tear and rng.random() < torn_share:
            applied.append(Applied(i, TORN, torn_chunks(w.length, tear, rng)))
        else:
            applied.append(Applied(i, WHOLE))
    return CrashState(index, c, rec.durable_start(c), applied, len(candidates))


def torn_chunks(length: int, tear: int, rng: random.Random) -> list[tuple[int, int]]:
    """The tear-sized chunks of a torn write that reached the device: a prefix, a
    suffix, or a random subset (devices persist sectors in no particular order)."""
    n = (length + tear - 1) // tear
    shape = rng.randrange(3)
    kept: Iterable[int]
    if shape == 0:
        kept = range(0, rng.randrange(1, n))
    elif shape == 1:
        kept = range(rng.randrange(1, n), n)
    else:
        kept = [k for k in range(n) if rng.random() < 0.5]
    runs: list[tuple[int, int]] = []
    for k in kept:
        off = k * tear
        ln = min(tear, length - off)
        if runs and runs[-1][0] + runs[-1][1] == off:
            runs[-1] = (runs[-1][0], runs[-1][1] + ln)
        else:
            runs.append((off, ln))
    return runs


# ---------------------------------------------------------------------- building images

def sparse_copy(src: str, dst: str) -> None:
    """Copy src to dst keeping holes: only the data extents are copied (in the kernel)."""
    size = os.path.getsize(src)
    sfd = os.open(src, os.O_RDONLY)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(dfd, size)
            pos = 0
            while pos < size:
                try:
                    start = os.lseek(sfd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:  # only a hole remains
                        break
                    raise
                end = os.lseek(sfd, start, os.SEEK_HOLE)
                _copy_range(sfd, dfd, start, end - start)
                pos = end
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def _copy_range(sfd: int, dfd: int, offset: int, length: int) -> None:
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(sfd, dfd, length - done, offset + done, offset + done)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            n = _copy_chunk(sfd, dfd, offset + done, min(length - done, 1 << 20))
        if n <= 0:
            raise OSError(errno.EIO, "copy made no progress")
        done += n


def _copy_chunk(sfd: int, dfd: int, offset: int, length: int) -> int:
    """Fallback for copies between filesystems that copy_file_range refuses."""
    data = os.pread(sfd, length, offset)
    return os.pwrite(dfd, data, offset)


class StateBuilder:
    """Builds crash-state images from one recording.

    Method (chosen by measurement, see the report in README): a *prefix image* holds the
    base plus the durable writes of the current crash point and only ever moves forward,
    because states are built in crash-point order; each state is a sparse copy of the
    prefix image (copy_file_range of its data extents only: a few MiB) plus its in-flight
    choices. Applying every durable write to a fresh copy per state would cost the whole
    recording each time; undoing changes on a single image would save the copy but makes
    every checker write something to undo.
    """

    def __init__(self, rec: Recording, base: str, scratch: str) -> None:
        self.rec = rec
        self.scratch = scratch
        self.prefix = os.path.join(scratch, "prefix.img")
        sparse_copy(base, self.prefix)
        self._prefix_fd = os.open(self.prefix, os.O_WRONLY)
        self._applied_upto = 0  # writes[0:_applied_upto] are in the prefix image

    def close(self) -> None:
        if self._prefix_fd >= 0:
            os.close(self._prefix_fd)
            self._prefix_fd = -1
        unlink_quietly(self.prefix)

    def __enter__(self) -> "StateBuilder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _advance_prefix(self, durable_start: int) -> None:
        """Apply every write that completed before event durable_start."""
        writes = self.rec.writes
        i = self._applied_upto
        if i < len(writes) and writes[i].event < durable_start:
            while i < len(writes) and writes[i].event < durable_start:
                os.pwrite(self._prefix_fd, self.rec.data(writes[i]), writes[i].offset)
                i += 1
            self._applied_upto = i
        elif i > 0 and writes[i - 1].event >= durable_start:
            raise ValueError("crash states must be built in crash-point order")

    def build(self, state: CrashState, path: str) -> str:
        """Write the image of state to path."""
        self._advance_prefix(state.durable_start)
        sparse_copy(self.prefix, path)
        fd = os.open(path, os.O_WRONLY)
        try:
            for a in state.applied:
                w = self.rec.writes[a.write]
                data = self.rec.data(w)
                if a.mode == WHOLE:
                    os.pwrite(fd, data, w.offset)
                else:
                    for off, ln in a.chunks:
                        os.pwrite(fd, data[off: off + ln], w.offset + off)
        finally:
            os.close(fd)
        return path

    def build_final(self, path: str) -> str:
        """The image with every completed write (what the device held at the end)."""
        sparse_copy(self.prefix, path)
        fd = os.open(path, os.O_WRONLY)
        try:
            for w in self.rec.writes[self._applied_upto:]:
                os.pwrite(fd, self.rec.data(w), w.offset)
        finally:
            os.close(fd)
        return path


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

