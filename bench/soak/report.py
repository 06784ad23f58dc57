"""The soak's report: a text table, the JSON, and an SVG plot of the resources."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")


def print_table(result: dict[str, Any]) -> None:
    stats = result.get("stats", {}).get("counters", {})
    faults = {k[6:]: v for k, v in stats.items() if k.startswith("fault:")}
    drift = {k[6:]: v for k, v in stats.items() if k.startswith("drift:")}
    print(f"\nsoak: {result['minutes']:g} min asked, {result['wall_seconds']:.0f} s run")
    rows = [
        ("sync runs (ticks that synced)", _fmt(result.get("runs"))),
        ("partition syncs", _fmt(result.get("partition_syncs"))),
        ("driver steps", str(result["driver_steps"])),
        ("catalogue changes (driver)", _fmt(result["changes"])),
        ("faults injected", _fmt(faults)),
        ("drift changes", _fmt(drift)),
        ("fault toggles", str(result["fault_toggles"])),
        ("API requests served", str(stats.get("requests", 0))),
        ("events recorded", _fmt(result.get("events"))),
        ("incidents", "; ".join(_incident(i) for i in result["incidents"])),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print("\nresources (per replica process: start -> end, least-squares slope after warm-up)")
    for row in result["resources"]["replicas"]:
        rss, fds, conns = row["rss_mb"], row["fds"], row["db_connections"]
        print(
            f"  {row['replica']:<4} RSS {rss['start']:>5.0f} -> {rss['end']:>5.0f} MB "
            f"{_per_hour(rss):>12}   FDs {fds['start']:>3} -> {fds['end']:>3} {_per_hour(fds):>10}"
            f"   DB conns max {conns['max']:>2}/{result['resources']['pool_bound']}"
        )
    peaks: dict[str, int] = {}
    for sample in result["samples"]:
        for application, count in (sample.get("connections") or {}).items():
            peaks[application] = max(peaks.get(application, 0), count)
    shown = ", ".join(f"{name} {count}" for name, count in sorted(peaks.items()))
    print(f"  server connections, peak per application: {shown or '-'}")
    sizes = [s["inventory_bytes"] for s in result["samples"] if s.get("inventory_bytes")]
    if sizes:
        print(f"  inventory schema {sizes[0] / 2**20:.1f} -> {sizes[-1] / 2**20:.1f} MB")
    print("\nchecks")
    for check in result["checks"]:
        detail = check["detail"] if not check["ok"] else check["detail"][:160]  # failures whole
        print(f"  {'ok  ' if check['ok'] else 'FAIL'} {check['name']}: {detail}")
    print(f"\nsoak {'PASSED' if result['ok'] else 'FAILED'}")


def _fmt(counts: dict[str, Any] | None) -> str:
    if not counts:
        return "0"
    return (
        f"{sum(counts.values())} (" + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ")"
    )


def _incident(i: dict[str, Any]) -> str:
    who = f" {i['replica']} -> {i['replacement']}" if "replica" in i else ""
    return f"{i['incident']}{who} ({i['seconds']:g} s)"


def _per_hour(metric: dict[str, Any]) -> str:
    slope = metric["slope_per_hour"]
    return "-" if slope is None else f"{slope:+.1f}/h"


def write(result: dict[str, Any], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = directory / f"soak-{stamp}.json"
    text = json.dumps(result, indent=1, sort_keys=True, default=str) + "\n"
    path.write_text(text)
    (directory / "soak-latest.json").write_text(text)
    svg = plot(result)
    (directory / f"soak-{stamp}.svg").write_text(svg)
    (directory / "soak-latest.svg").write_text(svg)
    print(f"[soak] wrote {path} and {path.with_suffix('.svg')}", flush=True)
    return path


def plot(result: dict[str, Any]) -> str:
    """Three stacked panels (RSS, FDs, DB connections per replica) over time, by hand:
    no plotting library for three line charts."""
    samples = result["samples"]
    names = sorted({n for s in samples for n in s["replicas"]}, key=lambda n: int(n[1:]))
    t_max = max((s["t"] for s in samples), default=1.0) or 1.0
    width, panel, left, top = 900, 200, 70, 30
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{top + 3 * (panel + 40) + 30}" font-family="sans-serif" font-size="12">',
        f'<text x="{left}" y="18">soak: {result["minutes"]:g} min; incidents: '
        + "; ".join(_incident(i) for i in result["incidents"]) + "</text>",
    ]  # fmt: skip
    for index, (metric, label) in enumerate(
        (("rss_mb", "RSS (MB)"), ("fds", "open FDs"), ("db_connections", "DB connections"))
    ):
        y0 = top + index * (panel + 40)
        values = [s["replicas"][n][metric] for s in samples for n in s["replicas"]]
        v_max = max(values, default=1) * 1.1 or 1
        x_of = lambda t: left + (width - left - 20) * t / t_max  # noqa: E731
        y_of = lambda v, y0=y0, v_max=v_max: y0 + panel - panel * v / v_max  # noqa: E731
        parts.append(f'<rect x="{left}" y="{y0}" width="{width - left - 20}" height="{panel}" '
                     'fill="none" stroke="#999"/>')  # fmt: skip
        parts.append(f'<text x="5" y="{y0 + 12}">{label}</text>')
        parts.append(f'<text x="5" y="{y0 + 28}">max {v_max / 1.1:.0f}</text>')
        for i in result["incidents"]:
            x = x_of(i["at"] - result["started_at"])
            parts.append(f'<line x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y0 + panel}" '
                         'stroke="#bbb" stroke-dasharray="4"/>')  # fmt: skip
        for n, name in enumerate(names):
            points = " ".join(
                f"{x_of(s['t']):.1f},{y_of(s['replicas'][name][metric]):.1f}"
                for s in samples
                if name in s["replicas"]
            )
            colour = COLOURS[n % len(COLOURS)]
            parts.append(f'<polyline fill="none" stroke="{colour}" points="{points}"/>')
            if index == 0:
                parts.append(f'<text x="{left + 10 + 50 * n}" y="{y0 + panel + 15}" '
                             f'fill="{colour}">{name}</text>')  # fmt: skip
        parts.append(f'<text x="{width - 120}" y="{y0 + panel + 15}">t = {t_max:.0f} s</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
