"""The FUSE connection's capabilities that libfuse sets and pyfuse3 cannot change.

libfuse turns on FUSE_CAP_AUTO_INVAL_DATA for every filesystem: the kernel drops a file's
page cache whenever a getattr shows a new mtime, which without writeback caching is after
every write. atomicfs has no use for it (every change to file data passes through the
kernel), and it cost a FUSE read for data the kernel had just cached (pgbench: one per
transaction). native/fuseconn.c wraps libfuse's fuse_session_new to clear the flag in the
init callback pyfuse3 keeps to itself.

And libfuse 3.14 cannot negotiate FUSE_HANDLE_KILLPRIV_V2, without which the kernel asks
for `security.capability` before every write (a round trip per write). The wrapper's custom
I/O adds it to the INIT reply; the kernel then asks once per inode and leaves clearing the
setuid/setgid bits to the filesystem, flagging the requests that must (`kill_suidgid`).

The library must be loaded RTLD_GLOBAL before pyfuse3 is, so the commands that mount
(`atomicfs mount`, mount.atomicfs) call `load` before they import the daemon. `atomicfs
stat --json` says what took effect (key `fuse_conn`).
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LIBRARY = "libatomicfs-fuseconn.so"
FUSE_CAP_AUTO_INVAL_DATA = 1 << 12  # fuse_common.h (libfuse 3)
FUSE_HANDLE_KILLPRIV_V2 = 1 << 28  # linux/fuse.h, INIT flags

_lib: Any = None


def _library() -> Path:
    """In the package (a source tree), else next to the `atomicfs` command (installed by
    `make install`, as the preload library is)."""
    here = Path(__file__).resolve().parent
    command = Path(sys.argv[0]).resolve().parent if sys.argv and sys.argv[0] else here
    for candidate in (here / LIBRARY, command / LIBRARY):
        if candidate.is_file():
            return candidate
    return here / LIBRARY  # CDLL's error names it


def load() -> bool:
    """Load the wrapper and ask it to clear auto_inval_data; False (and the kernel keeps
    libfuse's default) if pyfuse3 is already loaded or the library is missing."""
    global _lib
    if _lib is not None:
        return True
    if "pyfuse3" in sys.modules:  # an in-process mount of the tests, say
        log.info("pyfuse3 was loaded before the FUSE connection wrapper: the kernel will "
                 "drop a file's cache whenever its mtime changes")
        return False
    try:
        lib = ctypes.CDLL(str(_library()), mode=os.RTLD_NOW | os.RTLD_GLOBAL)
    except OSError as exc:
        log.warning("FUSE connection wrapper not loaded (%s): the kernel will drop a file's "
                    "cache whenever its mtime changes", exc)
        return False
    lib.afs_fuseconn_clear.argtypes = lib.afs_fuseconn_add_init.argtypes = [ctypes.c_uint]
    lib.afs_fuseconn_want.restype = lib.afs_fuseconn_capable.restype = ctypes.c_uint
    for name in ("init_replied", "kill_uid", "kill_gid", "kill_pid"):
        getattr(lib, "afs_fuseconn_" + name).restype = ctypes.c_uint
    lib.afs_fuseconn_clear(FUSE_CAP_AUTO_INVAL_DATA)
    lib.afs_fuseconn_add_init(FUSE_HANDLE_KILLPRIV_V2)
    _lib = lib
    return True


def state() -> dict[str, Any]:
    """What the session was set up with (`atomicfs stat --json`, key `fuse_conn`)."""
    if _lib is None or _lib.afs_fuseconn_state() != 1:
        return {"wrapped": False, "auto_inval_data": None, "handle_killpriv_v2": False}
    return {"wrapped": True,
            "auto_inval_data": bool(_lib.afs_fuseconn_want() & FUSE_CAP_AUTO_INVAL_DATA),
            "handle_killpriv_v2": killpriv_v2()}


def loop_fds() -> tuple[int, int]:
    """/dev/fuse and the eventfd that says the connection ended, once the wrapper's custom
    I/O reads the connection (after mounting); (-1, -1) otherwise (atomicfs/fuseloop.py)."""
    if _lib is None:
        return -1, -1
    return _lib.afs_fuseconn_fd(), _lib.afs_fuseconn_end_fd()


def killpriv_v2() -> bool:
    """The kernel took FUSE_HANDLE_KILLPRIV_V2: requests flag when the filesystem must clear
    setuid/setgid bits (`kill_suidgid`), and the kernel asks for security.capability once
    per inode instead of before every write."""
    return _lib is not None and bool(_lib.afs_fuseconn_init_replied() & FUSE_HANDLE_KILLPRIV_V2)


@dataclass(frozen=True)
class Caller:
    """Who sent a request that asks to clear setuid/setgid bits."""
    uid: int
    gid: int
    pid: int

    def in_group(self, gid: int) -> bool:
        """The kernel's in_group_or_capable for a caller the kernel found without
        CAP_FSETID (a chown is flagged for everyone: root counts as capable there)."""
        if self.uid == 0 or self.gid == gid:
            return True
        try:
            with open(f"/proc/{self.pid}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("Groups:"):
                        return str(gid) in line.split()[1:]
        except OSError:  # the caller is gone
            pass
        return False


def kill_suidgid() -> Caller | None:
    """The caller, if the request being handled (a write, setattr or open) asks the
    filesystem to clear the setuid/setgid bits. Valid only before the handler's first
    await: pyfuse3 reads the next request after that."""
    if _lib is None or not _lib.afs_fuseconn_kill_suidgid():
        return None
    return Caller(_lib.afs_fuseconn_kill_uid(), _lib.afs_fuseconn_kill_gid(),
                  _lib.afs_fuseconn_kill_pid())
