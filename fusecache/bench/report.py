"""`fusecache bench`'s report: the table, the ideal, the diagnostics (--verbose) and the plot."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .run import CaseResult, Ideal

# Okabe-Ito colours, which readers with any common colour-blindness tell apart;
# one per case, its first switches solid and its second switches a lighter,
# hatched bar of the same colour.
CASE_COLOURS = {"plain": "#E69F00", "fusecache": "#0072B2", "direct": "#009E73"}
OTHER_COLOURS = ("#CC79A7", "#D55E00", "#56B4E9", "#000000")
CASE_LABELS = {"plain": "plain mount (s3fs)", "fusecache": "fusecache over the mount",
               "direct": "fusecache direct (s3://)"}


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.0f}"


def _label(case: CaseResult) -> str:
    return CASE_LABELS.get(case.name, case.name)


def format_table(cases: list[CaseResult], local: CaseResult | None = None) -> str:
    """Seconds per model and case (first and second switch), totals, and what moved."""
    plain = cases[0]
    width = max(len(s.model) for s in plain.switches) + 1
    head = f"{'model':{width}} {'MB':>7}" + "".join(
        f" | {c.name[:9] + ' 1st':>13} {'2nd':>6}" for c in cases)
    lines = [head + (f" | {'local 2nd':>9}" if local else "") + "  (seconds)"]
    for i, p in enumerate(plain.switches):
        row = f"{p.model:{width}} {p.size / 1e6:7,.0f}" + "".join(
            f" | {c.switches[i].first_s:13.2f} {c.switches[i].second_s:6.2f}" for c in cases)
        lines.append(row + (f" | {local.switches[i].second_s:9.2f}" if local else ""))
    total = f"{'total':{width}} {plain.total('size') / 1e6:7,.0f}" + "".join(
        f" | {c.total('first_s'):13.2f} {c.total('second_s'):6.2f}" for c in cases)
    lines.append(total + (f" | {local.total('second_s'):9.2f}" if local else ""))
    for case in cases[1:]:
        for label, attr in (("first switches", "first_s"), ("second switches", "second_s")):
            ratio = plain.total(attr) / max(case.total(attr), 1e-9)
            lines.append(f"{label}: {_label(case)} is {ratio:.1f}x as fast as the plain mount")
    for case in cases:
        second = (case.total("second_lower_bytes")
                  if case.switches[0].second_lower_bytes is not None else None)
        lines.append(f"{_label(case)}: MB moved from the store: first switches "
                     f"{_mb(case.total('first_lower_bytes') or None)}, second switches "
                     f"{_mb(second)}{_cpu(case)}")
    return "\n".join(lines)


def _cpu(case: CaseResult) -> str:
    """CPU-seconds per GB of models switched to, first and second switches: the whole
    machine's, and the daemon's alone where there is one."""
    gb = case.total("size") / 1e9
    rounds = max(len(case.switches[0].second_runs), 1)
    line = (f"; CPU s/GB, first / second switches: machine {case.machine_cpu_first / gb:.2f}"
            f" / {case.machine_cpu_second / (gb * rounds):.2f}")
    if case.daemon_cpu_first is not None and case.daemon_cpu_second is not None:
        line += (f", daemon {case.daemon_cpu_first / gb:.2f}"
                 f" / {case.daemon_cpu_second / (gb * rounds):.2f}")
    return line


def format_ideal(cases: list[CaseResult], ideal: Ideal) -> str:
    """Each fusecache case against the ideal: the bytes once at the plain mount's best."""
    lines = [f"ideal first switches: {ideal.first_s:.2f} s (every byte once at the plain "
             f"mount's best, {ideal.plain_best_bps / 1e6:,.0f} MB/s with 4 readers, then "
             "loads from memory)",
             f"ideal second switches: {ideal.second_s:.2f} s (the same loads from local "
             "files in the page cache)"]
    for case in cases:
        lines.append(f"  {_label(case)} takes {case.total('first_s') / ideal.first_s:.2f}x "
                     f"the ideal first switches, {case.total('second_s') / ideal.second_s:.2f}x "
                     "the ideal second switches")
    paired = next((c for c in cases if c.name == "fusecache"), None)
    if paired is not None and paired.switches[0].second_runs:
        lines.append("  second switches, all models, round by round: fusecache over the mount / "
                     "local files: " + ", ".join(
            f"{f:.2f} / {loc:.2f} s" for f, loc in zip(_round_totals(paired),
                                                      _round_totals(ideal.local), strict=True)))
    return "\n".join(lines)


def _round_totals(case: CaseResult) -> list[float]:
    """Seconds of each round of second switches, all models."""
    return [sum(r) for r in zip(*(s.second_runs for s in case.switches), strict=True)]


def format_diagnostics(cases: list[CaseResult], daemons: dict[str, dict[str, int]]) -> str:
    """What only someone tuning fusecache needs: where replies came from, reclaim (--verbose)."""
    lines = []
    for name, d in daemons.items():
        lines.append(f"{name} daemon: served {_mb(d['served_memory'])} MB from memory, "
                     f"{_mb(d['served_disk'])} MB from disk, {_mb(d['served_lower'])} MB from "
                     f"below; {d['evictions']} memory evictions, {d['disk_writes_dropped']} "
                     "disk writes dropped")
    for case in cases:
        if case.daemon_served_second is not None:
            lines.append(f"{case.name} second switches: the daemon served "
                         f"{_mb(case.daemon_served_second)} MB of "
                         f"{_mb(case.total('size') * len(case.switches[0].second_runs))} MB; "
                         "the kernel page cache the rest")
    page = os.sysconf("SC_PAGE_SIZE")
    lines.append("direct reclaim during second switches (MB of pages scanned): " + ", ".join(
        f"{c.name} {_mb(c.direct_reclaim_second * page)}" for c in cases)
        + "; paged out by DAMON (the VM's proactive reclaim): " + ", ".join(
        f"{c.name} {_mb(c.proactive_reclaim_second)}" for c in cases))
    return "\n".join(lines)


def plot(cases: list[CaseResult], path: Path, title: str, ideal: Ideal | None = None) -> None:
    """Per-model seconds, totals against the ideal, and bytes from the store, one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {c.name: CASE_COLOURS.get(c.name, OTHER_COLOURS[i % len(OTHER_COLOURS)])
               for i, c in enumerate(cases)}
    fig = plt.figure(figsize=(14, 9))
    grid = fig.add_gridspec(2, 2, height_ratios=[1.2, 1])
    per_model, totals, moved = (fig.add_subplot(grid[0, :]), fig.add_subplot(grid[1, 0]),
                                fig.add_subplot(grid[1, 1]))
    names = [s.model for s in cases[0].switches]
    width = 0.8 / (2 * len(cases))
    for i, case in enumerate(cases):
        for j, attr in enumerate(("first_s", "second_s")):
            xs = [k + (2 * i + j + 0.5) * width - 0.4 for k in range(len(names))]
            _bar(per_model, xs, [getattr(s, attr) for s in case.switches], width,
                 colours[case.name], second=j == 1,
                 label=f"{_label(case)}, {'first' if j == 0 else 'second'} switch")
    per_model.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    per_model.set_ylabel("seconds per switch")
    per_model.set_ylim(top=per_model.get_ylim()[1] * 1.25)  # room for the legend
    per_model.legend(fontsize=8, ncol=len(cases), loc="upper left")

    for i, case in enumerate(cases):
        for j, attr in enumerate(("first_s", "second_s")):
            _bar(totals, [j + (i + 0.5) / (len(cases) + 1) - 0.4], [case.total(attr)],
                 0.8 / (len(cases) + 1), colours[case.name], second=j == 1)
    if ideal is not None:
        for j, seconds in enumerate((ideal.first_s, ideal.second_s)):
            totals.hlines(seconds, j - 0.45, j + 0.45, colors="black", linestyles="--",
                          label="ideal" if j == 0 else "_nolegend_")
        totals.legend(fontsize=8)
    totals.set_xticks([0, 1], ["all first switches", "all second switches"])
    totals.set_ylabel("seconds, all models")

    for i, case in enumerate(cases):
        for j, attr in enumerate(("first_lower_bytes", "second_lower_bytes")):
            _bar(moved, [j + (i + 0.5) / (len(cases) + 1) - 0.4], [case.total(attr) / 1e9],
                 0.8 / (len(cases) + 1), colours[case.name], second=j == 1)
    moved.axhline(cases[0].total("size") / 1e9, color="black", linestyle="--",
                  label="the models once")
    moved.set_xticks([0, 1], ["first switches", "second switches"])
    moved.set_ylabel("GB from the store")
    moved.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _bar(ax: object, xs: list[float], ys: list[float], width: float, colour: str,
         second: bool, label: str | None = None) -> None:
    ax.bar(xs, ys, width, color=colour, alpha=0.45 if second else 1.0,  # type: ignore[attr-defined]
           hatch="//" if second else None, edgecolor=colour, label=label)
