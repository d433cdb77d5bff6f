"""Mount options: parsing and validation, with one-line messages for mistakes."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from atomicfs import format as fmt
from atomicfs.device import InjectSpec, parse_inject
from atomicfs.fuseloop import DEFAULT_POLL_US, MAX_POLL_US
from atomicfs.sizes import is_power_of_two, parse_size

MIN_CACHE = 4 << 20
DEFAULT_FOLIO = 64 << 10
MAX_DELAY_MS = 60_000.0  # a slow device, not a hung one
# Test knobs: they can fail or slow the device and write files where they are told, so only
# root may use them, and their controls work only on mounts started with one of them or
# with `testing`.
TEST_KNOBS = ("delay", "inject", "record", "unsafe_atomic", "testing")


@dataclass
class MountOptions:
    atomic_unit: int = 0  # default unit for new files whose directory sets none
    atomic_strict: bool = False
    writethrough: bool = False
    cache_size: int = 256 << 20
    dirty_expire: float = 30.0
    atomic_path: str = "auto"
    allow_other: bool = False
    debug: bool = False
    ro: bool = False  # read-only: nothing is written to the device (salvage)
    # device-layer and test options
    inject: InjectSpec = field(default_factory=InjectSpec)
    inject_enabled: bool = False
    delay_ms: float = 0.0
    record: str | None = None
    unsafe_atomic: bool = False
    commit_interval: float = 5.0
    folio_size: int = DEFAULT_FOLIO
    request_poll_us: int = DEFAULT_POLL_US  # the request loop's poll before it sleeps
    testing: bool = False  # the test knobs' controls are allowed (to root)
    knobs: list[str] = field(default_factory=list)  # the test knobs given, in order
    # access times: relatime (the default) or noatime; nodiratime for
    # directories; the daemon keeps atime itself (FUSE leaves it to the filesystem)
    atime: str = "relatime"
    nodiratime: bool = False
    # VFS flags handed to the kernel's mount of /dev/fuse (nosuid, nodev, noexec, ...)
    kernel_flags: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, object]:
        return {
            "atomic_unit": self.atomic_unit, "atomic_strict": self.atomic_strict,
            "writethrough": self.writethrough, "cache_size": self.cache_size,
            "dirty_expire": self.dirty_expire, "atomic_path": self.atomic_path,
            "allow_other": self.allow_other, "debug": self.debug, "ro": self.ro,
            "inject": str(self.inject) if self.inject_enabled else None,
            "delay_ms": self.delay_ms, "record": self.record,
            "unsafe_atomic": self.unsafe_atomic, "testing": self.testing,
            "atime": self.atime, "nodiratime": self.nodiratime,
            "kernel_flags": self.kernel_flags, "request_poll_us": self.request_poll_us,
        }


FLAGS = {"atomic_strict", "writethrough", "allow_other", "debug", "unsafe_atomic", "testing",
         "ro"}
VALUED = {"atomic_unit", "cache_size", "dirty_expire", "atomic_path", "inject", "delay",
          "record", "commit_interval", "folio_size", "request_poll_us"}
# Options for mount(8), fstab and systemd, not for the filesystem: dropped. (mount(8) itself
# keeps x-* and comment= from helpers; they are dropped here too for a direct command line.)
IGNORED = {"rw", "defaults", "async", "auto", "noauto", "user", "users", "nouser", "owner",
           "group", "_netdev", "nofail"}
IGNORED_PREFIXES = ("x-", "comment=")
# Honoured by the kernel: passed on to the mount of /dev/fuse.
KERNEL_FLAGS = {"nosuid", "suid", "nodev", "dev", "noexec", "exec"}
# Access-time policy, honoured by the daemon (see _touch_atime in fs.py).
ATIME = {"relatime": "relatime", "atime": "relatime", "noatime": "noatime"}
# Refused: reads served from the kernel's page cache never reach the daemon, so it cannot
# update atime on every read.
STRICTATIME = {"strictatime", "norelatime"}
DIRATIME = {"nodiratime": True, "diratime": False}
# lazytime: atime changes already stay in memory until the next metadata commit.
LAZYTIME = {"lazytime", "nolazytime"}


@dataclass(frozen=True)
class OptionDoc:
    """One -o option as --help and the man pages show it."""
    name: str
    value: str  # metavariable, "" for a flag
    default: str
    meaning: str


OPTION_DOCS: tuple[OptionDoc, ...] = (
    OptionDoc("atomic_unit", "SIZE", "0 (off)", "atomic unit of new files whose directory "
              "sets none: a power of two from the block size to 1M"),
    OptionDoc("atomic_strict", "", "off", "writes to atomic files that do not start and end "
              "on unit boundaries fail with EINVAL"),
    OptionDoc("writethrough", "", "off", "every write is written through (O_DSYNC "
              "semantics, stable pages)"),
    OptionDoc("cache_size", "SIZE", "256M", "page cache limit of the daemon (at least 4M, "
              "at most the machine's memory)"),
    OptionDoc("dirty_expire", "SECONDS", "30", "age at which dirty data is written back"),
    OptionDoc("atomic_path", "auto|hardware|software", "auto", "how atomic folios reach "
              "the device: RWF_ATOMIC in place (hardware), the checksummed log (software), "
              "or hardware where the device allows it (auto)"),
    OptionDoc("allow_other", "", "off", "let other users access the mount (needs "
              "user_allow_other in /etc/fuse.conf when not root)"),
    OptionDoc("debug", "", "off", "log every request (daemon log)"),
    OptionDoc("relatime", "", "on", "update atime on read only when it is older than "
              "mtime/ctime or a day old (atime: the same)"),
    OptionDoc("noatime", "", "off", "never update atime on read"),
    OptionDoc("strictatime", "", "", "refused (also norelatime): reads served from the "
              "kernel's page cache do not reach the filesystem, so atime cannot follow "
              "every read"),
    OptionDoc("nodiratime", "", "off", "never update the atime of directories (diratime: "
              "the default)"),
    OptionDoc("lazytime", "", "always", "accepted: atime changes are kept in memory until "
              "the next metadata commit anyway (nolazytime is refused)"),
    OptionDoc("nosuid, nodev, noexec", "", "off", "passed to the kernel (suid, dev, exec: "
              "the defaults)"),
    OptionDoc("commit_interval", "SECONDS", "5", "longest time between metadata commits"),
    OptionDoc("folio_size", "SIZE", "64K", "folio size of files without an atomic unit"),
    OptionDoc("request_poll_us", "MICROSECONDS", str(DEFAULT_POLL_US), "longest time the "
              "daemon polls for the next request before it sleeps, 0 to "
              f"{MAX_POLL_US} (0: never; the window adapts, see README)"),
    OptionDoc("inject", "SPEC", "none", "device fault injection (tests; root only)"),
    OptionDoc("delay", "MS", "0", "added latency of each device request, 0 to 60000 "
              "(tests; root only)"),
    OptionDoc("record", "FILE", "none", "record device writes for the crash explorer (its "
              "directory must exist; root only)"),
    OptionDoc("unsafe_atomic", "", "off", "switch atomic protection off (the crash "
              "explorer's control run; root only)"),
    OptionDoc("testing", "", "off", "let root change the test knobs (inject, delay, fault) "
              "through the user.atomicfs.control attribute"),
    OptionDoc("defaults, rw, async, auto, noauto, user, users, nouser, owner, group, "
              "_netdev, nofail, x-*, comment=*", "", "", "for mount(8), fstab and systemd; "
              "dropped"),
)


def check_atomic_unit(unit: int, block_size: int = fmt.MIN_BLOCK_SIZE) -> None:
    """Raise ValueError unless unit is 0 or a power of two in [block size, 1 MiB]."""
    if unit == 0:
        return
    if not is_power_of_two(unit) or unit < block_size or unit > fmt.MAX_ATOMIC_UNIT:
        raise ValueError(f"atomic unit {unit} must be 0 or a power of two from {block_size} "
                         f"to {fmt.MAX_ATOMIC_UNIT} bytes")


def parse_mount_options(groups: list[str] | None) -> MountOptions:
    """Parse the -o arguments (each a comma-separated list); ValueError on mistakes."""
    opts = MountOptions()
    for group in groups or []:
        for item in group.split(","):
            item = item.strip()
            if not item:
                continue
            name, eq, value = item.partition("=")
            if name in IGNORED or item.startswith(IGNORED_PREFIXES):
                continue
            if _vfs_option(opts, name, eq):
                continue
            if name in TEST_KNOBS:
                opts.testing = True
                opts.knobs.append(name)
            if name in FLAGS:
                if eq:
                    raise ValueError(f"mount option {name} takes no value")
                setattr(opts, name, True)
                continue
            if name not in VALUED:
                raise ValueError(f"unknown mount option {name!r}")
            if not eq or not value:
                raise ValueError(f"mount option {name} needs a value ({name}=...)")
            _set_valued(opts, name, value)
    return opts


def check_privileges(opts: MountOptions, euid: int) -> None:
    """Test knobs are for root only (ValueError otherwise)."""
    if opts.knobs and euid != 0:
        raise ValueError(f"mount option {opts.knobs[0]} is a test knob: root only")


def physical_memory() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def parse_delay(value: str) -> float:
    """A device delay in milliseconds: finite, from 0 to MAX_DELAY_MS."""
    try:
        ms = float(value)
    except ValueError:
        ms = math.nan
    if not math.isfinite(ms) or not 0 <= ms <= MAX_DELAY_MS:
        raise ValueError(f"delay must be milliseconds from 0 to {MAX_DELAY_MS:.0f}, "
                         f"not {value!r}")
    return ms


def parse_record(value: str) -> str:
    """The absolute path of a recording to write: its directory must exist (the daemon
    runs in /, so a relative path is resolved now)."""
    path = os.path.abspath(value)
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise ValueError(f"record: {parent} is not an existing directory")
    if os.path.isdir(path):
        raise ValueError(f"record: {path} is a directory")
    return path


def _vfs_option(opts: MountOptions, name: str, eq: str) -> bool:
    """Set an access-time or kernel flag option; False when name is none of those."""
    if name not in ATIME and name not in DIRATIME and name not in KERNEL_FLAGS and \
            name not in LAZYTIME and name not in STRICTATIME:
        return False
    if eq:
        raise ValueError(f"mount option {name} takes no value")
    if name in STRICTATIME:
        raise ValueError(f"{name} is not supported: reads served from the kernel's page "
                         "cache do not reach atomicfs (relatime or noatime)")
    if name in ATIME:
        opts.atime = ATIME[name]
    elif name in DIRATIME:
        opts.nodiratime = DIRATIME[name]
    elif name in KERNEL_FLAGS:
        opts.kernel_flags.append(name)
    elif name == "nolazytime":
        raise ValueError("nolazytime is not supported: atime changes are always written "
                         "with the next metadata commit (lazytime)")
    return True


def _set_valued(opts: MountOptions, name: str, value: str) -> None:
    if name == "atomic_unit":
        opts.atomic_unit = parse_size(value)
        check_atomic_unit(opts.atomic_unit)
    elif name == "cache_size":
        opts.cache_size = parse_size(value)
        if opts.cache_size < MIN_CACHE:
            raise ValueError(f"cache_size must be at least {MIN_CACHE >> 20}M")
        if opts.cache_size > physical_memory():
            raise ValueError(f"cache_size {value} is more than this machine's memory "
                             f"({physical_memory() / (1 << 30):.1f}G)")
    elif name in ("dirty_expire", "commit_interval"):
        try:
            seconds = float(value)
        except ValueError:
            raise ValueError(f"{name} must be a number of seconds, not {value!r}") from None
        if not 0 < seconds <= 86400:
            raise ValueError(f"{name} must be between 0 and 86400 seconds")
        setattr(opts, name, seconds)
    elif name == "atomic_path":
        if value not in ("auto", "hardware", "software"):
            raise ValueError(f"atomic_path must be auto, hardware or software, not {value!r}")
        opts.atomic_path = value
    elif name == "inject":
        opts.inject = parse_inject(value)
        opts.inject_enabled = True
    elif name == "delay":
        opts.delay_ms = parse_delay(value)
    elif name == "record":
        opts.record = parse_record(value)
    elif name == "request_poll_us":
        if not (value.isascii() and value.isdigit()) or int(value) > MAX_POLL_US:
            raise ValueError(f"request_poll_us must be a whole number of microseconds from 0 "
                             f"to {MAX_POLL_US}, not {value!r}")
        opts.request_poll_us = int(value)
    elif name == "folio_size":
        opts.folio_size = parse_size(value)
        if not is_power_of_two(opts.folio_size) or not \
                fmt.MIN_BLOCK_SIZE <= opts.folio_size <= fmt.MAX_ATOMIC_UNIT:
            raise ValueError("folio_size must be a power of two from 4K to 1M")
