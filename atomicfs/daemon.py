"""The mount daemon: start-up handshake, the trio main loop, shutdown, and umount.

`atomicfs mount` forks; the child opens and recovers the filesystem, mounts it and, once the
kernel's INIT request has been answered, tells the parent "ready" over a pipe (or the
one-line reason it could not). The parent returns only then, so the mount is serving when
`mount` exits. At exit the daemon writes its exit status to a small file in the private
runtime directory (atomicfs.runtime), which `atomicfs umount` reads after waiting for the
daemon to go away.

Once it has served, the daemon never unmounts by itself: not when it fails (the mount then
answers ENOTCONN, as after SIGKILL, until `atomicfs umount` or `umount` detaches it), and
on SIGTERM only when the mount is not busy, as `umount` would. A mount that vanished under
running applications would let them write into the directory underneath.
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

import pyfuse3
import trio

from atomicfs import daemonlog, fuseloop, runtime
from atomicfs.errors import UserError
from atomicfs.control import XATTR_CONTROL, XATTR_STAT
from atomicfs.fs import AtomicFS
from atomicfs.mkfs import too_small
from atomicfs.options import MountOptions
from atomicfs.volume import Volume

log = logging.getLogger(__name__)

FSTYPE = "fuse.atomicfs"
UMOUNT_TIMEOUT = 600.0


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
    runtime.runtime_dir()  # refuse now, in one line, if it is not private
    if foreground:
        os.chdir("/")
        _close_inherited(keep=())
        return serve(target, path, opts, None, daemonlog.log_to_stderr(opts.debug))
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        code = 1
        try:
            os.close(rfd)
            os.setsid()
            os.chdir("/")  # hold no directory busy
            _close_inherited(keep=(wfd,))
            repeats = daemonlog.log_detached(opts.debug)
            code = serve(target, path, opts, wfd, repeats)
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
        message = f"the daemon exited during start-up (see {daemonlog.where(pid)})"
    raise UserError(message)


def _read_all(fd: int) -> str:
    chunks = []
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace").strip()


def _close_inherited(keep: tuple[int, ...]) -> None:
    """Close every descriptor above stderr that the caller left open, except keep."""
    lowest = 3
    for fd in sorted(keep) + [os.sysconf("SC_OPEN_MAX")]:
        os.closerange(lowest, fd)
        lowest = fd + 1


def serve(target: str, mountpoint: str, opts: MountOptions, ready_fd: int | None,
          repeats: daemonlog.RepeatFilter) -> int:
    """Open, mount and serve until unmounted; the daemon's exit code."""

    served = False  # the kernel's INIT was answered: applications may be using the mount

    def report(message: str) -> None:
        nonlocal ready_fd, served
        served = served or message == "ready"
        if ready_fd is not None:
            os.write(ready_fd, message.encode())
            os.close(ready_fd)
            ready_fd = None
        elif message != "ready":
            print(f"atomicfs: {message}", file=sys.stderr)

    try:
        runtime.sweep()
        vol = Volume.open(target, opts)
    except UserError as exc:
        report(str(exc))
        return exc.exit_code
    except OSError as exc:
        report(f"{exc.filename or target}: {exc.strerror}")
        return 1
    if vol.claim is not None:
        vol.claim.where = mountpoint  # named by the first heartbeat
    tune_gc()
    code = 1
    try:
        fs = AtomicFS(vol, on_ready=lambda: report("ready"))
        fuse_opts = {"default_permissions", f"fsname={target}", "subtype=atomicfs"}
        if opts.allow_other:
            fuse_opts.add("allow_other")
        fuse_opts.update(opts.kernel_flags)
        if opts.atime == "noatime":  # for findmnt; the daemon keeps atime (libfuse knows
            fuse_opts.add("noatime")  # no other atime flag)
        if opts.ro:
            fuse_opts.add("ro")  # the kernel refuses writes with EROFS; statvfs: ST_RDONLY
        try:
            pyfuse3.init(fs, mountpoint, fuse_opts)
        except RuntimeError as exc:
            report(f"cannot mount on {mountpoint}: {exc} (is /dev/fuse usable? is "
                   "allow_other permitted in /etc/fuse.conf?)")
            return 1
        try:
            ok = trio.run(_main, vol, fs, mountpoint)
            code = 0 if ok else 1
        finally:
            # Never unmount a mount that served (see the module's docstring); one that failed
            # during start-up was never used, and `mount` reports the failure.
            pyfuse3.close(unmount=not served)
    except BaseException as exc:
        log.exception("daemon stopped on an error; %s stays mounted, answering ENOTCONN "
                      "until `atomicfs umount` or `umount`", mountpoint)
        report(f"daemon failed: {exc}")
        code = 1
    finally:
        vol.close()
        _write_status(code)
    log.info("daemon exits with %d", code)
    repeats.flush_repeats()
    if code == 0:
        daemonlog.drop_own_log()
    return code


def tune_gc() -> None:
    """The daemon's long-lived objects (inodes, folios) form almost no reference cycles,
    while per-request garbage makes the cyclic collector run often and walk all of them:
    move what exists now out of its reach and let it run far less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


async def _main(vol: Volume, fs: AtomicFS, mountpoint: str) -> bool:
    async with trio.open_nursery() as nursery:
        await vol.start(nursery)
        nursery.start_soon(_handle_signals, mountpoint)
        loop = fuseloop.install(vol.dev.completion_fd(), vol.opts.request_poll_us)
        if loop is not None:
            nursery.start_soon(loop.watch_end)
        await pyfuse3.main(min_tasks=4, max_tasks=64)
        log.info("unmounted; writing back")
        ok = await vol.shutdown()
        nursery.cancel_scope.cancel()
    return ok


async def _handle_signals(mountpoint: str) -> None:
    """SIGTERM, SIGINT, SIGHUP: unmount as `umount` would (not lazily: a busy mount stays
    and is still served); the kernel then ends the session and _main writes back."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for sig in signals:
            log.info("signal %d: unmounting %s", sig, mountpoint)
            res = await trio.run_process(_fusermount_args(mountpoint, lazy=False),
                                         check=False, capture_stdout=True,
                                         capture_stderr=True)
            if res.returncode == 0:
                return
            log.warning("cannot unmount %s (%s); still serving", mountpoint,
                        res.stderr.decode(errors="replace").strip() or "failed")


def _write_status(code: int) -> None:
    try:
        runtime.write_file(runtime.status_name(os.getpid()), f"{code}\n")
    except (OSError, UserError) as exc:
        log.error("cannot write the exit status: %s", exc)


# ---------------------------------------------------------------------------- umount

def read_stat(path: str) -> dict:
    try:
        return json.loads(os.getxattr(path, XATTR_STAT.decode()))
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP):
            raise UserError(f"{path} is not on an atomicfs mount") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise UserError(f"{path}: permission denied (a mount's statistics are for root "
                            "and the user who mounted it)") from None
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
    if not runtime.wait_exit(pid, timeout):
        raise UserError(f"the daemon (pid {pid}) did not exit within {timeout:.0f}s")
    code = _read_status(pid)
    if code != 0:
        print(f"atomicfs: the daemon reported errors (see {daemonlog.where(pid)})",
              file=sys.stderr)
    return 0 if ok and code == 0 else 1


def _fusermount_args(path: str, lazy: bool) -> list[str]:
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is None:
        raise UserError("fusermount3 not found (install the fuse3 package)")
    return [tool, "-u"] + (["-z"] if lazy else []) + [path]


def _fusermount(path: str, lazy: bool) -> None:
    res = subprocess.run(_fusermount_args(path, lazy), capture_output=True, text=True)
    if res.returncode != 0:
        msg = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"
        if "busy" in msg.lower():
            raise UserError(f"{path} is busy (files are open or a process works in it)")
        raise UserError(f"cannot unmount {path}: {msg}")


def _read_status(pid: int) -> int:
    try:
        text = runtime.take_file(runtime.status_name(pid))
        return int(text.strip() or 1) if text is not None else 1
    except (OSError, ValueError, UserError):
        return 1
