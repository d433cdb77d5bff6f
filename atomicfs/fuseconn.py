"""The FUSE connection's capabilities that libfuse sets and pyfuse3 cannot change.

libfuse turns on FUSE_CAP_AUTO_INVAL_DATA for every filesystem: the kernel drops a file's
page cache whenever a getattr shows a new mtime, which without writeback caching is after
every write. atomicfs has no use for it (every change to file data passes through the
kernel), and it cost a FUSE read for data the kernel had just cached (pgbench: one per
transaction). native/fuseconn.c wraps libfuse's fuse_session_new to clear the flag in the
init callback pyfuse3 keeps to itself; it must be loaded RTLD_GLOBAL before pyfuse3 is, so
the commands that mount (`atomicfs mount`, mount.atomicfs) call `load` before they import
the daemon. `atomicfs stat --json` says whether it took effect (key `fuse_conn`).
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LIBRARY = "libatomicfs-fuseconn.so"
FUSE_CAP_AUTO_INVAL_DATA = 1 << 12  # fuse_common.h (libfuse 3)

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
    lib.afs_fuseconn_clear.argtypes = [ctypes.c_uint]
    lib.afs_fuseconn_want.restype = lib.afs_fuseconn_capable.restype = ctypes.c_uint
    lib.afs_fuseconn_clear(FUSE_CAP_AUTO_INVAL_DATA)
    _lib = lib
    return True


def state() -> dict[str, Any]:
    """What the session was set up with (`atomicfs stat --json`, key `fuse_conn`)."""
    if _lib is None or _lib.afs_fuseconn_state() != 1:
        return {"wrapped": False, "auto_inval_data": None}
    return {"wrapped": True,
            "auto_inval_data": bool(_lib.afs_fuseconn_want() & FUSE_CAP_AUTO_INVAL_DATA)}
