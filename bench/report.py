"""From the runs to figures (median, min, max), ratios, the DESIGN.md goals, a Markdown
report, PNG plots and the README's performance table.

    python -m bench.report bench/results/DATE/results.json   # redo the .md and .png files
"""
from __future__ import annotations

import json
import logging
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from bench.targets import stub

log = logging.getLogger(__name__)

ORDER = ("atomicfs-sw", "atomicfs-hw", "nullfs", "nullfs-xattr", "nullfs-perm", "xfs", "ext4")
COLORS = {"atomicfs-sw": "#1f77b4", "atomicfs-hw": "#17becf", "nullfs": "#7f7f7f",
          "nullfs-xattr": "#c7c7c7", "nullfs-perm": "#bcbd22", "xfs": "#d62728",
          "ext4": "#ff7f0e"}  # one per target in ORDER
SUBJECTS = ("atomicfs-sw", "atomicfs-hw")
RATIO_REFS = ("nullfs", "xfs", "ext4")
UNITS = {"iops": "IOPS", "bw": "MiB/s", "ops": "ops/s"}
PCTS = ("p50", "p90", "p99", "p99.9")
README_BEGIN = "<!-- bench:results:begin (written by make bench) -->"
README_END = "<!-- bench:results:end -->"
ISSUE14_NOTE = """The ceiling is the best ratio a FUSE filesystem could reach in this run:
for one job that waits for each I/O (serial), the null filesystem's time per I/O plus the
device's own (XFS O_DIRECT on the same loop device) add up; where the daemon can overlap
the two (buffered writes), the slower bounds it; where only the transport bounds it, the
null filesystem's own rate over the reference's (1.0x where the null filesystem is the
reference). "Of the ceiling" is atomicfs's ratio over it."""

# (what DESIGN.md asks, subject's workload, reference's workload, reference, at least)
GOALS: tuple[tuple[str, str, str, str, float], ...] = (
    ("cached 16K atomic random writes >= 0.8x nullfs", "rand16k_cached", "rand16k_cached",
     "nullfs", 0.8),
    ("(same, against nullfs-xattr, which answers a getxattr per write; atomicfs no longer)",
     "rand16k_cached", "rand16k_cached", "nullfs-xattr", 0.8),
    ("durable 16K atomic writes, 1 writer >= 2x XFS RWF_ATOMIC|RWF_DSYNC O_DIRECT",
     "atomic16k_j1", "atomic16k_j1", "xfs", 2.0),
    ("durable 16K atomic writes, 4 writers >= 3x XFS RWF_ATOMIC|RWF_DSYNC O_DIRECT",
     "atomic16k_j4", "atomic16k_j4", "xfs", 3.0),
    ("1M sequential write (buffered + fsync) >= 0.5x XFS O_DIRECT", "seq1m_write",
     "seq1m_write_direct", "xfs", 0.5),
    ("1M sequential write (O_DIRECT) >= 0.5x XFS O_DIRECT", "seq1m_write_direct",
     "seq1m_write_direct", "xfs", 0.5),
    ("1M sequential read (buffered, cold) >= 0.5x XFS O_DIRECT", "seq1m_read",
     "seq1m_read_direct", "xfs", 0.5),
    ("1M sequential read (O_DIRECT) >= 0.5x XFS O_DIRECT", "seq1m_read_direct",
     "seq1m_read_direct", "xfs", 0.5),
)


# Issue 14's latency goals for the software path, each with the ceiling this machine allows a
# FUSE filesystem: (title, atomicfs-sw's workload, reference workload, reference, at least,
# ceiling). A ceiling is None when the reference is itself the transport's ceiling (a null
# FUSE filesystem), else (how, transport's workload and target, device's workload and target):
# "serial" for one job that waits for each request (per-I/O times add: transport round trip
# plus the device's own I/O), "overlap" where the daemon can overlap them (the slower of the
# two bounds it), "transport" where only the transport is known to bound it (for the
# metadata rows: nullfs-perm, the null filesystem mounted with default_permissions as atomicfs
# is, which pays the directory GETATTR the kernel then sends after each create and unlink).
# The write rows' transport is plain nullfs: with FUSE_HANDLE_KILLPRIV_V2 atomicfs no longer
# answers a security.capability getxattr per write, and nullfs never does (nullfs-xattr,
# which does, stays the issue's reference for cached writes and is no longer a ceiling).
Ceiling = tuple[str, str, str, str | None, str | None] | None
ISSUE14_GOALS: tuple[tuple[str, str, str, str, float, Ceiling], ...] = (
    ("durable 16K atomic, 1 writer ÷ XFS RWF_ATOMIC|RWF_DSYNC", "atomic16k_j1",
     "atomic16k_j1", "xfs", 2.0,
     ("serial", "atomic16k_j1", "nullfs", "dsync16k_direct_j1", "xfs")),
    ("same, 4 writers", "atomic16k_j4", "atomic16k_j4", "xfs", 3.0,
     ("transport", "atomic16k_j4", "nullfs", None, None)),
    ("cached 16K random write ÷ null FS with getxattr", "rand16k_cached", "rand16k_cached",
     "nullfs-xattr", 0.9, ("transport", "rand16k_cached", "nullfs", None, None)),
    ("create ÷ null FS", "meta_create", "meta_create", "nullfs", 0.8,
     ("transport", "meta_create", "nullfs-perm", None, None)),
    ("stat ÷ null FS", "meta_stat", "meta_stat", "nullfs", 0.8,
     ("transport", "meta_stat", "nullfs-perm", None, None)),
    ("unlink ÷ null FS", "meta_unlink", "meta_unlink", "nullfs", 0.8,
     ("transport", "meta_unlink", "nullfs-perm", None, None)),
    ("4K random read, cold ÷ XFS", "rand4k_read_cold", "rand4k_read_cold", "xfs", 0.6,
     ("serial", "rand4k_read_cold", "nullfs", "rand4k_read_cold", "xfs")),
    ("1M sequential O_DIRECT read ÷ XFS", "seq1m_read_direct", "seq1m_read_direct", "xfs",
     0.8, ("serial", "seq1m_read_direct", "nullfs", "seq1m_read_direct", "xfs")),
    ("1M sequential O_DIRECT write ÷ XFS", "seq1m_write_direct", "seq1m_write_direct", "xfs",
     0.8, ("serial", "seq1m_write_direct", "nullfs", "seq1m_write_direct", "xfs")),
    ("1M sequential buffered write + fsync ÷ XFS", "seq1m_write", "seq1m_write", "xfs", 0.8,
     ("overlap", "seq1m_write", "nullfs", "seq1m_write_direct", "xfs")),
)


# ----------------------------------------------------------------------------- figures

def _value(run: dict[str, Any], metric: str, part: str | None) -> tuple[float, dict] | None:
    if part is not None:
        p = run.get("parts", {}).get(part)
        return (p["ops"], p.get("lat_us", {})) if p else None
    v = run.get("values")
    if not v:
        return None
    x = v["bw"] / 2**20 if metric == "bw" else v["iops"]
    return x, v.get("lat_us", {})


def _spec_key(data: dict[str, Any], workload: Any, target: str) -> str | None:
    spec = workload.spec_for(stub(target))
    return spec.key if spec else None


def aggregate(data: dict[str, Any], workloads: Iterable[Any]) -> None:
    """Fill data["figures"], data["ratios"] and data["goals"] from data["runs"]."""
    targets = data["config"]["targets"]
    figures: dict[str, dict[str, Any]] = {}
    for w in workloads:
        fig: dict[str, Any] = {}
        for t in targets:
            key = _spec_key(data, w, t)
            if key is None:
                continue
            runs = [r for r in data["runs"] if r["target"] == t and r.get("spec") == key]
            vals = [(r["round"], *got) for r in runs
                    if (got := _value(r, w.metric, w.part)) is not None]
            cell: dict[str, Any] = {"spec": key, "how": runs[0]["how"] if runs else None}
            if not vals:
                bad = [r.get("unsupported") or r.get("error") for r in runs]
                cell["unsupported" if any(r.get("unsupported") for r in runs)
                     else "error"] = next((b for b in bad if b), "no runs")
                fig[t] = cell
                continue
            xs = [v[1] for v in vals]
            cell.update({"unit": UNITS[w.metric], "median": statistics.median(xs),
                         "min": min(xs), "max": max(xs), "n": len(xs),
                         "runs": {str(v[0]): v[1] for v in vals}})
            cell["lat_us"] = {p: statistics.median(v[2][p] for v in vals if p in v[2])
                              for p in PCTS + ("mean",) if any(p in v[2] for v in vals)}
            per_op = _per_op(runs, data["config"]) if w.part is None else {}
            if per_op:
                cell["daemon_per_op"] = per_op
            fig[t] = cell
        figures[w.key] = fig
    data["figures"] = figures
    data["ratios"] = {w: {f"{a}/{ref}": rt for a in SUBJECTS for ref in targets
                          if ref not in SUBJECTS and (rt := ratio(data, w, a, w, ref))}
                      for w in figures}
    data["goals"] = [{"goal": g, "subject_workload": wa, "reference_workload": wr,
                      "reference": ref, "at_least": need,
                      **{a: ratio(data, wa, a, wr, ref) for a in SUBJECTS}}
                     for g, wa, wr, ref, need in GOALS]
    data["issue14_goals"] = [issue14_goal(data, *g) for g in ISSUE14_GOALS]


def _median(data: dict[str, Any], workload: str | None, target: str | None) -> float | None:
    cell = data["figures"].get(workload or "", {}).get(target or "")
    return cell.get("median") if cell and cell.get("median") else None


def issue14_goal(data: dict[str, Any], title: str, wa: str, wr: str, ref: str, need: float,
                 ceiling: Ceiling) -> dict[str, Any]:
    """One row of issue 14's goals: atomicfs-sw's ratio, and the ratio the transport and the
    device allow at best here (its ceiling), both from this run's medians."""
    row: dict[str, Any] = {"goal": title, "at_least": need, "reference": ref,
                           "ratio": ratio(data, wa, "atomicfs-sw", wr, ref)}
    refv = _median(data, wr, ref)
    if ceiling is None:
        row.update(ceiling=1.0, ceiling_how=f"{ref} is the transport's ceiling")
    elif refv:
        how, tw, tt, dw, dt = ceiling
        trans, dev = _median(data, tw, tt), _median(data, dw, dt)
        best = None
        if how == "serial" and trans and dev:
            best = 1 / (1 / trans + 1 / dev)  # one I/O at a time: the times add
        elif how == "overlap" and trans and dev:
            best = min(trans, dev)
        elif how == "transport" and trans:
            best = trans
        if best is not None:
            parts = f"{tt} {tw}" + (f" and {dt} {dw}" if dw and how != "transport" else "")
            row.update(ceiling=best / refv, ceiling_how=f"{how}: {parts}")
    r = row["ratio"]
    if r and row.get("ceiling"):
        row["share_of_ceiling"] = r["ratio"] / row["ceiling"]
    return row


def ratio(data: dict[str, Any], wa: str, a: str, wr: str, ref: str) -> dict[str, Any] | None:
    """Median of a over median of ref, with the range of the per-round ratios."""
    fa = data["figures"].get(wa, {}).get(a)
    fr = data["figures"].get(wr, {}).get(ref)
    if not fa or not fr or "median" not in fa or "median" not in fr or not fr["median"]:
        return None
    per_round = [fa["runs"][k] / fr["runs"][k] for k in fa["runs"]
                 if k in fr["runs"] and fr["runs"][k]]
    out = {"ratio": fa["median"] / fr["median"]}
    if per_round:
        out.update({"round_min": min(per_round), "round_max": max(per_round)})
    return out


def _per_op(runs: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, float]:
    """Per application I/O: the daemon's CPU time and, on atomicfs, device writes, flushes
    and log batches (medians over the rounds; ops include the ramp's)."""
    rows: dict[str, list[float]] = {}
    for r in runs:
        d = r.get("extra", {}).get("daemon")
        v = r.get("values")
        if not d or not v or not v.get("iops"):
            continue
        ops = v.get("ops_est") or v.get("ios")
        if not ops:
            continue
        for k, name, scale in (("cpu_s", "cpu_us", 1e6), ("cpu_main_s", "cpu_main_us", 1e6),
                               ("device_write_ios", "dev_writes", 1),
                               ("device_flushes", "dev_flushes", 1),
                               ("log_batches", "log_batches", 1)):
            if k in d:
                rows.setdefault(name, []).append(d.get(k, 0) * scale / ops)
    return {k: statistics.median(v) for k, v in rows.items() if v}


# ---------------------------------------------------------------------------- Markdown

def _num(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _cell(c: dict[str, Any] | None) -> str:
    if not c:
        return ""
    if "median" not in c:
        return "n/a" if "unsupported" in c else "failed"
    return f"{_num(c['median'])} ({_num(c['min'])}–{_num(c['max'])})"


def _ratio_cell(r: dict[str, Any] | None) -> str:
    if not r:
        return ""
    return f"{r['ratio']:.2f}"


def _present(data: dict[str, Any], names: Sequence[str]) -> list[str]:
    return [t for t in names if t in data["config"]["targets"]]


def goals_table(data: dict[str, Any]) -> str:
    subj = _present(data, SUBJECTS)
    lines = ["| DESIGN.md goal | " + " | ".join(subj) + " |",
             "|---|" + "---|" * len(subj)]
    for g in data["goals"]:
        cells = []
        for a in subj:
            r = g.get(a)
            if not r:
                cells.append("")
                continue
            mark = "met" if r["ratio"] >= g["at_least"] else "**not met**"
            rng = (f" (rounds {r['round_min']:.2f}–{r['round_max']:.2f})"
                   if "round_min" in r else "")
            cells.append(f"{r['ratio']:.2f}x{rng} {mark}")
        lines.append(f"| {g['goal']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def issue14_table(data: dict[str, Any]) -> str:
    """Issue 14's goals for atomicfs-sw, each with the best ratio this transport and device
    allow (see ISSUE14_GOALS) and how much of it atomicfs reaches."""
    rows = [g for g in data.get("issue14_goals", []) if g.get("ratio")]
    if not rows:
        return ""
    lines = ["| issue 14 goal (atomicfs-sw) | now | goal | ceiling here | of the ceiling "
             "| ceiling from |", "|---|---:|---:|---:|---:|---|"]
    for g in rows:
        r = g["ratio"]
        mark = "met" if r["ratio"] >= g["at_least"] else "**not met**"
        ceil = g.get("ceiling")
        beyond = " (goal above it)" if ceil is not None and ceil < g["at_least"] else ""
        lines.append(f"| {g['goal']} | {r['ratio']:.2f}x {mark} | {g['at_least']:g}x | "
                     + (f"{ceil:.2f}x{beyond}" if ceil is not None else "") + " | "
                     + (f"{g['share_of_ceiling']:.0%}" if "share_of_ceiling" in g else "")
                     + f" | {g.get('ceiling_how', '')} |")
    return "\n".join(lines)


def ratio_table(data: dict[str, Any]) -> str:
    subj = _present(data, SUBJECTS)
    refs = _present(data, RATIO_REFS)
    cols = [(a, r) for a in subj for r in refs]
    lines = ["| workload | " + " | ".join(f"{a.split('-')[1]} ÷ {r}" for a, r in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for key, rat in data["ratios"].items():
        title = data["workloads"][key]["title"]
        lines.append(f"| {title} | " + " | ".join(_ratio_cell(rat.get(f"{a}/{r}"))
                                                  for a, r in cols) + " |")
    return "\n".join(lines)


def figures_table(data: dict[str, Any]) -> str:
    tgts = _present(data, ORDER)
    lines = ["| workload | unit | " + " | ".join(tgts) + " |",
             "|---|---|" + "---:|" * len(tgts)]
    for key, fig in data["figures"].items():
        w = data["workloads"][key]
        lines.append(f"| {w['title']} | {UNITS[w['metric']]} | "
                     + " | ".join(_cell(fig.get(t)) for t in tgts) + " |")
    return "\n".join(lines)


def latency_table(data: dict[str, Any]) -> str:
    tgts = _present(data, ORDER)
    lines = ["| workload | " + " | ".join(tgts) + " |", "|---|" + "---:|" * len(tgts)]
    for key, fig in data["figures"].items():
        cells = []
        for t in tgts:
            lat = (fig.get(t) or {}).get("lat_us", {})
            cells.append(" / ".join(_num(lat[p]) for p in ("p50", "p99") if p in lat))
        lines.append(f"| {data['workloads'][key]['title']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def daemon_table(data: dict[str, Any]) -> str:
    subj = _present(data, SUBJECTS + ("nullfs", "nullfs-xattr"))
    lines = ["| workload | " + " | ".join(subj) + " |", "|---|" + "---|" * len(subj)]
    for key, fig in data["figures"].items():
        if data["workloads"][key]["metric"] == "ops":
            continue
        cells = []
        for t in subj:
            p = (fig.get(t) or {}).get("daemon_per_op")
            if not p:
                cells.append("")
                continue
            s = f"{p['cpu_us']:,.0f} µs" if "cpu_us" in p else ""
            if "cpu_main_us" in p:
                s += f" ({p['cpu_main_us']:,.0f} loop)"
            if "dev_writes" in p:
                s += f", {p['dev_writes']:.2f} w, {p['dev_flushes']:.2f} f"
            cells.append(s)
        lines.append(f"| {data['workloads'][key]['title']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def how_list(data: dict[str, Any]) -> str:
    lines = []
    for w in data["workloads"].values():
        hows: dict[str, list[str]] = {}
        for t, h in w["how"].items():
            if h:
                hows.setdefault(h, []).append(t)
        text = "; ".join(f"{', '.join(ts)}: {h}" for h, ts in hows.items())
        lines.append(f"- **{w['title']}** — {text}")
    return "\n".join(lines)


def machine_line(data: dict[str, Any]) -> str:
    m = data["machine"]
    d = m.get("device", {})
    return (f"Linux {m['kernel']}, {m['cpu']}, {m['cores']} cores, "
            f"{m['memory_bytes'] / 2**30:.0f} GiB; backing: {d.get('backing_size', 0) >> 30} "
            f"GiB file on {d.get('backing_host_fstype')} ({d.get('backing_host_device')}), "
            f"loop device with direct I/O; {m['fio']}; load average at start "
            f"{m['loadavg_start'][0]:.1f}, at end {m.get('loadavg_end', [0])[0]:.1f}"
            + idle_text(m.get("cpuidle", {})))


def idle_text(idle: dict[str, Any]) -> str:
    """The machine line's part on idle CPUs (see sysutil.cpuidle_info)."""
    if not idle.get("driver"):
        return ""
    text = f"; cpuidle {idle['driver']}"
    if "guest_halt_poll_ns" in idle:
        ns = idle["guest_halt_poll_ns"]
        text += (f" (guest halt polling {ns / 1000:g} µs)" if ns else
                 " (no guest halt polling: an idle vCPU halts at once)")
    return text


def markdown(data: dict[str, Any]) -> str:
    c = data["config"]
    head = f"""# atomicfs benchmark: {data['date']}

Command: `{data['command']}` ({c['rounds']} rounds, {c['runtime_s']:g} s measured per
time-based run after {c['ramp_s']:g} s of ramp; {data.get('elapsed_s', 0) / 60:.1f} minutes in
all). Machine: {machine_line(data)}. Commit: {data['machine']['atomicfs_git']}.
"""
    if not c["workloads"]:  # the pgbench row alone (--workloads pgbench)
        return head + "\n" + pgbench_section(data)
    return head + f"""
Every figure is the median of the rounds (min–max in brackets); every ratio is atomicfs's
median over the reference's median, all measured in this one run on the same loop device.

## DESIGN.md goals

{goals_table(data)}

## Issue 14's goals and what this machine allows

{ISSUE14_NOTE}

{issue14_table(data)}

## Ratios (atomicfs ÷ reference; above 1 means atomicfs is faster)

{ratio_table(data)}

## Figures

{figures_table(data)}

## Latency (µs, p50 / p99, medians over the rounds)

{latency_table(data)}

## Daemon cost per application I/O

CPU time of the FUSE daemon per I/O the application made: all its threads, and in brackets
its main thread (the trio loop that serves every request); on atomicfs also device writes (w)
and flushes (f) per I/O. Medians over the rounds. CPU time is counted in clock ticks (10 ms),
and on a shared machine it is a steadier measure than throughput.

{daemon_table(data)}

{pgbench_section(data)}## How each workload ran

{how_list(data)}

Targets:
""" + "\n".join(f"- **{t}**: {v['description']}" for t, v in data["targets"].items()) + "\n"


def pgbench_section(data: dict[str, Any], readme: bool = False) -> str:
    """The pgbench row (bench/pgbench.py), when it ran: its tables, then a blank line."""
    pg = data.get("pgbench")
    if not pg:
        return ""
    from bench import pgbench
    text = pgbench.markdown(pg)
    if readme:  # the TPS and ratio tables; the breakdown stays in results.md
        text = text.split("\n\nWhere a transaction", 1)[0]
        return f"\nPostgreSQL, pgbench ({pg.get('elapsed_s', 0) / 60:.1f} minutes):\n\n{text}\n"
    return f"## PostgreSQL (pgbench)\n\n{text}\n\n"


# ------------------------------------------------------------------------------- plots

def plots(data: dict[str, Any], out: Path) -> None:
    """iops.png (throughput per workload, min–max bars) and latency.png (percentiles)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tgts = _present(data, ORDER)
    keys = list(data["figures"])
    if not keys:
        return  # only pgbench ran: its table is the report
    ncols = 3
    nrows = (len(keys) + ncols - 1) // ncols
    title = f"atomicfs side by side, {data['date'][:10]} ({data['machine']['kernel']})"

    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 2.9 * nrows),
                             squeeze=False)
    for ax, key in zip(axes.flat, keys):
        w = data["workloads"][key]
        f = data["figures"][key]
        xs, hs, lo, hi, cs = [], [], [], [], []
        for i, t in enumerate(tgts):
            c = f.get(t)
            if c and "median" in c:
                xs.append(i)
                hs.append(c["median"])
                lo.append(c["median"] - c["min"])
                hi.append(c["max"] - c["median"])
                cs.append(COLORS[t])
            elif c:  # refused (ext4 and RWF_ATOMIC) or failed
                ax.text(i, 0.02, "n/a", ha="center", va="bottom", fontsize=7,
                        transform=ax.get_xaxis_transform())
        ax.bar(xs, hs, color=cs, yerr=[lo, hi], capsize=2)
        for x, h in zip(xs, hs):
            ax.text(x, h, _num(h), ha="center", va="bottom", fontsize=6)
        ax.set_yscale("log")  # the targets differ by orders of magnitude
        ax.set_title(w["title"], fontsize=9)
        ax.set_ylabel(UNITS[w["metric"]], fontsize=8)
        ax.set_xticks(range(len(tgts)))
        ax.set_xticklabels(tgts, rotation=30, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title + ": throughput, log scale (median, bars min–max)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(out / "iops.png", dpi=90)
    plt.close(fig)

    goals_plot(data, out, plt)

    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 2.9 * nrows),
                             squeeze=False)
    width = 0.8 / len(PCTS)
    shades = (1.0, 0.75, 0.5, 0.3)
    for ax, key in zip(axes.flat, keys):
        f = data["figures"][key]
        for i, t in enumerate(tgts):
            lat = (f.get(t) or {}).get("lat_us", {})
            for j, p in enumerate(PCTS):
                if p in lat:
                    ax.bar(i - 0.4 + (j + 0.5) * width, lat[p], width, color=COLORS[t],
                           alpha=shades[j], edgecolor="black", linewidth=0.3)
        ax.set_yscale("log")
        ax.set_title(data["workloads"][key]["title"], fontsize=9)
        ax.set_ylabel("µs", fontsize=8)
        ax.set_xticks(range(len(tgts)))
        ax.set_xticklabels(tgts, rotation=30, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title + ": latency p50, p90, p99, p99.9 (darker = lower percentile)",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(out / "latency.png", dpi=90)
    plt.close(fig)


def _goal_of(text: Any) -> float | None:
    """A pgbench ratio's goal (">= 0.8") as a number; None for none."""
    m = re.search(r"[0-9.]+", str(text or ""))
    return float(m.group()) if m else None


def goal_rows(data: dict[str, Any]) -> list[tuple[str, float, float, float | None]]:
    """What goals.png shows: (label, atomicfs's ratio, goal, ceiling or None) for issue 14's
    goals and the pgbench ratios that have one."""
    rows = [(g["goal"], g["ratio"]["ratio"], g["at_least"], g.get("ceiling"))
            for g in data.get("issue14_goals", []) if g.get("ratio")]
    for r in (data.get("pgbench") or {}).get("ratios", []):
        goal = _goal_of(r.get("goal"))
        if r.get("ratio") and goal:
            rows.append((f"pgbench {r['subject']} ÷ {r['reference']}", r["ratio"], goal, None))
    return rows


def goals_plot(data: dict[str, Any], out: Path, plt: Any) -> None:
    """goals.png: issue 14's goals, atomicfs-sw's ratio as a bar, the goal and the ceiling
    this run allows as marks (see issue14_table)."""
    rows = goal_rows(data)
    if not rows:
        return
    labels = [r[0] for r in rows]
    ratios = [r[1] for r in rows]
    goals = [r[2] for r in rows]
    ceilings = [r[3] for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(labels) + 1.2))
    ys = list(range(len(labels)))[::-1]
    ax.barh(ys, ratios, color=["#2ca02c" if r >= g else "#1f77b4"
                               for r, g in zip(ratios, goals)], height=0.6)
    ax.scatter(goals, ys, marker="|", s=300, color="black", label="goal", zorder=3)
    cy = [(c, y) for c, y in zip(ceilings, ys) if c is not None]
    if cy:
        ax.scatter([c for c, _ in cy], [y for _, y in cy], marker="D", s=30, color="#d62728",
                   label="ceiling here (transport + device)", zorder=3)
    for y, r in zip(ys, ratios):
        ax.text(r, y, f" {r:.2f}x", va="center", fontsize=7)
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xlabel("atomicfs-sw ÷ reference", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"issue 14's goals, {data['date'][:10]}: median ratios of one run",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "goals.png", dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------------------ README

def readme_block(data: dict[str, Any], rel: str) -> str:
    c = data["config"]
    return f"""{README_BEGIN}
Latest run: {data['date']}, `{data['command']}` ({c['rounds']} rounds, {c['runtime_s']:g} s
per run after {c['ramp_s']:g} s ramp, {data.get('elapsed_s', 0) / 60:.1f} minutes), commit
{data['machine']['atomicfs_git']}. Machine: {machine_line(data)}.
Full figures, latencies and daemon costs: [{rel}/results.md]({rel}/results.md); every
number: [{rel}/results.json]({rel}/results.json).

{goals_table(data)}

{issue14_table(data)}

Ratios, atomicfs ÷ reference (median over median; above 1 means atomicfs is faster):

{ratio_table(data)}
{pgbench_section(data, readme=True)}
![issue 14 goals]({rel}/goals.png)

![throughput]({rel}/iops.png)

![latency]({rel}/latency.png)
{README_END}"""


def update_readme(path: Path, data: dict[str, Any], rel: str) -> None:
    """Replace the generated block of the README's performance section (or add the
    section at the end)."""
    text = path.read_text()
    block = readme_block(data, rel)
    pattern = re.compile(re.escape(README_BEGIN) + ".*?" + re.escape(README_END), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n## Performance\n\n" + block + "\n"
    path.write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m bench.report RESULTS.json", file=sys.stderr)
        return 2
    src = Path(args[0])
    data = json.loads(src.read_text())
    from bench.workloads import WORKLOADS
    aggregate(data, [w for w in WORKLOADS if w.key in data["config"]["workloads"]])
    if "pgbench" in data:
        from bench import pgbench
        pgbench.aggregate(data["pgbench"])
    (src.parent / "results.md").write_text(markdown(data))
    plots(data, src.parent)
    src.write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
