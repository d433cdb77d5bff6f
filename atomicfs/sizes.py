"""Parsing of sizes as users type them: 4096, 16k, 16K, 1M, 1G."""
from __future__ import annotations

import re

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgtKMGT]?)(?:i?[bB])?\s*$")


def parse_size(text: str) -> int:
    """Return the size in bytes; raise ValueError with a readable message otherwise."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"invalid size {text!r} (expected e.g. 4096, 16k, 1M, 1G)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def format_size(n: int) -> str:
    for suffix, unit in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    return f"{n} bytes"


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
