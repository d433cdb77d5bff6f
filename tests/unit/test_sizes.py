"""The one size grammar: coreutils' reading of suffixes, for options, arguments and xattrs."""
from __future__ import annotations

import pytest

from atomicfs.sizes import parse_size


@pytest.mark.parametrize("text,expected", [
    ("4096", 4096), ("16k", 16 << 10), ("16K", 16 << 10), ("16KiB", 16 << 10),
    ("1M", 1 << 20), ("1m", 1 << 20), ("1G", 1 << 30), ("20GiB", 20 << 30),
    ("20G", 20 << 30), ("20GB", 20 * 10**9), ("16kB", 16000), ("16KB", 16000),
    ("2T", 2 << 40), ("1P", 1 << 50), ("1E", 1 << 60), (" 8k ", 8192), ("0", 0),
])
def test_sizes_as_coreutils_reads_them(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "k", "16kb", "16kib", "20gb", "1.5G", "-1", "16 k",
                                  "16X", "0x10", "16KiBB", "lots"])
def test_sizes_coreutils_refuses_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)
