"""The mount daemon: start-up handshake, the trio main loop, shutdown, and umount.

`atomicfs mount` forks; the child opens and recovers the filesystem, mounts it and, once the
kernel's INIT request has been answered, tells the parent "ready" over a pipe (or the
one-line reason it could not). The parent returns only then, so the mount is serving when
`mount` exits. At exit the daemon writes its exit status to a small file in the runtime
directory, which `atomicfs umount` reads after waiting for the daemon to go away.
"""
from __future__ import annotations

import errno
import gc
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable

import pyfuse3
import trio

from atomicfs.errors import UserError
from atomicfs.fs import XATTR_CONTROL, XATTR_STAT, AtomicFS
from atomicfs.mkfs import too_small
from atomicfs.options import MountOptions
from atomicfs.volume import Volume

log = logging.getLogger(__name__)

FSTYPE = "fuse.atomicfs"
UMOUNT_TIMEOUT = 600.0


def runtime_dir() -> str:
    if os.geteuid() == 0:
        base = "/run/atomicfs"
    else:
        base = os.path.join(os.environ.get("XDG_RUNTIME_DIR") or "/tmp",
                            f"atomicfs-{os.geteuid()}")
    os.makedirs(base, mode=0o700, exist_ok=True)
    return base


def status_path(pid: int) -> str:
    return os.path.join(runtime_dir(), f"{pid}.status")


def log_path(pid: int) -> str:
    return os.path.join(runtime_dir(), f"{pid}.log")


# ----------------------------------------------------------------------------- mount

def find_mount(mountpoint: str) -> tuple[str, str] | None:
    """(fstype, source) of what is mounted exactly at mountpoint, if anything."""
    target = os.path.realpath(mountpoint)
    found = None
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and _unescape(parts[1]) == target:
                found = (parts[2], _unescape(parts[0]))
    return found


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n") \
        .replace("\\134", "\\")


def check_mountpoint(mountpoint: str) -> str:
    path = os.path.realpath(mountpoint)
    if not os.path.exists(path):
        raise UserError(f"mountpoint {mountpoint} does not exist")
    if not os.path.isdir(path):
        raise UserError(f"mountpoint {mountpoint} is not a directory")
    mounted = find_mount(path)
    if mounted is not None and mounted[0] == FSTYPE:
        raise UserError(f"{mountpoint} already has an atomicfs mounted on it")
    return path


def mount(target: str, mountpoint: str, opts: MountOptions, foreground: bool) -> int:
    """`atomicfs mount`; returns the exit code."""
    path = check_mountpoint(mountpoint)
    target = os.path.abspath(target)
    if not os.path.exists(target):
        raise UserError(f"{target}: no such file or device")
    small = too_small(target)
    if small:
        raise UserError(small)
    if foreground:
        return serve(target, path, opts, None)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        code = 1
        try:
            os.close(rfd)
            os.setsid()
            _detach_stdio(log_path(os.getpid()))
            code = serve(target, path, opts, wfd)
        except BaseException:  # pragma: no cover - last resort: never return to the CLI
            logging.getLogger(__name__).exception("daemon failed")
        finally:
            os._exit(code)
    os.close(wfd)
    message = _read_all(rfd)
    os.close(rfd)
    if message == "ready":
        return 0
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    if not message:
        message = f"the daemon exited during start-up (see {log_path(pid)})"
    raise UserError(message)


def _read_all(fd: int) -> str:
    chunks = []
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace").strip()


def _detach_stdio(logfile: str) -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    out = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(devnull)
    os.close(out)


def setup_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        stream=sys.stderr, force=True)
    if not debug:
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)


def serve(target: str, mountpoint: str, opts: MountOptions, ready_fd: int | None) -> int:
    """Open, mount and serve until unmounted; the daemon's exit code."""
    setup_logging(opts.debug)

    def report(message: str) -> None:
        nonlocal ready_fd
        if ready_fd is not None:
            os.write(ready_fd, message.encode())
            os.close(ready_fd)
            ready_fd = None
        elif message != "ready":
            print(f"atomicfs: {message}", file=sys.stderr)

    try:
        vol = Volume.open(target, opts)
    except UserError as exc:
        report(str(exc))
        return exc.exit_code
    tune_gc()
    code = 1
    try:
        fs = AtomicFS(vol, on_ready=lambda: report("ready"))
        fuse_opts = {"default_permissions", f"fsname={target}", "subtype=atomicfs"}
        if opts.allow_other:
            fuse_opts.add("allow_other")
        if opts.ro:
            fuse_opts.add("ro")  # the kernel refuses writes with EROFS; statvfs: ST_RDONLY
        try:
            pyfuse3.init(fs, mountpoint, fuse_opts)
        except RuntimeError as exc:
            report(f"cannot mount on {mountpoint}: {exc} (is /dev/fuse usable? is "
                   "allow_other permitted in /etc/fuse.conf?)")
            return 1
        mounted = True
        try:
            ok = trio.run(_main, vol, fs)
            code = 0 if ok else 1
        finally:
            pyfuse3.close(unmount=mounted)
    except BaseException as exc:
        log.exception("daemon stopped on an error")
        report(f"daemon failed: {exc}")
        code = 1
    finally:
        vol.close()
        _write_status(code)
    log.info("daemon exits with %d", code)
    return code


def tune_gc() -> None:
    """The daemon's long-lived objects (inodes, folios) form almost no reference cycles,
    while per-request garbage makes the cyclic collector run often and walk all of them:
    move what exists now out of its reach and let it run far less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


async def _main(vol: Volume, fs: AtomicFS) -> bool:
    async with trio.open_nursery() as nursery:
        await vol.start(nursery)
        fs.nursery = nursery
        nursery.start_soon(_handle_signals)
        await pyfuse3.main(min_tasks=4, max_tasks=64)
        log.info("unmounted; writing back")
        ok = await vol.shutdown()
        nursery.cancel_scope.cancel()
    return ok


async def _handle_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for sig in signals:
            log.info("signal %d: unmounting", sig)
            pyfuse3.terminate()
            return


def _write_status(code: int) -> None:
    try:
        with open(status_path(os.getpid()), "w") as f:
            f.write(f"{code}\n")
    except OSError:
        pass


# ---------------------------------------------------------------------------- umount

def read_stat(path: str) -> dict:
    try:
        return json.loads(os.getxattr(path, XATTR_STAT.decode()))
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP):
            raise UserError(f"{path} is not on an atomicfs mount") from None
        if exc.errno == errno.ENOTCONN:
            raise UserError(f"{path}: the atomicfs daemon is gone (crashed or killed); "
                            f"`atomicfs umount` it, then mount again") from None
        raise UserError(f"{path}: {exc.strerror}") from None


def umount(mountpoint: str, timeout: float = UMOUNT_TIMEOUT) -> int:
    """`atomicfs umount`; returns the exit code."""
    path = os.path.realpath(mountpoint)
    mounted = find_mount(path)
    if mounted is None or mounted[0] != FSTYPE:
        raise UserError(f"{mountpoint} is not an atomicfs mountpoint")
    try:
        pid = int(json.loads(os.getxattr(path, XATTR_STAT.decode()))["pid"])
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise UserError(f"{mountpoint}: {exc.strerror}") from None
        _fusermount(path, lazy=True)
        print(f"atomicfs: {mountpoint}: the daemon was gone; detached the dead mount "
              "(mount again to recover)", file=sys.stderr)
        return 1
    ok = True
    try:
        if not os.statvfs(path).f_flag & os.ST_RDONLY:  # -o ro: nothing to write back
            os.setxattr(path, XATTR_CONTROL.decode(), b"sync")
    except OSError as exc:
        print(f"atomicfs: {mountpoint}: writing back failed: {exc.strerror}", file=sys.stderr)
        ok = False
    _fusermount(path, lazy=False)
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            raise UserError(f"the daemon (pid {pid}) did not exit within {timeout:.0f}s")
        time.sleep(0.02)
    code = _read_status(pid)
    if code != 0:
        print(f"atomicfs: the daemon reported errors (see {log_path(pid)})", file=sys.stderr)
    return 0 if ok and code == 0 else 1


def _fusermount(path: str, lazy: bool) -> None:
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is None:
        raise UserError("fusermount3 not found (install the fuse3 package)")
    args = [tool, "-u"] + (["-z"] if lazy else []) + [path]
    res = subprocess.run(args, capture_output=True, text=True)
    if res.returncode != 0:
        msg = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"
        if "busy" in msg.lower():
            raise UserError(f"{path} is busy (files are open or a process works in it)")
        raise UserError(f"cannot unmount {path}: {msg}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (our own child in tests) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _read_status(pid: int) -> int:
    path = status_path(pid)
    try:
        with open(path) as f:
            code = int(f.read().strip() or 1)
        os.unlink(path)
        return code
    except (OSError, ValueError):
        return 1


ReadyFn = Callable[[str], None]
