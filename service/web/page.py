"""The HTML status page: one self-contained document (inline CSS, inline SVG, no JS).

It shows per-partition health with age, images per region and source, offline
transitions over time, sync durations and the last runs. Every value from the
database is escaped. No secrets: not the database URL, not the endpoint, not a key.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime
from html import escape
from typing import Any

from service.config import Settings
from service.report import _age as age_text
from service.web import svg
from service.web.data import PageData

REFRESH_SECONDS = 60
"""The page reloads itself this often (a meta refresh: no script)."""

SHORT_SOURCE = {
    "public": "pub",
    "thirdparty": "3rd",
    "private": "priv",
    "shared": "shr",
    "community": "com",
}
"""Column heads of the health grid on a phone's width."""
SOURCE_CSS = {
    "public": "s1",
    "thirdparty": "s2",
    "private": "s3",
    "shared": "s4",
    "community": "s5",
}
RUN_CSS = {
    "succeeded": "ok",
    "partial": "warn",
    "failed": "bad",
    "abandoned": "muted-fill",
    "running": "run",
}

CSS = """
:root{--bg:#f6f7f9;--card:#fff;--fg:#1d2330;--muted:#667085;--line:#e4e7ec;
--ok:#12a150;--warn:#e59500;--bad:#d92d20;--run:#2e90fa;--idle:#98a2b3;
--s1:#2e90fa;--s2:#7a5af8;--s3:#12b76a;--s4:#f79009;--s5:#ee46bc}
@media (prefers-color-scheme:dark){:root{--bg:#0f1218;--card:#171b23;--fg:#e6e9ef;
--muted:#98a2b3;--line:#2a303b}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);
font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans",sans-serif}
header{padding:14px 16px;display:flex;flex-wrap:wrap;gap:8px 16px;align-items:center;
border-bottom:1px solid var(--line);background:var(--card)}
header h1{font-size:18px;margin:0;flex:1 1 auto}
.pill{display:inline-block;padding:3px 10px;border-radius:999px;font-weight:600;font-size:13px;
color:#fff}
.pill.ok{background:var(--ok)}.pill.bad{background:var(--bad)}
.when{color:var(--muted);font-size:13px}
main{max-width:1200px;margin:0 auto;padding:12px;display:grid;gap:12px;
grid-template-columns:repeat(auto-fit,minmax(min(100%,520px),1fr))}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:12px 14px;
min-width:0}
section.wide{grid-column:1/-1}
h2{font-size:15px;margin:0 0 8px}
.cards{display:grid;gap:10px;grid-template-columns:repeat(auto-fit,minmax(140px,1fr))}
.card{border:1px solid var(--line);border-radius:8px;padding:8px 10px}
.card b{display:block;font-size:22px;line-height:1.2}
.card span{color:var(--muted);font-size:12px}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{padding:5px 8px;border-bottom:1px solid var(--line);text-align:left;white-space:nowrap}
th{color:var(--muted);font-weight:600}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.cell{border-radius:6px;padding:4px 6px;text-align:center;font-weight:600;color:#fff}
.cell small{display:block;font-weight:400;opacity:.9}
.cell.ok{background:var(--ok)}.cell.warn{background:var(--warn)}.cell.bad{background:var(--bad)}
.cell.never{background:var(--idle)}.cell.none{background:none;color:var(--muted)}
.tag{display:inline-block;padding:0 6px;border-radius:4px;color:#fff;font-size:12px}
.tag.ok{background:var(--ok)}.tag.warn{background:var(--warn)}.tag.bad{background:var(--bad)}
.tag.run{background:var(--run)}.tag.muted-fill{background:var(--idle)}
.legend{display:flex;flex-wrap:wrap;gap:4px 12px;font-size:12px;color:var(--muted);margin:4px 0}
.legend i{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:4px;
vertical-align:-1px}
.errors{margin:8px 0 0;padding-left:18px;font-size:13px}
.errors li{margin:2px 0;overflow-wrap:anywhere}
.short{display:none}
@media (max-width:600px){main{padding:8px;gap:8px}section{padding:10px}
th,td{padding:4px 3px}.cell{padding:3px 2px}.cell small{display:none}
.long{display:none}.short{display:inline}}
.banner{grid-column:1/-1;background:var(--bad);color:#fff;border-radius:10px;padding:10px 14px}
footer{max-width:1200px;margin:0 auto;padding:4px 16px 20px;color:var(--muted);font-size:12px}
svg.chart{width:100%;height:auto;display:block}
svg .muted,.muted{fill:var(--muted);color:var(--muted)}
svg text{fill:var(--fg)}svg text.muted{fill:var(--muted)}
svg .grid{stroke:var(--line)}svg .axis{stroke:var(--muted)}
svg .ok{fill:var(--ok)}svg .warn{fill:var(--warn)}svg .bad{fill:var(--bad)}
svg .run{fill:var(--run)}svg .muted-fill{fill:var(--idle)}
svg .s1,.legend .s1{fill:var(--s1);background:var(--s1)}
svg .s2,.legend .s2{fill:var(--s2);background:var(--s2)}
svg .s3,.legend .s3{fill:var(--s3);background:var(--s3)}
svg .s4,.legend .s4{fill:var(--s4);background:var(--s4)}
svg .s5,.legend .s5{fill:var(--s5);background:var(--s5)}
svg .offline,.legend .offline{fill:var(--warn);background:var(--warn)}
svg .online,.legend .online{fill:var(--ok);background:var(--ok)}
.legend .ok{background:var(--ok)}.legend .warn{background:var(--warn)}
.legend .bad{background:var(--bad)}.legend .muted-fill{background:var(--idle)}
"""


def _time(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else "never"


def _short_time(value: datetime, with_date: bool) -> str:
    return value.strftime("%m-%d %H:%M" if with_date else "%H:%M:%S")


def _legend(items: Iterable[tuple[str, str]]) -> str:
    return (
        '<div class="legend">'
        + "".join(f'<span><i class="{css}"></i>{escape(label)}</span>' for css, label in items)
        + "</div>"
    )


def _source_head(source: str, css: str = "") -> str:
    """A source's column head: the full name, or a short one on a phone's width."""
    return (
        f'<th{f" class={css}" if css else ""} title="{escape(source)}">'
        f'<span class="long">{escape(source)}</span>'
        f'<span class="short">{escape(SHORT_SOURCE.get(source, source))}</span></th>'
    )


def partition_class(row: Any, interval: float) -> str:
    """ok / warn / bad / never for one sync_health row, given the source's interval."""
    if row is None or row.last_success_at is None:
        # A configured partition not attempted yet has no status: "never", not red.
        return "never" if row is None or row.last_status in ("succeeded", None) else "bad"
    age = row.age_seconds or 0.0
    if age > 3 * interval:
        return "bad"
    if row.last_status != "succeeded" or age > 2 * interval:
        return "warn"
    return "ok"


SEVERITY = {"ok": 0, "never": 1, "warn": 2, "bad": 3}
"""Order of the cell classes: a cell of several accounts' partitions shows the worst."""


def _by_cell(data: PageData) -> dict[tuple[str, str], list[Any]]:
    """sync_health rows by grid cell (region, source): one row per partition identity, so
    a private or shared cell holds one row per account that syncs it."""
    cells: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for row in data.health:
        cells[(row.region_id, row.image_source)].append(row)
    return cells


def _label(row: Any) -> str:
    """region/source, and the account of an account partition."""
    account = f" ({row.account})" if row.account else ""
    return f"{row.region_id}/{row.image_source}{account}"


def _cell(region: str, source: str, found: list[Any], interval: float) -> str:
    """One grid cell: the partition's state, or the worst of its accounts' partitions."""
    if not found:
        css, text, sub = "never", "never", "not synced"
        tip = f"{region}/{source}: last {sub}, last success {_time(None)}"
    else:
        worst = max(found, key=lambda r: SEVERITY[partition_class(r, interval)])
        css = partition_class(worst, interval)
        text = age_text(worst.age_seconds) if worst.last_success_at else "never"
        failing = sum(r.last_status not in ("succeeded", None) for r in found)
        if len(found) == 1:
            sub = worst.last_status or "not synced"
        elif failing:
            sub = f"{failing} of {len(found)} accounts failing"
        else:
            sub = f"{len(found)} accounts"
        tip = "; ".join(
            f"{_label(r)}: last {r.last_status or 'not synced'}, "
            f"last success {_time(r.last_success_at)}"
            for r in found
        )
    return (
        f'<td><div class="cell {css}" title="{escape(tip)}">{escape(text)}'
        f"<small>{escape(sub)}</small></div></td>"
    )


def _health(data: PageData, settings: Settings) -> str:
    cells = _by_cell(data)
    head = "".join(_source_head(s) for s in settings.sources)
    body = []
    for region in settings.regions:
        row_cells = "".join(
            _cell(region, source, cells.get((region, source), []), settings.interval_for(source))
            for source in settings.sources
        )
        body.append(f"<tr><th>{escape(region)}</th>{row_cells}</tr>")
    errors = [
        f"<li><b>{escape(_label(r))}</b> {escape(r.last_status or '')}: "
        f"{escape(r.last_error_status or '')} {escape(r.last_error_message or '')}</li>"
        for r in data.health
        if r.last_status != "succeeded" and (r.last_error_status or r.last_error_message)
    ]
    legend = _legend(
        [
            ("ok", "fresh"),
            ("warn", "last attempt failed, or older than 2 intervals"),
            ("bad", "older than 3 intervals"),
            ("muted-fill", "never synced"),
        ]
    )
    return (
        '<section class="wide"><h2>Partition health (age of the last success)</h2>'
        f'<div class="scroll"><table><tr><th>region</th>{head}</tr>{"".join(body)}</table></div>'
        f"{legend}"
        + (f'<ul class="errors">{"".join(errors)}</ul>' if errors else "")
        + "</section>"
    )


def _cards(data: PageData, settings: Settings) -> str:
    # Every partition identity: one per grid cell not synced yet, else each row of the cell
    # (a private or shared cell has one per account).
    cells = _by_cell(data)
    classes = [
        partition_class(row, settings.interval_for(source))
        for region in settings.regions
        for source in settings.sources
        for row in cells.get((region, source)) or [None]
    ]
    fresh = classes.count("ok")
    images = sum(r.images for r in data.summary)
    offline = sum(r.offline for r in data.summary)
    ages = [r.age_seconds for r in data.health if r.age_seconds is not None]
    last_run = data.runs[0] if data.runs else None
    cards = [
        (f"{fresh}/{len(classes)}", "partitions fresh"),
        (f"{images:,}", "images listed"),
        (f"{offline:,}", "of them offline"),
        (age_text(min(ages)) if ages else "never", "since the newest success"),
        (last_run.status if last_run else "none", "last run"),
    ]
    return (
        '<section class="wide"><div class="cards">'
        + "".join(
            f'<div class="card"><b>{escape(v)}</b><span>{escape(k)}</span></div>' for v, k in cards
        )
        + "</div></section>"
    )


def _images(data: PageData, settings: Settings) -> str:
    by_region: dict[str, dict[str, Any]] = defaultdict(dict)
    for r in data.summary:
        by_region[r.region_id][r.image_source] = r
    regions = [r for r in settings.regions if r in by_region] + sorted(
        r for r in by_region if r not in settings.regions
    )
    sources = [s for s in SOURCE_CSS if any(s in by_region[r] for r in regions)]
    bars = [
        svg.Bar(
            region,
            tuple(
                svg.Segment(float(by_region[region][s].images), SOURCE_CSS[s], s)
                for s in sources
                if s in by_region[region]
            ),
        )
        for region in regions
    ]
    chart = svg.horizontal_bars("Listed images per region, by source", bars)
    rows = []
    for region in regions:
        cells = "".join(f'<td class="n">{_count(by_region[region].get(s))}</td>' for s in sources)
        rows.append(f"<tr><th>{escape(region)}</th>{cells}</tr>")
    table = (
        '<div class="scroll"><table><tr><th>region</th>'
        + "".join(_source_head(s, "n") for s in sources)
        + f"</tr>{''.join(rows)}</table></div>"
    )
    return (
        "<section><h2>Images per region and source</h2>"
        + _legend((SOURCE_CSS[s], s) for s in sources)
        + chart
        + table
        + '<p class="muted">cells: listed (offline)</p></section>'
    )


def _count(row: Any) -> str:
    if row is None:
        return "0"
    return f"{row.images:,}" + (f" ({row.offline:,})" if row.offline else "")


def _transitions(data: PageData) -> str:
    t = data.transitions
    buckets = t.buckets
    with_date = t.bucket_seconds >= 3600 or (
        len(buckets) > 1 and buckets[0].start.date() != buckets[-1].start.date()
    )
    chart = svg.diverging_chart(
        "Offline transitions over time",
        [float(b.went_offline) for b in buckets],
        [float(b.came_online) for b in buckets],
        up_css="offline",
        down_css="online",
        tips=[_short_time(b.start, with_date) for b in buckets],
        first_label=_short_time(buckets[0].start, with_date) if buckets else "",
        last_label=_short_time(buckets[-1].start, with_date) if buckets else "",
    )
    width = _bucket_text(t.bucket_seconds)
    total_off = sum(b.went_offline for b in buckets)
    total_on = sum(b.came_online for b in buckets)
    return (
        "<section><h2>Offline transitions (last 7 days)</h2>"
        + _legend(
            [
                ("offline", f"went offline ({total_off:,})"),
                ("online", f"came online ({total_on:,})"),
            ]
        )
        + chart
        + f'<p class="muted">one column per {escape(width)}</p></section>'
    )


def _bucket_text(seconds: int) -> str:
    for unit, name in ((86400, "day"), (3600, "hour"), (60, "minute")):
        if seconds % unit == 0:
            n = seconds // unit
            return name if n == 1 else f"{n} {name}s"
    return f"{seconds} seconds"


def _durations(data: PageData) -> str:
    runs = data.durations
    with_date = len(runs) > 1 and runs[0].started_at.date() != runs[-1].started_at.date()
    columns = [
        svg.Bar(
            f"run {r.run_id}",
            (svg.Segment(round(r.seconds, 2), RUN_CSS.get(r.status, "muted-fill"), r.status),),
            title=f"run {r.run_id} at {_short_time(r.started_at, True)}, {r.partitions} partitions",
        )
        for r in runs
    ]
    chart = svg.column_chart(
        "Sync run durations",
        columns,
        unit="s",
        first_label=_short_time(runs[0].started_at, with_date) if runs else "",
        last_label=_short_time(runs[-1].started_at, with_date) if runs else "",
    )
    return (
        f"<section><h2>Sync durations (last {len(runs)} runs)</h2>"
        + _legend(
            [
                ("ok", "succeeded"),
                ("warn", "partial"),
                ("bad", "failed"),
                ("muted-fill", "abandoned"),
            ]
        )
        + chart
        + "</section>"
    )


def _runs(data: PageData) -> str:
    head = (
        "<tr><th>run</th><th>started</th><th>status</th><th>trigger</th><th class=n>seconds</th>"
        "<th class=n>partitions</th><th class=n>failed</th><th class=n>requests</th>"
        "<th class=n>created</th><th class=n>updated</th><th class=n>offline</th>"
        "<th class=n>online</th><th class=n>removed</th></tr>"
    )
    rows = []
    for r in data.runs:
        seconds = f"{(r.finished_at - r.started_at).total_seconds():.1f}" if r.finished_at else "…"
        numbers = (
            r.partitions,
            r.partitions_failed,
            r.api_requests,
            r.created,
            r.updated,
            r.went_offline,
            r.came_online,
            r.removed,
        )
        rows.append(
            f"<tr><td>{r.run_id}</td><td>{escape(_short_time(r.started_at, True))}</td>"
            f'<td><span class="tag {RUN_CSS.get(r.status, "muted-fill")}">{escape(r.status)}'
            f"</span></td><td>{escape(r.trigger)}</td><td class=n>{seconds}</td>"
            + "".join(f"<td class=n>{n:,}</td>" for n in numbers)
            + "</tr>"
        )
    if not rows:
        rows.append('<tr><td colspan="13" class="muted">no runs yet</td></tr>')
    return (
        '<section class="wide"><h2>Last runs</h2><div class="scroll"><table>'
        + head
        + "".join(rows)
        + "</table></div></section>"
    )


def _webhooks(data: PageData) -> str:
    """Webhook subscribers (only when there are any): failing, lag, last error."""
    if not data.webhooks:
        return ""
    rows = []
    for w in data.webhooks:
        st = w.state
        tag = '<span class="tag bad">failing</span>' if st.failing else (
            '<span class="tag ok">ok</span>')  # fmt: skip
        delivered = _short_time(st.delivered_at, True) if st.delivered_at else "never"
        rows.append(
            f"<tr><td>{escape(st.subscriber)}</td><td>{escape(st.url)}</td><td>{tag}</td>"
            f"<td class=n>{w.lag.events:,}</td><td class=n>{escape(age_text(w.lag.seconds))}</td>"
            f"<td>{escape(delivered)}</td><td>{escape(st.last_error or '')}</td></tr>"
        )
    return (
        '<section class="wide"><h2>Webhook subscribers</h2><div class="scroll"><table>'
        "<tr><th>subscriber</th><th>url</th><th>state</th><th class=n>lag events</th>"
        "<th class=n>lag</th><th>last delivery</th><th>last error</th></tr>"
        + "".join(rows)
        + "</table></div></section>"
    )


def render_page(
    data: PageData | None,
    *,
    settings: Settings,
    ready: bool,
    reason: str,
    error: str | None,
    tick_interval: float,
) -> str:
    """The whole document. ``data`` is None when the database could not be read."""
    pill = (
        f'<span class="pill {"ok" if ready else "bad"}" title="{escape(reason)}">'
        f"{'ready' if ready else 'not ready'}</span>"
    )
    when = _time(data.now) if data else ""
    parts: list[str] = []
    if not ready:
        parts.append(f'<div class="banner">Not ready: {escape(reason)}</div>')
    if data is None:
        parts.append(f'<div class="banner">Cannot read the database: {escape(error or "")}</div>')
    else:
        parts += [
            _cards(data, settings),
            _health(data, settings),
            _images(data, settings),
            _transitions(data),
            _durations(data),
            _runs(data),
            _webhooks(data),
        ]
    intervals = ", ".join(f"{s} {age_text(settings.interval_for(s))}" for s in settings.sources)
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">'
        '<link rel="icon" href="data:,">'
        "<title>image-sync status</title>"
        f"<style>{CSS}</style></head><body>"
        f"<header><h1>jdcloud-image-sync</h1>{pill}"
        f'<span class="when">{escape(when)}</span></header>'
        f"<main>{''.join(parts)}</main>"
        f"<footer>Regions: {escape(', '.join(settings.regions))}. "
        f"Sync intervals: {escape(intervals)}; tick every {escape(age_text(tick_interval))}. "
        f"This page reloads every {REFRESH_SECONDS}s.</footer>"
        "</body></html>"
    )
