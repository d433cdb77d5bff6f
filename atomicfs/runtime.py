"""The daemons' private runtime files: exit statuses, and logs when there is no system log.

They live in a directory only the user can reach: `/run/atomicfs` for root,
`$XDG_RUNTIME_DIR/atomicfs` for other users. Without XDG_RUNTIME_DIR (runuser, cron,
services) a user's files go to `/run/user/UID/atomicfs` when logind made that directory,
else to `~/.cache/atomicfs` (the home directory from the password database): never to a
shared place like /tmp, where another user could have made the directory first. Whatever the
path, the directory is created 0700 and checked before every use (a directory, not a symlink,
owned by the user, no access for others), else the command refuses with one line. Files in
it are opened relative to the checked directory with O_NOFOLLOW | O_CLOEXEC.
"""
from __future__ import annotations

import os
import pwd
import select
import stat
import time

from atomicfs.errors import UserError

STALE_STATUS = 600.0  # seconds: a status nobody collected (plain `umount`) is dropped then
KEEP_FAILED_LOGS = 20  # logs of daemons that failed, newest first; older ones are removed
_FILE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC


def runtime_dir() -> str:
    """The checked runtime directory of this user (created if missing)."""
    euid = os.geteuid()
    if euid == 0:
        return _private_dir("/run/atomicfs")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return _private_dir(os.path.join(xdg, "atomicfs"))
    logind = f"/run/user/{euid}"
    if os.path.isdir(logind):
        return _private_dir(os.path.join(logind, "atomicfs"))
    try:
        home = pwd.getpwuid(euid).pw_dir
    except KeyError:
        raise UserError(f"no runtime directory for uid {euid}: set XDG_RUNTIME_DIR to a "
                        "private directory") from None
    cache = os.path.join(home, ".cache")
    try:
        os.mkdir(cache, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise UserError(f"no runtime directory: cannot create {cache}: {exc.strerror} "
                        "(set XDG_RUNTIME_DIR to a private directory)") from None
    return _private_dir(os.path.join(cache, "atomicfs"))


def _private_dir(path: str) -> str:
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise UserError(f"cannot create the runtime directory {path}: {exc.strerror}") \
            from None
    os.close(_open_checked(path))
    return path


def _open_checked(path: str) -> int:
    """A descriptor of the directory at path once it is proven private to this user."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _FILE_FLAGS)
    except OSError as exc:
        why = "it is a symlink" if os.path.islink(path) else exc.strerror
        raise UserError(f"refusing the runtime directory {path}: {why}") from None
    st = os.fstat(fd)
    problem = None
    if st.st_uid != os.geteuid():
        problem = f"it is owned by uid {st.st_uid}, not {os.geteuid()}"
    elif stat.S_IMODE(st.st_mode) & 0o077:
        problem = f"its mode is {stat.S_IMODE(st.st_mode):04o}, not 0700"
    if problem is not None:
        os.close(fd)
        raise UserError(f"refusing the runtime directory {path}: {problem}")
    return fd


def file_path(name: str) -> str:
    return os.path.join(runtime_dir(), name)


def status_name(pid: int) -> str:
    return f"{pid}.status"


def log_name(pid: int) -> str:
    return f"{pid}.log"


def write_file(name: str, data: str) -> None:
    dfd = _open_checked(runtime_dir())
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _FILE_FLAGS, 0o600,
                     dir_fd=dfd)
        try:
            os.write(fd, data.encode())
        finally:
            os.close(fd)
    finally:
        os.close(dfd)


def take_file(name: str) -> str | None:
    """Read and remove a runtime file; None if it is not there (or not a plain file)."""
    dfd = _open_checked(runtime_dir())
    try:
        try:
            fd = os.open(name, os.O_RDONLY | _FILE_FLAGS, dir_fd=dfd)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            data = os.read(fd, 4096).decode(errors="replace")
        finally:
            os.close(fd)
        os.unlink(name, dir_fd=dfd)
        return data
    finally:
        os.close(dfd)


def remove_files(*names: str) -> None:
    dfd = _open_checked(runtime_dir())
    try:
        for name in names:
            try:
                os.unlink(name, dir_fd=dfd)
            except FileNotFoundError:
                pass
    finally:
        os.close(dfd)


def sweep() -> None:
    """Remove what nobody will read: statuses of daemons long gone (unmounted by plain
    `umount`, so no `atomicfs umount` collected them) and all but the newest failed logs."""
    dfd = _open_checked(runtime_dir())
    try:
        now = time.time()
        logs: list[tuple[float, str]] = []
        for name in os.listdir(dfd):
            pid_text, _, kind = name.partition(".")
            if not pid_text.isdigit() or pid_alive(int(pid_text)):
                continue
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if kind == "status" and now - st.st_mtime > STALE_STATUS:
                _unlink_quietly(name, dfd)
            elif kind.startswith("log"):
                logs.append((st.st_mtime, name))
        for _, name in sorted(logs, reverse=True)[KEEP_FAILED_LOGS:]:
            _unlink_quietly(name, dfd)
    finally:
        os.close(dfd)


def _unlink_quietly(name: str, dfd: int) -> None:
    try:
        os.unlink(name, dir_fd=dfd)
    except OSError:
        pass


def wait_exit(pid: int, timeout: float) -> bool:
    """Wait until the process exits (a zombie counts as gone); False after `timeout`
    seconds. A pidfd wakes the caller at the exit; without one (another user's process
    where /proc hides it, an old kernel) it is polled."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError:
        deadline = time.monotonic() + timeout
        while pid_alive(pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether a process runs with this pid; a zombie (a test's own child) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False
