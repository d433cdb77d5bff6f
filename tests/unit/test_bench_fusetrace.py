"""bench/fusetrace.py's parsing of the kernel's fuse tracepoints (the tracing itself runs
only in the bench, as root)."""
from __future__ import annotations

import os

from bench import fusetrace


def _send(ts: str, req: int, opcode: int, name: str) -> str:
    return (f"  postgres-1203  [001] .....  {ts}: fuse_request_send: connection 46 req {req} "
            f"opcode {opcode} ({name}) len 80")


def _end(ts: str, req: int) -> str:
    return (f"  python-1100  [000] .....  {ts}: fuse_request_end: connection 46 req {req} "
            "len 16 error 0")


TRACE = "\n".join([
    "# tracer: nop",
    _send("4000.000100", 10, 16, "FUSE_WRITE"),
    _send("4000.000150", 12, 20, "FUSE_FSYNC"),
    _end("4000.000300", 10),
    _end("4000.001150", 12),
    _end("4000.001200", 8),
    _send("4000.002000", 14, 16, "FUSE_WRITE"),
    _end("4000.002100", 14),
    _send("4000.003000", 16, 3, "FUSE_GETATTR"),
])


def test_round_trips_per_opcode() -> None:
    out = fusetrace.parse(TRACE)
    # req 8 ended without a send in the trace, req 16 was sent but not answered: left out
    assert sorted(out) == ["fsync", "write"]
    assert (out["write"].count, out["write"].sum_ns) == (2, 200_000 + 100_000)
    assert (out["fsync"].count, out["fsync"].sum_ns) == (1, 1_000_000)


def test_kernel_dev() -> None:
    assert fusetrace.kernel_dev(os.makedev(0, 46)) == 46
    assert fusetrace.kernel_dev(os.makedev(8, 1)) == (8 << 20) | 1
