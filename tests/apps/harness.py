"""Plumbing shared by the application tests (pytest) and `make apps` (tests/apps/run.py):
a working directory ("lab") that owns every loop device, mount and server started in it and
tears them down in reverse order, even after a failure; loop devices over fallocated files;
atomicfs mounts driven through the `atomicfs` command, including the crash (SIGKILL of the
daemon, lazy detach of the dead mount).

Nothing here depends on pytest, so that the long runner can use it too.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

ATOMICFS = [sys.executable, "-m", "atomicfs"]
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Servers run as their own users (postgres, mysql), so the lab must be reachable by them:
# a 0755 directory under /tmp, not pytest's 0700 tmp_path.
WORK_BASE = os.environ.get("APPS_WORKDIR", "/tmp")


class CheckFailed(AssertionError):
    """An application-level check failed (the outcome the tests assert on)."""


def run(args: Sequence[str], *, check: bool = True, timeout: float = 300,
        user: str | None = None, input: str | None = None,
        env: dict[str, str] | None = None, cwd: str | None = None
        ) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; with check, raise CheckFailed carrying its output."""
    full_env = None if env is None else {**os.environ, **env}
    res = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                         user=user, group=user, extra_groups=[] if user else None,
                         input=input, env=full_env, cwd=cwd)
    if check and res.returncode != 0:
        raise CheckFailed(f"{' '.join(args)} exited {res.returncode}:\n"
                          f"{tail(res.stdout + res.stderr)}")
    return res


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def wait_for(pred: Callable[[], bool], timeout: float, what: str,
             interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise CheckFailed(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def mounts() -> list[tuple[str, str, str]]:
    """(source, mountpoint, fstype) of every mount, newest last."""
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            src, mp, fstype = line.split()[:3]
            out.append((src, mp.replace("\\040", " "), fstype))
    return out


def fstype_at(path: str) -> str | None:
    real = os.path.realpath(path)
    found = None
    for _, mp, fstype in mounts():
        if mp == real:
            found = fstype
    return found


def pid_alive(pid: int) -> bool:
    """True while pid runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def descendants(pid: int) -> list[int]:
    """All processes below pid (children first found by their parent id in /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(") ", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def signal_pids(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def freeze_tree(pid: int) -> list[int]:
    """SIGSTOP a process and everything below it, so that it issues no more I/O and
    cannot react (fork, restart) while the filesystem under it is killed. Returns the
    stopped pids, to be SIGKILLed afterwards."""
    frozen: list[int] = []
    for _ in range(5):  # a child forked while we stopped its parent is caught next round
        new = [p for p in [pid] + descendants(pid) if p not in frozen]
        if not new:
            break
        signal_pids(new, signal.SIGSTOP)
        frozen += new
    return frozen


def kill_pids(pids: Iterable[int], timeout: float = 30) -> None:
    pids = list(pids)
    signal_pids(pids, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    for pid in pids:
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)


class Server:
    """A database server started as our child, with its log file: what the PostgreSQL
    and MariaDB drivers share."""

    logfile: Path
    proc: subprocess.Popen[bytes] | None
    program = "server"  # for messages
    stop_signal = signal.SIGTERM  # a clean shutdown (stop)
    shutdown_signal = signal.SIGTERM  # the lab's teardown (cleanup)
    shutdown_timeout = 120.0

    def stop(self, timeout: float = 600) -> None:
        """A clean shutdown; CheckFailed unless the server exits 0 in time."""
        if self.proc is None:
            return
        self.proc.send_signal(self.stop_signal)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"{self.program} did not stop within {timeout:.0f}s") from None
        if self.proc.returncode != 0:
            raise CheckFailed(f"{self.program} exited {self.proc.returncode} at shutdown:\n"
                              f"{self.log_tail()}")
        self.proc = None

    def start(self, timeout: float = 600) -> None:
        raise NotImplementedError

    def freeze(self) -> list[int]:
        """Stop the server where it stands (the first half of a crash); its pids."""
        raise NotImplementedError

    def kill(self, frozen: Sequence[int] = ()) -> None:
        raise NotImplementedError

    def cleanup(self) -> None:
        """Ask the server to stop, then kill what is left (the lab's teardown)."""
        if self.proc is None:
            return
        if pid_alive(self.proc.pid):
            self.proc.send_signal(self.shutdown_signal)
            try:
                self.proc.wait(self.shutdown_timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def log_text(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return tail(self.log_text(), lines)


# --------------------------------------------------------------------------------- lab

class Lab:
    """A working directory and what was started in it. close() undoes everything in
    reverse order, keeps going when one step fails, and removes the directory only when
    nothing is mounted below it any more."""

    open_labs: "list[Lab]" = []  # for a last sweep (pytest session end, runner exit)

    def __init__(self, name: str, keep: bool = False) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=f"atomicfs-{name}-", dir=WORK_BASE))
        os.chmod(self.root, 0o755)
        self.keep = keep or bool(os.environ.get("APPS_KEEP"))
        self._undo: list[tuple[str, Callable[[], None]]] = []
        Lab.open_labs.append(self)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def dir(self, *parts: str, owner: str | None = None, mode: int = 0o755) -> Path:
        p = self.path(*parts)
        p.mkdir(parents=True, exist_ok=True)
        os.chmod(p, mode)
        if owner:
            shutil.chown(p, owner, owner)
        return p

    def defer(self, what: str, fn: Callable[[], None]) -> None:
        self._undo.append((what, fn))

    def close(self) -> list[str]:
        """Tear down; returns the steps that failed (also printed)."""
        errors: list[str] = []
        if self in Lab.open_labs:
            Lab.open_labs.remove(self)
        while self._undo:
            what, fn = self._undo.pop()
            try:
                fn()
            except Exception as exc:  # keep tearing down the rest
                errors.append(f"{what}: {exc}")
        busy = [mp for _, mp, _ in mounts() if mp.startswith(str(self.root) + "/")]
        if busy:
            errors.append(f"still mounted, {self.root} left in place: {busy}")
        elif not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)
        for e in errors:
            print(f"lab cleanup: {e}", file=sys.stderr)
        return errors

    @classmethod
    def close_all(cls) -> list[str]:
        errors: list[str] = []
        for lab in reversed(list(cls.open_labs)):
            errors += lab.close()
        return errors

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def loop_device(lab: Lab, size: int, name: str = "backing.img",
                fallocate: bool = True) -> str:
    """A loop device (direct I/O, so that the backing file's page cache stays out of the
    way) over a file of size bytes; fallocated when asked, as for benchmarks."""
    img = lab.path(name)
    with open(img, "wb") as f:
        if fallocate:
            os.posix_fallocate(f.fileno(), 0, size)
        else:
            f.truncate(size)
    dev = run(["losetup", "--find", "--show", "--direct-io=on", str(img)]).stdout.strip()

    def detach() -> None:
        for _ in range(100):
            res = run(["losetup", "-d", dev], check=False)
            if res.returncode == 0 or "No such device" in res.stderr:
                return
            time.sleep(0.1)
        raise RuntimeError(f"cannot detach {dev}: {res.stderr.strip()}")

    lab.defer(f"detach {dev}", detach)
    return dev


def kernel_mount(lab: Lab, dev: str, mountpoint: Path, fstype: str,
                 mkfs: Sequence[str] = ()) -> None:
    """mkfs (when given) and mount a kernel filesystem; unmounted at lab close."""
    if mkfs:
        run([*mkfs, dev])
    mountpoint.mkdir(parents=True, exist_ok=True)
    run(["mount", "-t", fstype, dev, str(mountpoint)])

    def umount() -> None:
        if fstype_at(str(mountpoint)) is not None:
            if run(["umount", str(mountpoint)], check=False).returncode != 0:
                run(["umount", "-l", str(mountpoint)])

    lab.defer(f"umount {mountpoint}", umount)


# ---------------------------------------------------------------------------- atomicfs

def atomicfs(*args: str, check: bool = True, timeout: float = 600
             ) -> subprocess.CompletedProcess[str]:
    return run([*ATOMICFS, *args], check=check, timeout=timeout)


class AtomicMount:
    """An atomicfs on target, mounted (and remounted) at mountpoint."""

    def __init__(self, lab: Lab, target: str, mountpoint: Path, options: Sequence[str] = ()
                 ) -> None:
        self.lab = lab
        self.target = target
        self.path = mountpoint
        self.options = list(options)
        self.pid = 0
        self.kills = 0
        mountpoint.mkdir(parents=True, exist_ok=True)
        lab.defer(f"unmount {mountpoint}", self.cleanup)

    def mkfs(self, *args: str) -> "AtomicMount":
        atomicfs("mkfs", self.target, "--force", *args)
        return self

    def mount(self, timeout: float = 600) -> "AtomicMount":
        """Mount; after a crash this replays the log, which takes a while for big logs."""
        args = ["mount", self.target, str(self.path)]
        for opt in self.options:
            args += ["-o", opt]
        atomicfs(*args, timeout=timeout)
        self.pid = int(self.stat()["pid"])
        return self

    @property
    def mounted(self) -> bool:
        return fstype_at(str(self.path)) == "fuse.atomicfs"

    def stat(self, rel: str = "") -> dict[str, Any]:
        return json.loads(os.getxattr(os.path.join(self.path, rel), "user.atomicfs.stat"))

    def counters(self) -> dict[str, int]:
        return dict(self.stat()["counters"])

    def sync(self) -> None:
        """Write back and commit everything (syncfs(2) does not reach a FUSE daemon)."""
        os.setxattr(self.path, "user.atomicfs.control", b"sync")

    def umount(self) -> None:
        atomicfs("umount", str(self.path))
        self.pid = 0

    def kill(self) -> None:
        """The crash: SIGKILL the daemon, then detach the dead mount (processes that still
        hold files on it see ENOTCONN until they are killed too)."""
        if self.pid:
            kill_pids([self.pid])
        run(["fusermount3", "-u", "-z", str(self.path)], check=False)
        self.pid = 0
        self.kills += 1

    def fsck(self) -> subprocess.CompletedProcess[str]:
        return atomicfs("fsck", self.target, check=False)

    def umount_and_fsck(self, after: str = "") -> None:
        """Unmount (everything written back), then fsck: CheckFailed unless clean."""
        self.umount()
        res = self.fsck()
        if res.returncode != 0:
            where = f" after {after}" if after else ""
            raise CheckFailed(f"fsck{where}: {tail(res.stdout)}")

    def cleanup(self) -> None:
        if not self.mounted:
            return
        try:
            if atomicfs("umount", str(self.path), check=False, timeout=300).returncode == 0 \
                    and not self.mounted:
                return
        except subprocess.TimeoutExpired:
            pass
        self.kill()


def atomic_writebacks(counters: dict[str, int]) -> int:
    return counters.get("atomic_writebacks_hardware", 0) + \
        counters.get("atomic_writebacks_software", 0)


def counter_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def set_unit(path: Path | str, unit: int) -> None:
    """The atomic unit of a directory, inherited by everything created in it."""
    os.setxattr(path, "user.atomicfs.atomic_unit", str(unit).encode())


# ------------------------------------------------------------------------ environment

DEB_TOOLS = {
    "fio": "fio",
    "sqlite3": "sqlite3",
    "postgres": "postgresql",
    "mariadbd": "mariadb-server",
    "mariadb-slap": "mariadb-server",
}


def pg_bindir() -> str | None:
    """The newest installed PostgreSQL server's bin directory (Debian's layout)."""
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/postgres")
             if p.parent.parent.name.isdigit()]
    return str(max(found, key=lambda b: int(b.parent.name))) if found else None


def which(tool: str) -> str | None:
    if tool == "postgres":
        bindir = pg_bindir()
        return os.path.join(bindir, "postgres") if bindir else None
    sbin = f"/usr/sbin/{tool}"  # mariadbd is not on root's PATH everywhere
    return shutil.which(tool) or (sbin if os.path.exists(sbin) else None)


def missing_tools(tools: Iterable[str]) -> list[str]:
    """Debian packages whose tools are missing (`make apps-deps` installs them)."""
    return sorted({DEB_TOOLS[t] for t in tools if which(t) is None})


def environment_problems() -> list[str]:
    problems = []
    if os.geteuid() != 0:
        problems.append("root (loop devices, FUSE mounts, servers as their own users)")
    for need in ("/dev/fuse",):
        if not os.path.exists(need):
            problems.append(need)
    for tool in ("fusermount3", "losetup", "mkfs.xfs"):
        if shutil.which(tool) is None:
            problems.append(tool)
    return problems
