"""The bench's system resources: one backing image on one loop device, mountpoints, caches,
and cleanup that runs on failure, Ctrl-C and SIGTERM.

Everything the bench creates lives under its work directory (default `bench/.work`), so the
sweep at start-up and at exit touches only mounts below that directory and loop devices
attached to its own backing file, never anybody else's.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any, Sequence

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
ATOMICFS = [sys.executable, "-m", "atomicfs"]


HALT_POLL = "/sys/module/haltpoll/parameters/guest_halt_poll_ns"


class BenchError(RuntimeError):
    """A step of the bench failed (a command, a mount); the message says which."""


def run(args: Sequence[str], check: bool = True, timeout: float = 300,
        quiet: bool = False, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a command in its own process group, which is killed whole on timeout, Ctrl-C or
    any error (fio's job processes with it); BenchError with its stderr when it fails and
    check is set."""
    if not quiet:
        log.debug("$ %s", " ".join(map(str, args)))
    argv = [str(a) for a in args]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        kill_group(proc)
        raise
    res = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    if check and res.returncode != 0:
        lines = (res.stderr or res.stdout).strip().splitlines()
        raise BenchError(f"{' '.join(argv)} exited {res.returncode}: "
                         f"{lines[-1] if lines else ''}")
    return res


def kill_group(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL a child started with start_new_session and everything in its group."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for _ in range(100):  # the group's other members (fio's job processes) exit too
        try:
            os.killpg(proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)


def mounts_below(base: Path) -> list[tuple[str, str]]:
    """(mountpoint, fstype) of every mount at or below base, innermost last."""
    out = []
    prefix = str(base.resolve())
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            point = parts[1].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                out.append((point, parts[2]))
    return out


def fstype_at(path: Path) -> str | None:
    real = str(path.resolve())
    found = None
    for point, fstype in mounts_below(path):
        if point == real:
            found = fstype
    return found


def unmount(path: Path, timeout: float = 300) -> None:
    """Unmount whatever is at path (atomicfs through its own umount, so data is written back;
    other FUSE mounts with fusermount3; kernel ones with umount), lazily as a last resort."""
    for attempt in range(40):
        fstype = fstype_at(path)
        if fstype is None:
            return
        if fstype == "fuse.atomicfs" and attempt == 0:
            res = run(ATOMICFS + ["umount", str(path)], check=False, timeout=timeout)
        elif fstype.startswith("fuse"):
            res = run(["fusermount3", "-u", str(path)], check=False)
        else:
            res = run(["umount", str(path)], check=False)
        if res.returncode == 0 and fstype_at(path) is None:
            return
        time.sleep(0.25)
    log.warning("%s stays busy: detaching it lazily", path)
    if (fstype_at(path) or "").startswith("fuse"):
        run(["fusermount3", "-u", "-z", str(path)], check=False)
    else:
        run(["umount", "-l", str(path)], check=False)


def start_fuse_daemon(argv: Sequence[str], mountpoint: Path, fstype: str, logpath: Path,
                      what: str) -> subprocess.Popen[bytes]:
    """Start a pyfuse3 filesystem of the benchmark (nullfs, the passthrough) in its own
    session, logging to logpath, and wait until it is mounted (BenchError if it is not
    within 20 s)."""
    with open(logpath, "ab") as logf:
        proc = subprocess.Popen(list(argv), start_new_session=True, stdout=logf, stderr=logf)
    deadline = time.monotonic() + 20
    while fstype_at(mountpoint) != fstype:
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_fuse_daemon(proc, mountpoint)
            raise BenchError(f"{what} did not mount (see {logpath})")
        time.sleep(0.05)
    return proc


def stop_fuse_daemon(proc: subprocess.Popen[bytes] | None, mountpoint: Path) -> None:
    """Unmount what start_fuse_daemon mounted and reap its process (killed after 20 s)."""
    try:
        unmount(mountpoint)
    finally:
        if proc is not None:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def drop_kernel_caches() -> None:
    """Write back and drop the kernel's page, dentry and inode caches (all filesystems)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def syncfs(path: Path) -> None:
    """syncfs(2) of the filesystem holding path."""
    run(["sync", "-f", str(path)], quiet=True)


class _Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP: unwind as Ctrl-C does, so cleanup runs."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise _Interrupted(f"signal {signum}")


class Environment:
    """The backing image, the loop device over it and the bench's mountpoints."""

    def __init__(self, workdir: Path, backing_size: int) -> None:
        self.workdir = workdir.resolve()
        self.backing = self.workdir / "backing.img"
        self.backing_size = backing_size
        self.mnt = self.workdir / "mnt"      # where each target is mounted in turn
        self.host = self.workdir / "xfshost"  # kernel XFS holding atomicfs's hardware image
        self.loop: str | None = None
        self._lock_fd: int | None = None
        self._stack = contextlib.ExitStack()

    # ----------------------------------------------------------------- life cycle
    def __enter__(self) -> "Environment":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.workdir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BenchError(f"another bench runs in {self.workdir}") from None
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _on_signal)
        # Ctrl-C too, even when started in the background (where SIGINT starts ignored)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.sweep()
        self.mnt.mkdir(exist_ok=True)
        self.host.mkdir(exist_ok=True)
        self._prepare_backing()
        self.loop = run(["losetup", "--find", "--show", "--direct-io=on",
                         str(self.backing)]).stdout.strip()
        log.info("backing image %s (%d MiB, written out) on %s with direct I/O",
                 self.backing, self.backing_size >> 20, self.loop)
        return self

    def __exit__(self, *exc: object) -> None:
        # Signals during cleanup would interrupt it: hold them until it is done.
        old = {s: signal.signal(s, signal.SIG_IGN)
               for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            self._stack.close()
            self.sweep()
        finally:
            for s, h in old.items():
                signal.signal(s, h if s == signal.SIGINT else signal.SIG_DFL)
            if self._lock_fd is not None:
                os.close(self._lock_fd)

    def callback(self, fn: Any, *args: Any) -> None:
        """Run fn(*args) at cleanup (last registered, first run)."""
        self._stack.callback(fn, *args)

    def sweep(self) -> None:
        """Unmount everything below the work directory and detach loop devices over the
        backing image: what this run or a killed earlier one left behind."""
        for point, _ in reversed(mounts_below(self.workdir)):
            log.info("unmounting leftover %s", point)
            unmount(Path(point))
        if self.backing.exists():
            res = run(["losetup", "-j", str(self.backing)], check=False)
            for line in res.stdout.splitlines():
                dev = line.split(":", 1)[0]
                for _ in range(50):
                    if run(["losetup", "-d", dev], check=False).returncode == 0:
                        break
                    time.sleep(0.1)
                log.info("detached %s", dev)
        self.loop = None

    def _prepare_backing(self) -> None:
        """A fully written backing file: neither sparse nor unwritten extents, so no write
        of the bench allocates or converts space in the host filesystem."""
        marker = self.workdir / "backing.ready"
        if self.backing.exists() and marker.exists() and \
                self.backing.stat().st_size == self.backing_size:
            return
        marker.unlink(missing_ok=True)
        log.info("writing the backing image (%d MiB) once", self.backing_size >> 20)
        with open(self.backing, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, self.backing_size)
        write_zeros(self.backing, self.backing_size)
        marker.touch()

    def set_guest_halt_poll(self, ns: int) -> None:
        """Set the haltpoll driver's guest_halt_poll_ns for the run; the old value comes
        back when the environment closes, also after a failure or Ctrl-C."""
        if ns < 0:
            raise BenchError(f"--guest-halt-poll-ns must be 0 or more, not {ns}")
        param = Path(HALT_POLL)
        try:
            old = param.read_text().strip()
            param.write_text(f"{ns}\n")
        except OSError as exc:
            raise BenchError(f"cannot set {param} (a VM guest with the haltpoll cpuidle "
                             f"driver, as root): {exc.strerror or exc}") from None
        log.info("guest halt polling %d ns for this run (was %s)", ns, old)
        self._stack.callback(param.write_text, old + "\n")

    # -------------------------------------------------------------- description
    def describe(self) -> dict[str, Any]:
        host = run(["findmnt", "-n", "-o", "SOURCE,FSTYPE", "-T", str(self.backing)],
                   check=False).stdout.split()
        return {
            "backing_file": str(self.backing),
            "backing_size": self.backing_size,
            "backing_host_device": host[0] if host else None,
            "backing_host_fstype": host[1] if len(host) > 1 else None,
            "loop_device": self.loop,
            "loop_direct_io": True,
        }


def write_zeros(path: Path, size: int, chunk: int = 4 << 20) -> None:
    """Write size bytes of zeros over path with O_DIRECT, then fsync."""
    import mmap
    buf = mmap.mmap(-1, chunk)  # page-aligned, zero-filled
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        off = 0
        while off < size:
            n = min(chunk, size - off)
            os.pwritev(fd, [memoryview(buf)[:n]], off)
            off += n
        os.fsync(fd)
    finally:
        os.close(fd)
        buf.close()


def machine_info() -> dict[str, Any]:
    """Kernel, CPU, memory, tool versions: what a reader needs to judge the figures."""
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    fio = run(["fio", "--version"], check=False).stdout.strip()
    fuse = run(["pkg-config", "--modversion", "fuse3"], check=False).stdout.strip()
    git = run(["git", "-C", str(REPO), "describe", "--always", "--dirty", "--abbrev=12"],
              check=False).stdout.strip()
    try:
        import pyfuse3
        pyfuse3_version = getattr(pyfuse3, "__version__", "?")
    except ImportError:  # pragma: no cover
        pyfuse3_version = None
    return {
        "hostname": platform.node(),
        "kernel": platform.release(),
        "kernel_version": platform.version(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": mem,
        "python": platform.python_version(),
        "fio": fio,
        "libfuse": fuse,
        "pyfuse3": pyfuse3_version,
        "atomicfs_git": git,
        "loadavg_start": os.getloadavg(),
        "cpuidle": cpuidle_info(),
    }


def cpuidle_info() -> dict[str, Any]:
    """How idle CPUs wait, which sets the cost of every wake-up between threads: the
    cpuidle driver and, in a VM guest with the haltpoll driver, how long an idle vCPU
    polls before it halts (0: it halts at once, and waking it costs a VM exit and entry;
    on the bench's machine that took a write + fdatasync cycle on atomicfs from about
    530 to 880 µs, and kernel XFS's fdatasync from 220 to 370 µs)."""
    out: dict[str, Any] = {}
    for key, path in (("driver", "/sys/devices/system/cpu/cpuidle/current_driver"),
                      ("governor", "/sys/devices/system/cpu/cpuidle/current_governor"),
                      ("guest_halt_poll_ns", HALT_POLL)):
        with contextlib.suppress(OSError, ValueError):
            text = Path(path).read_text().strip()
            out[key] = int(text) if key == "guest_halt_poll_ns" else text
    return out


def need_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        raise BenchError(f"missing tools: {', '.join(missing)} (make bench installs them)")
    if os.geteuid() != 0:
        raise BenchError("the bench needs root (loop devices, mkfs, mounts, drop_caches)")
