"""The demo's live terminal view and its closing summary (rich)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from rich.console import Group
from rich.panel import Panel
from rich.table import Table

from cloudlet.demo import Demo


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def live_view(demo: Demo) -> Group:
    with demo.observed.lock:
        latest = dict(demo.observed.latest)
        letters = dict(demo.observed.dead_letters)
        updates = demo.observed.updates
        derived = sum(demo.observed.derived.values())
    table = Table(title="latest accepted and derived updates (on .../updates)", expand=True)
    table.add_column("service object / stream", no_wrap=True)
    table.add_column("values")
    table.add_column("simulated time", no_wrap=True)
    for where in sorted(latest):
        body = latest[where]
        values = ", ".join(
            f"{name}={_value(ch['current-value'])}" for name, ch in body["channels"].items()
        )
        when = datetime.fromtimestamp(body["lastUpdate"] / 1000, UTC).strftime("%a %H:%M")
        table.add_row(where, values, when)
    counts = demo.ingest.counts.snapshot()
    sent = demo.fleet.sent if demo.fleet else {}
    rejected = ", ".join(f"{r.value}={n}" for r, n in sorted(counts.rejected.items())) or "none"
    seen_letters = ", ".join(f"{r}={n}" for r, n in sorted(letters.items())) or "none"
    stats = Table.grid(padding=(0, 2))
    stats.add_row("devices sent", f"{sum(sent.values())} messages ({sent.get('update', 0)} good)")
    stats.add_row("unit received", f"{counts.messages} messages, {counts.accepted} accepted")
    stats.add_row("unit rejected", rejected)
    stats.add_row("flows derived", f"{derived} updates (windows and composite streams)")
    openings = ", ".join(f"{v}={n}" for v, n in sorted(demo.valve_openings.items())) or "none yet"
    stats.add_row("valves opened", openings)
    stats.add_row("subscribers saw", f"{updates} updates; dead letters: {seen_letters}")
    return Group(table, Panel(stats, title="cloudlet", expand=True))


def summary_view(summary: dict[str, Any]) -> Table:
    table = Table(title=f"demo summary: {summary['scenario']}, {summary['seconds']} s", box=None)
    table.add_column("")
    table.add_column("")
    table.add_row("simulated devices", str(summary["devices"]))
    table.add_row("good updates sent", str(summary["sent"]["updates"]))
    faults = ", ".join(f"{k}={v}" for k, v in sorted(summary["sent"]["faults"].items()))
    table.add_row("faults injected", faults or "none")
    unit = summary["unit"]
    table.add_row("unit: messages / accepted", f"{unit['messages']} / {unit['accepted']}")
    rejected = ", ".join(f"{k}={v}" for k, v in sorted(unit["rejected"].items()))
    table.add_row("unit: rejected by reason", rejected or "none")
    seen = summary["observed"]
    letters = ", ".join(f"{k}={v}" for k, v in sorted(seen["dead_letters"].items()))
    table.add_row("seen on .../updates", str(seen["updates"]))
    derived = ", ".join(f"{k}={v}" for k, v in sorted(seen["derived"].items()))
    table.add_row("derived (flows) seen", derived or "none yet")
    openings = ", ".join(f"{k}={v}" for k, v in sorted(summary["valve_openings"].items()))
    table.add_row("valves opened by rules", openings or "none")
    table.add_row("seen on the dead-letter topic", letters or "none")
    verdict = (
        "[green]every update arrived, derived ones too; every fault was rejected for the right"
        " reason[/]"
        if summary["lossless"]
        else "[red]some updates or dead letters are missing[/]"
    )
    table.add_row("verdict", verdict)
    return table
