"""The dashboard: live charts of cloud objects and the cloudlets' health, on one page.

Charts are declared per scenario (`dashboard.yaml`), and the page asks the service for their
data every two seconds; it needs nothing from the internet (the machines running a cloudlet
often cannot reach it), so the charts are drawn with the browser's canvas, by a few dozen lines
of our own script.

```yaml
title: Irrigation
charts:
  - title: Soil moisture, 10-minute average (%)
    stream: moisture_10min          # one line per object with this stream
    channel: moisture
    marks:                           # ticks, labelled, a colour per kind
      - {stream: state, channel: open, label: valve open}   # when a channel is true (or > 0)
      - {stream: irrigate, when: update, label: irrigate}   # whenever the stream has an update
  - {title: Free bays per zone, stream: free_1m, channel: free, series: key}  # lines by a channel
```
"""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any, Literal

import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cloud_sync.store import CloudStore


class Mark(BaseModel):
    """A tick on a chart, labelled, coloured by its kind: when `channel` is true (or > 0), or
    (`when: update`) whenever the stream has an update (an alert stream that only speaks
    when alerting, as `full` with its post-filter `free == 0`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    stream: str
    channel: str | None = None
    label: str
    when: Literal["true", "update"] = "true"

    @model_validator(mode="after")
    def _what(self) -> Mark:
        if self.when == "true" and self.channel is None:
            raise ValueError(f"mark {self.label!r}: name its channel, or say when: update")
        return self


class Chart(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    title: str
    stream: str
    channel: str
    series: str | None = None  # a channel whose value names the line (default: the object)
    points: int = Field(default=240, ge=2, le=5000)
    marks: list[Mark] = []


class Dashboard(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    title: str = "cloudlet"
    charts: list[Chart] = []

    @classmethod
    def load(cls, path: Path | None) -> Dashboard:
        if path is None:
            return cls()
        return cls.model_validate(yaml.safe_load(path.read_text()) or {})


def _value(update: dict[str, Any], channel: str) -> Any:
    found = (update.get("channels") or {}).get(channel)
    return found.get("current-value") if isinstance(found, dict) else None


def _fires(mark: Mark, update: dict[str, Any]) -> bool:
    if mark.when == "update":
        return True
    assert mark.channel is not None
    v = _value(update, mark.channel)
    return v is True or (not isinstance(v, bool) and isinstance(v, int | float) and v > 0)


def chart_data(store: CloudStore, dashboard: Dashboard, readable: Any) -> dict[str, Any]:
    """Every chart's lines and marks, from the objects the caller may read: one query per
    stream a chart shows (its line, each mark), whatever the number of objects."""
    charts = []
    for chart in dashboard.charts:
        lines: dict[str, list[list[float]]] = {}
        for so, updates in store.recent_of_stream(chart.stream, chart.points).items():
            if not readable(so):
                continue
            for u in updates:
                v = _value(u, chart.channel)
                if isinstance(v, bool) or not isinstance(v, int | float):
                    continue
                name = str(_value(u, chart.series)) if chart.series else so
                lines.setdefault(name, []).append([u["lastUpdate"], v])
        marks: list[dict[str, Any]] = []
        for mark in chart.marks:
            for so, updates in store.recent_of_stream(mark.stream, chart.points).items():
                if readable(so):
                    marks += [{"t": u["lastUpdate"], "kind": mark.label, "so": so,
                               "label": f"{mark.label}: {so}"}
                              for u in updates if _fires(mark, u)]  # fmt: skip
        marks.sort(key=lambda m: int(m["t"]))
        charts.append({"title": chart.title, "lines": [{"name": n, "points": sorted(p)}
                                                       for n, p in sorted(lines.items())],
                       "marks": marks})  # fmt: skip
    return {"title": dashboard.title, "charts": charts}


_HEALTH = {
    "cloudlet_messages_received_total": "received",
    "cloudlet_updates_accepted_total": "accepted",
    "cloudlet_updates_derived_total": "derived",
    "cloudlet_dead_letters_total": "dead_letters",
    "cloudlet_actuations_sent_total": "actuations",
    "cloudlet_outbox_depth": "outbox_depth",
    "cloudlet_forwarded_records_total": "forwarded",
}


def unit_health(urls: list[str]) -> list[dict[str, Any]]:
    """Each unit's counters from its /metrics (up: false when it does not answer)."""
    out = []
    for url in urls:
        entry: dict[str, Any] = {"url": url, "up": False, "rejected": {}}
        try:
            text = urllib.request.urlopen(url, timeout=2).read().decode()
        except OSError:
            out.append(entry)
            continue
        entry["up"] = True
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "cloudlet_updates_rejected_total":
                    entry["rejected"][s.labels["reason"]] = s.value
                elif s.name in _HEALTH:
                    key = _HEALTH[s.name]
                    entry[key] = entry.get(key, 0) + s.value
                    if "unit" in s.labels:
                        entry["unit"] = s.labels["unit"]
        out.append(entry)
    return out


def page_policy(nonce: str) -> str:
    """The dashboard page's Content-Security-Policy: its own script (by nonce), its own API,
    nothing from elsewhere, never framed."""
    return (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline';"
        " img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none';"
        " frame-ancestors 'none'"
    )


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cloudlet</title>
<style>
 body{font:14px system-ui,sans-serif;margin:16px;background:#fafafa;color:#222}
 h1{font-size:20px;margin:0 0 12px} .grid{display:grid;grid-template-columns:1fr 1fr;gap:12px}
 .card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px}
 .card h2{font-size:14px;margin:0 0 6px} canvas{width:100%;height:220px}
 .legend span{margin-right:10px;font-size:12px} table{border-collapse:collapse;width:100%}
 td,th{padding:2px 6px;border-bottom:1px solid #eee;text-align:left;font-size:12px}
 tr.critical td,tr.major td{color:#b00} tr.minor td,tr.warning td{color:#a60}
 #signin{margin:0 0 12px} #who{font-size:12px;color:#666}
</style></head><body>
<h1 id="title">cloudlet</h1>
<form id="signin"><input id="token" type="password" placeholder="token" autocomplete="off">
<button>sign in</button> <span id="who"></span> <button type="button" id="signout">sign out</button>
</form>
<div class="card" id="health"><h2>cloudlet health</h2><table id="units"></table></div>
<div class="card" id="alarms"><h2>active alarms</h2><table id="alarm-rows"></table></div>
<div class="grid" id="charts"></div>
<script>
const COLORS=["#1f77b4","#ff7f0e","#2ca02c","#d62728","#9467bd","#8c564b","#e377c2","#17becf"];
const MARKS=["#d62728","#9467bd","#8c564b","#e377c2"];
function draw(card, chart){
  const canvas=card.querySelector("canvas"), ctx=canvas.getContext("2d");
  const w=canvas.width=canvas.clientWidth*2, h=canvas.height=canvas.clientHeight*2;
  ctx.clearRect(0,0,w,h);
  const pts=chart.lines.flatMap(l=>l.points);
  card.dataset.points=pts.length; card.dataset.marks=chart.marks.length;
  ctx.font="22px sans-serif";ctx.fillStyle="#888";
  if(!pts.length){ctx.fillText("no data yet",20,40);return;}
  let t0=Math.min(...pts.map(p=>p[0])), t1=Math.max(...pts.map(p=>p[0]));
  let v0=Math.min(...pts.map(p=>p[1])), v1=Math.max(...pts.map(p=>p[1]));
  if(t1===t0)t1=t0+1; if(v1===v0){v1+=1;v0-=1;}
  const L=70,B=40,x=t=>L+(t-t0)/(t1-t0)*(w-L-10), y=v=>h-B-(v-v0)/(v1-v0)*(h-B-10);
  ctx.strokeStyle="#999";ctx.fillStyle="#444";ctx.font="20px sans-serif";
  ctx.beginPath();ctx.moveTo(L,5);ctx.lineTo(L,h-B);ctx.lineTo(w,h-B);ctx.stroke();
  for(const v of [v0,(v0+v1)/2,v1])ctx.fillText(v.toFixed(1),4,y(v)+6);
  [t0,t1].forEach((t,i)=>{ctx.textAlign=i?"right":"left";
    ctx.fillText(new Date(t).toISOString().slice(11,16),x(t),h-12);});ctx.textAlign="left";
  // marks: a colour per kind (the mark's label), a tick per object's firing, its object
  // named beside it when there is room
  const kinds=[...new Set(chart.marks.map(m=>m.kind))];
  const markColor=k=>MARKS[kinds.indexOf(k)%MARKS.length];
  let lastLabel=-1e9;ctx.font="16px sans-serif";
  for(const m of chart.marks){if(m.t<t0||m.t>t1)continue;
    ctx.fillStyle=markColor(m.kind);ctx.globalAlpha=0.45;ctx.fillRect(x(m.t)-2,5,4,h-B-5);
    ctx.globalAlpha=1;if(x(m.t)-lastLabel>120){ctx.fillText(m.so,x(m.t)+4,22);lastLabel=x(m.t);}}
  chart.lines.forEach((l,i)=>{ctx.strokeStyle=COLORS[i%COLORS.length];ctx.lineWidth=3;
    ctx.beginPath();l.points.forEach((p,j)=>j?ctx.lineTo(x(p[0]),y(p[1])):ctx.moveTo(x(p[0]),y(p[1])));
    ctx.stroke();});
  card.querySelector(".legend").innerHTML=chart.lines.map((l,i)=>
    `<span style="color:${COLORS[i%COLORS.length]}">&#9632; ${esc(l.name)}</span>`).join("")+
    kinds.map(k=>`<span class="mark" style="color:${markColor(k)}">&#9646; ${esc(k)}`+
      ` (${chart.marks.filter(m=>m.kind===k).length})</span>`).join("");
}
// Signing in: a token kept for the browser session (sessionStorage), sent with every request;
// `#token=...` in the address does the same, and is taken out of the address at once.
let token=sessionStorage.getItem("cloudlet-token")||"";
if(location.hash.startsWith("#token=")){
  token=decodeURIComponent(location.hash.slice(7));sessionStorage.setItem("cloudlet-token",token);
  history.replaceState(null,"",location.pathname+location.search);}
function get(path){return fetch(path,{headers:token?{"Authorization":"Bearer "+token}:{}});}
function signedIn(){document.getElementById("who").textContent=token?"signed in":"not signed in";}
document.getElementById("signin").addEventListener("submit",e=>{e.preventDefault();
  token=document.getElementById("token").value.trim();
  sessionStorage.setItem("cloudlet-token",token);document.getElementById("token").value="";
  signedIn();refresh();});
document.getElementById("signout").addEventListener("click",()=>{token="";
  sessionStorage.removeItem("cloudlet-token");signedIn();refresh();});
signedIn();
// Acknowledge or clear an alarm (signed in: the API says who, with the token's name).
document.getElementById("alarm-rows").addEventListener("click",async e=>{
  const b=e.target.closest("button[data-alarm]");if(!b)return;b.disabled=true;
  const r=await fetch(`alarms/${encodeURIComponent(b.dataset.alarm)}/${b.dataset.step}`,
    {method:"POST",headers:{"Authorization":"Bearer "+token}});
  if(!r.ok)document.getElementById("who").textContent=
    `the alarm could not be changed (${r.status})`;
  refresh();});
// Names and values come from devices: shown as text, never parsed as markup.
function esc(v){return String(v).replace(/[&<>"']/g,c=>"&#"+c.charCodeAt(0)+";");}
async function refresh(){
  try{
    const answer=await get("api/dashboard");
    if(answer.status===401){document.body.dataset.signin="needed";
      document.getElementById("who").textContent=token?"that token is not known here":
        "sign in with a token to see the charts";return;}
    delete document.body.dataset.signin;
    const d=await answer.json();
    document.getElementById("title").textContent=d.title;
    const box=document.getElementById("charts");
    d.charts.forEach((c,i)=>{let card=box.children[i];
      if(!card){card=document.createElement("div");card.className="card chart";
        card.innerHTML=`<h2></h2><canvas></canvas><div class="legend"></div>`;
        box.appendChild(card);}
      card.querySelector("h2").textContent=c.title;draw(card,c);});
    const health=await get("api/health");
    const units=health.ok?await health.json():[];
    document.getElementById("units").innerHTML="<tr><th>unit</th><th>up</th><th>received</th>"+
      "<th>accepted</th><th>derived</th><th>rejected</th><th>commands</th><th>outbox</th></tr>"+
      units.map(u=>`<tr><td>${esc(u.unit||u.url)}</td><td>${u.up?"yes":"no"}</td>`+
      `<td>${esc(u.received||0)}</td><td>${esc(u.accepted||0)}</td><td>${esc(u.derived||0)}</td>`+
      `<td>${esc(Object.entries(u.rejected).map(([k,v])=>k+"="+v).join(", ")||"none")}</td>`+
      `<td>${esc(u.actuations||0)}</td><td>${esc(u.outbox_depth||0)}</td></tr>`).join("");
    const alarms=await get("alarms");  // the alarms of the objects this page may read
    const active=alarms.ok?await alarms.json():[];
    const rows=document.getElementById("alarm-rows");
    rows.dataset.alarms=active.length;
    rows.innerHTML=active.length?"<tr><th>severity</th><th>object</th><th>alarm</th>"+
      "<th>since</th><th>state</th><th></th></tr>"+
      active.map(a=>`<tr class="alarm ${esc(a.severity)}">`+
      `<td>${esc(a.severity)}</td><td>${esc(a.so)}</td><td>${esc(a.rule)}</td>`+
      `<td>${esc(new Date(a.raisedAt).toISOString().slice(0,16).replace("T"," "))}</td>`+
      `<td>${a.acknowledged?"acknowledged":"unacknowledged"}</td><td>`+(token?
      (a.acknowledged?"":`<button data-step="ack" data-alarm="${esc(a.id)}">acknowledge</button> `)+
      `<button data-step="clear" data-alarm="${esc(a.id)}">clear</button>`:"")+
      `</td></tr>`).join("")
      :"<tr><td>none</td></tr>";
    document.body.dataset.refreshed=Date.now();
  }catch(e){document.body.dataset.error=String(e);}
}
refresh();setInterval(refresh,2000);
</script></body></html>
"""
