"""Exceptions that carry a user-facing, one-line message."""
from __future__ import annotations


class UserError(Exception):
    """A mistake or condition the user can act on; printed as one line, no traceback."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class NotAtomicfs(UserError):
    """The target holds no atomicfs filesystem (or not one this version can read)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=2)


class InUse(UserError):
    """The filesystem is served by someone else, or its device is held by another opener
    (`path` and `detail` say which; the owner layer adds the holder its record names)."""

    def __init__(self, message: str, path: str = "", detail: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.detail = detail


class CorruptFilesystem(Exception):
    """On-disk structures contradict each other; fsck reports these as damage."""


class NoSpace(Exception):
    """The allocator has no free blocks for the request."""


class DeviceError(OSError):
    """A device read, write or flush failed; errno is that of the system call."""
