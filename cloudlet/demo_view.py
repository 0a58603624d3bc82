"""The demo's live terminal view and its closing summary (rich)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from rich import box
from rich.console import Group
from rich.panel import Panel
from rich.table import Table

from cloudlet.demo import Demo

ONLINE_WITHIN = 10.0  # seconds: a device heard from since is online


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
    table = Table(title="latest accepted and derived updates (on .../updates)", expand=True,
                  box=box.SIMPLE_HEAD, padding=(0, 1))  # fmt: skip
    table.add_column("service object", no_wrap=True)
    table.add_column("stream", no_wrap=True)
    table.add_column("values")
    table.add_column("simulated time", no_wrap=True)
    previous = None
    for where in sorted(latest):  # every stream, grouped by object (named on its first row)
        body = latest[where]
        so, stream = where.split(" / ", 1)
        values = ", ".join(
            f"{name}={_value(ch['current-value'])}" for name, ch in body["channels"].items()
        )
        when = datetime.fromtimestamp(body["lastUpdate"] / 1000, UTC).strftime("%a %H:%M")
        table.add_row(so if so != previous else "", stream, values, when)
        previous = so
    m = demo.metrics
    sent = demo.simulator.fleet.sent if demo.simulator else {}
    elapsed = max(0.1, time.monotonic() - demo.started)
    # an update late for its window was accepted (it went to the late side output): not a
    # rejection
    rejected = ", ".join(
        f"{k.split(':', 1)[1]}={int(v)}"
        for k, v in sorted(m.items())
        if k.startswith("cloudlet_updates_rejected_total:") and not k.endswith(":late")
    )
    late = int(m.get("cloudlet_updates_late_total", 0))
    stats = Table.grid(padding=(0, 2))
    devices = len(demo.simulator.simulation.model.device_ids) if demo.simulator else 0
    online = demo.observed.online(ONLINE_WITHIN)
    stats.add_row("devices online", f"{online} of {devices} simulated ({demo.settings.scenario}),"
                  f" heard from in the last {ONLINE_WITHIN:.0f} s")  # fmt: skip
    total_sent = sum(sent.values())
    stats.add_row("in", f"{total_sent} messages ({total_sent / elapsed:.0f}/s)")
    received = int(m.get("cloudlet_messages_received_total", 0))
    stats.add_row("unit", f"{received} received, "
                  f"{int(m.get('cloudlet_updates_accepted_total', 0))} accepted")  # fmt: skip
    stats.add_row("rejected", rejected or "none")
    stats.add_row("late", f"{late} updates accepted after their window closed (the late side"
                  " output)" if late else "none")  # fmt: skip
    stats.add_row("derived", f"{derived} updates ({derived / elapsed:.0f}/s out of the flows)")
    stats.add_row("actuations", f"{int(m.get('cloudlet_actuations_sent_total', 0))} commands")
    stats.add_row("outbox", f"{int(m.get('cloudlet_outbox_depth', 0))} waiting, "
                  f"{demo._stored()} in the cloud store")  # fmt: skip
    seen = ", ".join(f"{r}={n}" for r, n in sorted(letters.items())) or "none"
    stats.add_row("subscribers saw", f"{updates} updates; dead letters: {seen}")
    if demo.cloud is not None:
        stats.add_row("dashboard", f"{demo.cloud.url}/")
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
    rejected = ", ".join(f"{k}={v}" for k, v in sorted(unit["rejected"].items()) if k != "late")
    table.add_row("unit: rejected by reason", rejected or "none")
    if unit["rejected"].get("late"):
        table.add_row("unit: late (accepted, late side output)", str(unit["rejected"]["late"]))
    seen = summary["observed"]
    table.add_row("seen on .../updates", str(seen["updates"]))
    derived = ", ".join(f"{k}={v}" for k, v in sorted(seen["derived"].items()))
    table.add_row("derived (flows) seen", derived or "none yet")
    table.add_row("commands sent by rules", str(unit["actuations"]))
    openings = ", ".join(f"{k}={v}" for k, v in sorted(summary["valve_openings"].items()))
    if openings:
        table.add_row("valves opened", openings)
    letters = ", ".join(f"{k}={v}" for k, v in sorted(seen["dead_letters"].items()))
    table.add_row("seen on the dead-letter topic", letters or "none")
    cloud = summary["cloud"]
    table.add_row("cloud objects stored", f"{cloud['stored']} updates, streams:"
                  f" {', '.join(cloud['streams'])}")  # fmt: skip
    if cloud["missing"]:
        table.add_row("not in the cloud yet", ", ".join(cloud["missing"]))
    if not summary["lossless"]:
        verdict = "[red]some updates or dead letters are missing[/]"
    elif cloud["missing"]:  # what the flows had not produced yet: a window still open
        verdict = (
            "[green]every update arrived, derived ones too, and every one produced reached the"
            " cloud; every fault was rejected for the right reason[/] [yellow](not produced"
            f" yet, their first window still open: {', '.join(cloud['missing'])})[/]"
        )
    else:
        verdict = (
            "[green]every update arrived, derived ones too, and reached the cloud; every fault"
            " was rejected for the right reason[/]"
        )
    table.add_row("verdict", verdict)
    return table
