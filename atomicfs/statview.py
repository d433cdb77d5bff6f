"""What `atomicfs stat` prints: the text view, its live form (`--watch SECONDS`) and the
Prometheus text exposition format (`--prometheus`, for node_exporter's textfile
collector)."""
from __future__ import annotations

import json
import sys
import time
from typing import Any, Callable, TextIO

from atomicfs.sizes import format_size
from atomicfs.stats import NBUCKETS, delta


CLEAR = "\033[H\033[J"  # cursor home, clear to the end of the screen


# ------------------------------------------------------------------------------ text

def text_view(path: str, data: dict[str, Any], before: dict[str, Any] | None = None,
              seconds: float = 0.0) -> str:
    """The stat of a mountpoint or a file as text; with an earlier stat of the same
    mountpoint, counters also show their rate over the seconds between the two."""
    if "cache" not in data:
        return _file_view(path, data)
    c, d, k = data["cache"], data["device"], data["counters"]
    lines = [f"{path}: atomicfs on {d['path']} (pid {data['pid']})",
             f"  device: atomic path {d['atomic_path']}, atomic writes "
             f"{d['atomic_unit_min']}..{d['atomic_unit_max']} bytes",
             f"  cache: {format_size(c['bytes'])} of {format_size(c['limit'])}, dirty "
             f"{format_size(c['dirty_bytes'])}, writeback {format_size(c['writeback_bytes'])}"]
    f = data.get("folio_states")
    if f:
        lines.append(f"  folios: {f['cached']} cached, {f['dirty']} dirty, {f['writeback']} "
                     f"writeback, {f['atomic']} atomic, {f['logged']} logged; write-throughs "
                     f"in flight {f['writethrough_inflight']}, files with stable pages "
                     f"{f['stable']}")
    req = data.get("requests") or {}
    oldest = req.get("oldest")
    if oldest:
        lines.append(f"  requests: {req['in_flight']} in flight; oldest {oldest['kind']} "
                     f"{oldest['detail']} for {oldest['age_s']:.1f} s"
                     + (f", waiting for {oldest['waiting_for']}"
                        if oldest["waiting_for"] else ""))
    if before is None or seconds <= 0:
        lines.append("  counters: " + ", ".join(f"{n}={v}" for n, v in sorted(k.items()) if v))
        lines += _latency_lines(data.get("latency"))
        return "\n".join(lines)
    lines.append(f"  counters (rate over the last {seconds:.1f} s):")
    old = before.get("counters", {})
    for name, value in sorted(k.items()):
        rate = (value - old.get(name, value)) / seconds
        lines.append(f"    {name:<28} {value:>14}  {rate:>12.1f}/s")
    lines += _latency_lines(data.get("latency"), before.get("latency"), seconds)
    return "\n".join(lines)


LATENCY_SECTIONS = (("fuse", "FUSE operation"), ("device", "device request"),
                    ("jobs", "internal job"))


def _latency_lines(latency: dict[str, Any] | None, before: dict[str, Any] | None = None,
                   seconds: float = 0.0) -> list[str]:
    """p50/p99 per FUSE operation, device request kind and job: since the mount, or over
    the interval since an earlier stat (watch)."""
    if not latency:
        return []
    since = f"over the last {seconds:.1f} s" if before is not None else "since mount"
    lines = [f"  latency {since}, in microseconds:",
             f"    {'':<30} {'count':>10} {'mean':>9} {'p50':>9} {'p99':>9}"]
    for section, title in LATENCY_SECTIONS:
        rows = []
        for name, h in sorted(latency.get(section, {}).items()):
            if before is not None:
                h = delta(h, before.get(section, {}).get(name))
            if h["count"] > 0:
                rows.append(f"    {name:<30} {h['count']:>10} {h['mean_us']:>9.1f} "
                            f"{h['p50_us']:>9.1f} {h['p99_us']:>9.1f}")
        if rows:
            lines.append(f"   {title}:")
            lines += rows
    return lines if len(lines) > 2 else []


def _file_view(path: str, data: dict[str, Any]) -> str:
    f = data["folios"]
    unit = data["atomic_unit"]
    head = (f"{path}: " + (f"atomic unit {unit} ({data['atomic_path']} path"
                           + (", strict" if data["atomic_strict"] else "") + ")"
                           if unit else "not atomic")
            + (", write-through" + (" (RFC, no cache flush)"
                                    if data.get("writethrough_mode") == "rfc" else "")
               if data["writethrough"] else ""))
    return (head + f"\n  folios: {f['cached']} cached, {f['dirty']} dirty, {f['writeback']} "
            f"writeback, {f['atomic']} atomic; write-throughs in flight "
            f"{f['writethrough_inflight']}" + (", stable" if f["stable"] else ""))


# ----------------------------------------------------------------------------- watch

def watch(path: str, seconds: float, read: Callable[[str], dict[str, Any]],
          as_json: bool = False, out: TextIO = sys.stdout,
          clock: Callable[[], float] = time.monotonic) -> int:
    """Refresh every `seconds` until Ctrl-C (exit 0). On a terminal each view replaces
    the last; otherwise views follow each other (JSON: one object a line)."""
    tty = out.isatty()
    before: dict[str, Any] | None = None
    t_before = 0.0
    try:
        while True:
            data = read(path)
            now = clock()
            if as_json:
                out.write(json.dumps({"time": time.time(), **data}, sort_keys=True) + "\n")
            else:
                view = text_view(path, data, before, now - t_before if before else 0.0)
                stamp = time.strftime("%H:%M:%S")
                out.write((CLEAR if tty else "") + f"{stamp}  every {seconds:g} s, Ctrl-C "
                          f"ends\n{view}\n" + ("" if tty else "\n"))
            out.flush()
            before, t_before = data, now
            time.sleep(max(0.0, seconds - (clock() - now)))
    except KeyboardInterrupt:
        return 0


# ------------------------------------------------------------------------ prometheus

_GAUGES: list[tuple[str, str, str, str]] = [
    # (metric, section, key, help)
    ("cache_bytes", "cache", "bytes", "Bytes held by the page cache."),
    ("cache_limit_bytes", "cache", "limit", "The page cache's limit (cache_size)."),
    ("cache_dirty_bytes", "cache", "dirty_bytes", "Dirty bytes in the page cache."),
    ("cache_writeback_bytes", "cache", "writeback_bytes", "Bytes under writeback."),
    ("cache_logged_bytes", "cache", "logged_bytes",
     "Bytes of atomic units in the log and not yet written home."),
    ("cache_mappings", "cache", "mappings", "Files with folios in the cache."),
    ("device_size_bytes", "device", "size", "Size of the backing device or image."),
    ("device_atomic_unit_min_bytes", "device", "atomic_unit_min",
     "Smallest hardware atomic write of the device (0: none)."),
    ("device_atomic_unit_max_bytes", "device", "atomic_unit_max",
     "Largest hardware atomic write of the device (0: none)."),
    ("log_size_bytes", "log", "size", "Size of the log."),
    ("log_used_bytes", "log", "used", "Bytes of the log in use."),
    ("space_free_blocks", "space", "free_blocks", "Free data blocks."),
    ("space_available_blocks", "space", "available_blocks",
     "Data blocks available to new writes."),
    ("space_data_blocks", "space", "data_blocks", "Data blocks in all."),
    ("space_block_size_bytes", "space", "block_size", "The block size."),
    ("inodes", "space", "inodes", "Inodes in use."),
    ("requests_in_flight", "requests", "in_flight",
     "FUSE requests and checkpoints in flight."),
]
_FOLIO_STATES = ("cached", "dirty", "writeback", "atomic", "logged")
_DEVICE_COUNTERS = [("device_flushes_total", "flushes", "Cache flushes sent to the device."),
                    ("device_write_ios_total", "write_ios", "Writes sent to the device."),
                    ("device_written_bytes_total", "write_bytes",
                     "Bytes written to the device.")]
_COUNTER_HELP = {
    "atomic_writebacks_hardware": "Atomic folios written back with RWF_ATOMIC.",
    "atomic_writebacks_software": "Atomic folios written back through the log.",
    "atomic_cleared_partial": "Atomic folios that lost the tag to a partial write.",
    "atomic_strict_rejected": "Unaligned writes refused by atomic_strict.",
    "writethrough_writes": "Write-through writes.",
    "stable_waits": "Writes that waited for a folio under writeback (stable pages).",
    "writeback_errors": "Device errors during writeback.",
}


# Prometheus histograms: every other power of two from 1 us to 69 s (2**10..2**36 ns), so
# that each series has a fixed, modest set of `le` buckets.
_LE_BITS = tuple(range(10, 37, 2))
_HISTOGRAMS = [
    # (metric, latency section, label name, help)
    ("fuse_request_duration_seconds", "fuse", "op",
     "Time the daemon spent on a FUSE request, by operation."),
    ("device_request_duration_seconds", "device", "kind",
     "Time from submitting a device request to reaping its completion, by request kind "
     "(completion_wakeup: from the reap to the waiting task running again)."),
    ("job_duration_seconds", "jobs", "job", "Duration of an internal job (checkpoint)."),
]


def _cumulative(buckets: dict[str, int]) -> list[tuple[str, int]]:
    """(le, cumulative count) for the fixed bucket set, then +Inf."""
    counts = [0] * NBUCKETS
    for upper, n in buckets.items():
        counts[int(upper).bit_length() - 1] += n
    out: list[tuple[str, int]] = []
    seen = 0
    bit = 0
    for le in _LE_BITS:
        while bit <= le:
            seen += counts[bit]
            bit += 1
        out.append((repr((1 << le) / 1e9), seen))
    return out + [("+Inf", sum(counts))]


def _label(value: str) -> str:
    """A label value escaped as the exposition format requires."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus(mountpoint: str, data: dict[str, Any]) -> str:
    """The mount's stat in the Prometheus text format (version 0.0.4): each family's HELP
    and TYPE, then its samples, labelled with the mountpoint."""
    mp = f'mountpoint="{_label(mountpoint)}"'
    out: list[str] = []

    def family(name: str, kind: str, help_text: str,
               samples: list[tuple[str, float | int]]) -> None:
        full = f"atomicfs_{name}"
        out.append(f"# HELP {full} {help_text}")
        out.append(f"# TYPE {full} {kind}")
        for labels, value in samples:
            out.append(f"{full}{{{mp}{labels}}} {value}")

    d = data["device"]
    family("info", "gauge", "Constant 1; the labels describe the mount.",
           [(f',device="{_label(str(d["path"]))}",atomic_path="{_label(str(d["atomic_path"]))}"'
             f',pid="{data["pid"]}"', 1)])
    for name, section, key, help_text in _GAUGES:
        if key in data.get(section, {}):
            family(name, "gauge", help_text, [("", int(data[section][key]))])
    states = data.get("folio_states")
    if states:
        family("folios", "gauge", "Folios in the cache by state (one folio may be in several).",
               [(f',state="{s}"', states[s]) for s in _FOLIO_STATES if s in states])
        family("writethrough_inflight", "gauge", "Write-through writes in flight.",
               [("", states.get("writethrough_inflight", 0))])
        family("stable_files", "gauge", "Files whose pages are stable (write-throughs in "
               "flight).", [("", states.get("stable", 0))])
    oldest = (data.get("requests") or {}).get("oldest")
    family("oldest_request_age_seconds", "gauge",
           "Age of the oldest request or checkpoint in flight (0: none); the watchdog logs "
           "one older than 30 s with what it waits for.",
           [("", float(oldest["age_s"]) if oldest else 0.0)])
    for name, key, help_text in _DEVICE_COUNTERS:
        if key in d:
            family(name, "counter", help_text, [("", int(d[key]))])
    for key, value in sorted(data["counters"].items()):
        family(f"{key}_total", "counter",
               _COUNTER_HELP.get(key, f"The {key.replace('_', ' ')} counter."),
               [("", int(value))])
    latency = data.get("latency") or {}
    for name, section, label, help_text in _HISTOGRAMS:
        series = latency.get(section) or {}
        if not series:
            continue
        full = f"atomicfs_{name}"
        out.append(f"# HELP {full} {help_text}")
        out.append(f"# TYPE {full} histogram")
        for key, h in sorted(series.items()):
            lab = f'{mp},{label}="{_label(key)}"'
            for le, n in _cumulative(h.get("buckets_ns", {})):
                out.append(f'{full}_bucket{{{lab},le="{le}"}} {n}')
            out.append(f"{full}_sum{{{lab}}} {h['sum_us'] / 1e6:.12g}")
            out.append(f"{full}_count{{{lab}}} {h['count']}")
    return "\n".join(out) + "\n"

