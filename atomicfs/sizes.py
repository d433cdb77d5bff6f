"""Sizes as users type them, read the way coreutils reads them (truncate -s, dd, df -B).

A number of bytes with an optional suffix: K, M, G, T, P, E (either case) are powers of
1024, also when followed by iB (KiB, MiB, GiB); followed by B (KB, MB, GB, kB) they are
powers of 1000. So 16k = 16K = 16KiB = 16384, 20G = 20GiB, 20GB = 20 * 10**9. One parser
for every option, argument and extended attribute.
"""
from __future__ import annotations

import re

_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}
_SIZE_RE = re.compile(r"\s*(\d+)(?:([kmgtpeKMGTPE])(iB|B)?)?\s*")
EXAMPLES = "4096, 16k, 1M, 20GiB, 20GB"


def parse_size(text: str) -> int:
    """Return the size in bytes; raise ValueError with a readable message otherwise."""
    m = _SIZE_RE.fullmatch(text)
    if not m:
        raise ValueError(f"invalid size {text!r} (expected e.g. {EXAMPLES})")
    number, letter, tail = m.groups()
    if letter is None:
        return int(number)
    base = 1000 if tail == "B" else 1024
    return int(number) * base ** _POWERS[letter.lower()]


def format_size(n: int) -> str:
    for suffix, unit in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    return f"{n} bytes"


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
