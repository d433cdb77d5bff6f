"""Mount options: parsing and validation, with one-line messages for mistakes."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from atomicfs import format as fmt
from atomicfs.device import InjectSpec, parse_inject
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
    testing: bool = False  # the test knobs' controls are allowed (to root)
    knobs: list[str] = field(default_factory=list)  # the test knobs given, in order

    def describe(self) -> dict[str, object]:
        return {
            "atomic_unit": self.atomic_unit, "atomic_strict": self.atomic_strict,
            "writethrough": self.writethrough, "cache_size": self.cache_size,
            "dirty_expire": self.dirty_expire, "atomic_path": self.atomic_path,
            "allow_other": self.allow_other, "debug": self.debug, "ro": self.ro,
            "inject": str(self.inject) if self.inject_enabled else None,
            "delay_ms": self.delay_ms, "record": self.record,
            "unsafe_atomic": self.unsafe_atomic, "testing": self.testing,
        }


FLAGS = {"atomic_strict", "writethrough", "allow_other", "debug", "unsafe_atomic", "testing",
         "ro"}
VALUED = {"atomic_unit", "cache_size", "dirty_expire", "atomic_path", "inject", "delay",
          "record", "commit_interval", "folio_size"}
IGNORED = {"rw", "defaults", "nodev", "nosuid", "noatime", "relatime", "dev", "suid", "exec",
           "noexec", "auto", "noauto", "user", "nouser", "_netdev"}


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
            if name in IGNORED:
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
    elif name == "folio_size":
        opts.folio_size = parse_size(value)
        if not is_power_of_two(opts.folio_size) or not \
                fmt.MIN_BLOCK_SIZE <= opts.folio_size <= fmt.MAX_ATOMIC_UNIT:
            raise ValueError("folio_size must be a power of two from 4K to 1M")
