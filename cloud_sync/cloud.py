"""`cloudlet cloud serve`: cloud objects, materialised from Kafka, with a REST API.

```yaml
# cloud.yaml
store: sqlite:///cloud.db            # or postgresql://user@host:5432/db
kafka: {bootstrap_servers: "kafka:9092", topic: cloudlet.updates, group: cloudlet-cloud}
http: {host: 0.0.0.0, port: 8000}
public: ["air-*"]                     # objects anyone may read
tokens:
  - {token_env: FARM_TOKEN, objects: ["field-*", "rain-gauge-*", "weather-*"]}
```

The consumer group writes each batch to the store, then commits its offsets: a crash
re-reads at most the last batch, and the store's idempotent writes (by message id) make that
harmless. A record that is not a cloudlet record is logged and counted, never silently
skipped. Without `kafka`, the service only answers queries (the embedded default: the unit's
forwarder writes into the same store).
"""

from __future__ import annotations

import asyncio
import fnmatch
import hmac
import logging
import math
import secrets
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
import yaml
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from cloud_sync.alarms import AlarmRule, AlarmWatcher, Notifier, NotifySettings
from cloud_sync.commands import command_record
from cloud_sync.dashboard import (
    ASSETS,
    PAGE,
    Dashboard,
    HealthHistory,
    chart_data,
    page_policy,
    site_data,
)
from cloud_sync.registry import FleetRegistry
from cloud_sync.registry_api import install
from cloud_sync.registry_sync import RegistryPublisher, Worker
from cloud_sync.settings import CommandTopics
from cloud_sync.store import CloudMessage, CloudStore, open_store
from streams.actuation import Actuation
from streams.transport.web import BackgroundServer, Token, bearer, local_docs

log = logging.getLogger(__name__)
MIN_MS, MAX_MS = -(2**63), 2**63 - 1  # times in the store are signed 64-bit milliseconds


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReadToken(Token):
    objects: list[str] = Field(min_length=1)  # glob patterns of the objects it may read
    actuate: list[str] = Field(default_factory=list)  # and those it may send commands to
    # and register, change, remove (`register` in the file: a name pydantic's models have)
    may_register: list[str] = Field(default_factory=list, alias="register")
    name: str | None = None  # who it is, in the registry's history


class SiteKey(Token):
    """A site's key (`token` or `token_env`): the MQTT secrets of the devices registered for
    the site are derived from it, and the site holds the same key (`forward.provision`)."""

    name: str  # the site


class ConsumerSettings(_Strict):
    bootstrap_servers: str
    topic: str = "cloudlet.updates"
    group: str = "cloudlet-cloud"
    # records that cannot be stored go here (with the reason in a header), then are
    # committed past: one bad record never stops the cloud
    dead_letter_topic: str = "cloudlet.updates.dead-letter"
    commands: CommandTopics = CommandTopics()
    # more topics of the same records: the derived updates of cloud-tier units
    # (`processors.kafka_source`, their `outputs`: `cloudlet.derived`)
    topics: list[str] = []
    registry_topic: str = "cloudlet.registry"  # the registry's changes, to the cloudlets
    registry_changes_topic: str = "cloudlet.registry.changes"  # and those the sites made


class CloudSettings(_Strict):
    store: str = "sqlite:///cloud.db"
    kafka: ConsumerSettings | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    public: list[str] = []
    tokens: list[ReadToken] = []
    site_keys: list[SiteKey] = []  # a create for one of these sites answers MQTT credentials
    # the fleet's flow files (as deployed to the sites): registry changes that would break
    # their flows or rules are refused (409, naming what breaks)
    flows: list[Path] = []
    dashboard: Path | None = None  # the charts (a scenario's dashboard.yaml)
    alarms: list[AlarmRule] = []  # what alert streams raise (cloud_sync.alarms)
    notify: NotifySettings | None = None  # each alarm transition: a webhook, an MQTT topic
    units: list[str] = []  # the units' /metrics, for the dashboard's health table

    @classmethod
    def load(cls, path: Path) -> CloudSettings:
        """The settings in a YAML file (`http: {host, port}` may group the server's);
        ValidationError or OSError / YAMLError as they come."""
        doc = yaml.safe_load(path.read_text()) or {}
        http = doc.pop("http", None) or {}
        return cls.model_validate({**doc, **http})


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.consumed = Counter("cloudlet_cloud_records", "Kafka records consumed", registry=r)
        self.stored = Counter("cloudlet_cloud_updates_stored", "New updates stored", registry=r)
        self.duplicates = Counter("cloudlet_cloud_duplicates", "Records already stored (by"
                                  " message id)", registry=r)  # fmt: skip
        self.rejected = Counter("cloudlet_cloud_records_rejected", "Records that could not be"
                                " stored (dead-lettered), by reason", ["reason"],
                                registry=r)  # fmt: skip
        self.store_retries = Counter("cloudlet_cloud_store_retries", "Store writes that failed"
                                     " on the store being away and were retried",
                                     registry=r)  # fmt: skip
        self.requests = Counter("cloudlet_cloud_requests", "API requests by status", ["status"],
                                registry=r)  # fmt: skip


class Materializer(Worker):
    """The consumer group: Kafka records into the store, exactly once by message id."""

    def __init__(self, store: CloudStore, settings: ConsumerSettings, metrics: _Metrics) -> None:
        super().__init__("cloudlet-materializer")
        self.store, self.settings, self.metrics = store, settings, metrics
        self.ready = threading.Event()

    async def _run(self) -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
        from aiokafka.errors import KafkaError

        delay = 1.0
        while not self._stop.is_set():
            consumer = AIOKafkaConsumer(
                self.settings.topic, self.settings.commands.status, *self.settings.topics,
                bootstrap_servers=self.settings.bootstrap_servers,
                group_id=self.settings.group, enable_auto_commit=False,
                auto_offset_reset="earliest", metadata_max_age_ms=5_000,
                # cloud-tier units write in transactions: what a fenced one aborted is not read
                isolation_level="read_committed",
            )  # fmt: skip
            producer = AIOKafkaProducer(
                bootstrap_servers=self.settings.bootstrap_servers, acks="all"
            )
            try:
                await consumer.start()
                await producer.start()
                self.ready.set()
                while not self._stop.is_set():
                    batches = await consumer.getmany(timeout_ms=500, max_records=2000)
                    records = [r for rs in batches.values() for r in rs]
                    if records:
                        await self._handle(records, producer)
                        await consumer.commit()  # after the store (or the dead letters) has them
                    delay = 1.0
            except KafkaError as exc:
                log.warning("cloud consumer: %s; reconnecting", exc)
            except Exception as exc:  # the store away, or a bug: back off, re-read, go on
                self.ready.clear()
                if not self.store.transient(exc):
                    log.exception("cloud consumer failed; starting again in %.0f s", delay)
                else:
                    self.metrics.store_retries.inc()
                    log.warning("store unavailable (%s); retrying in %.0f s", exc, delay)
            finally:
                await consumer.stop()
                await producer.stop()
            if not self._stop.is_set():
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def _handle(self, records: list[Any], producer: Any) -> None:
        """Store a batch of records; each that cannot be stored goes to the dead-letter topic
        with its reason. The store being away raises (the batch is read again later)."""
        messages: list[tuple[Any, CloudMessage]] = []
        for r in records:
            if r.topic == self.settings.commands.status:
                try:
                    await asyncio.to_thread(self._status, r.value)
                except Exception as exc:
                    if self.store.transient(exc):
                        raise
                    await self._dead_letter(producer, r, "internal_error", exc)
                continue
            self.metrics.consumed.inc()
            try:
                messages.append((r, CloudMessage.from_record(orjson.loads(r.value))))
            except (ValueError, orjson.JSONDecodeError) as exc:
                await self._dead_letter(producer, r, "not_a_record", exc)
            except Exception as exc:
                await self._dead_letter(producer, r, "internal_error", exc)
        if not messages:
            return
        try:
            new = await asyncio.to_thread(self.store.write, [m for _, m in messages])
        except Exception as exc:
            if self.store.transient(exc):
                raise
            new = 0  # one the store refuses: find it, store the rest
            for r, m in messages:
                try:
                    new += await asyncio.to_thread(self.store.write, [m])
                except Exception as one:
                    if self.store.transient(one):
                        raise
                    await self._dead_letter(producer, r, "store_refused", one)
        self.metrics.stored.inc(new)
        self.metrics.duplicates.inc(len(messages) - new)

    async def _dead_letter(self, producer: Any, record: Any, reason: str, exc: Exception) -> None:
        self.metrics.rejected.labels(reason).inc()
        text = f"{type(exc).__name__}: {str(exc)[:500]}"
        log.error("%s[%d]@%d dead-lettered (%s): %s", record.topic, record.partition,
                  record.offset, reason, text)  # fmt: skip
        headers = [("reason", reason.encode()), ("error", text.encode()),
                   ("topic", record.topic.encode()),
                   ("partition", str(record.partition).encode()),
                   ("offset", str(record.offset).encode())]  # fmt: skip
        await producer.send_and_wait(self.settings.dead_letter_topic, record.value,
                                     key=record.key, headers=headers)  # fmt: skip

    def _status(self, value: bytes) -> None:
        try:
            doc = orjson.loads(value)
            known = self.store.command_status(str(doc["id"]), str(doc["status"]),
                                              int(doc["at"]), doc.get("message"))  # fmt: skip
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            log.error("a command status that cannot be read: %s", exc)
            return
        if not known:
            log.warning("status for a command this cloud did not send: %s", doc.get("id"))


class CloudService:
    def __init__(self, settings: CloudSettings, store: CloudStore | None = None) -> None:
        self.settings = settings
        self.store = store or open_store(settings.store)
        self.metrics = _Metrics()
        self.grants = [(t.secret().encode(), t.objects, t.actuate) for t in settings.tokens]
        self.registry = FleetRegistry(
            self.store, {k.name: k.secret().encode() for k in settings.site_keys}, settings.flows
        )
        kafka = settings.kafka  # the registry's changes go to the cloudlets through it
        self.publisher = RegistryPublisher(
            self.registry, kafka.bootstrap_servers, kafka.registry_topic,
            kafka.registry_changes_topic) if kafka else None  # fmt: skip
        self._producer: Any = None
        self.materializer = (
            Materializer(self.store, settings.kafka, self.metrics) if settings.kafka else None
        )
        self.notifier = Notifier(settings.notify) if settings.notify and settings.alarms else None
        self.health = HealthHistory(settings.units)  # the units' rates over time
        self.alarms = (
            AlarmWatcher(self.store, settings.alarms, self.notifier) if settings.alarms else None
        )
        # who each token is, in the alarms' history
        self.names = [(t.secret().encode(), t.name or f"token {i + 1}")
                      for i, t in enumerate(settings.tokens)]  # fmt: skip
        self.app = self._app()
        self.port = settings.port
        self._server: BackgroundServer | None = None

    # access ----------------------------------------------------------------------------------

    def _readable(self, request: Request) -> list[str]:
        """The object patterns the caller may read: the public ones, and its token's."""
        patterns = list(self.settings.public)
        token = bearer(request.headers.get("authorization", ""))
        if token:
            for secret, allowed, _actuate in self.grants:
                if hmac.compare_digest(token, secret):
                    return patterns + allowed
            raise HTTPException(401, "unknown token")
        return patterns

    def _operator(self, request: Request) -> None:
        """What is about the site rather than one object (units' health, our metrics): any
        known token; nobody without one, unless every object is public by choice."""
        token = bearer(request.headers.get("authorization", ""))
        if token:
            if any(hmac.compare_digest(token, secret) for secret, _o, _a in self.grants):
                return
            raise HTTPException(401, "unknown token")
        if "*" not in self.settings.public:
            raise HTTPException(401, "send Authorization: Bearer <token>")

    @staticmethod
    def _may(patterns: list[str], so: str) -> bool:
        return any(fnmatch.fnmatchcase(so, p) for p in patterns)

    def _actuator(self, request: Request, so: str) -> None:
        token = bearer(request.headers.get("authorization", ""))
        for secret, _objects, actuate in self.grants:
            if token and hmac.compare_digest(token, secret):
                if self._may(actuate, so):
                    return
                raise HTTPException(403, f"this token may not send commands to {so!r}")
        raise HTTPException(401, "commands need a token that grants them")

    def _actuations(self, request: Request) -> list[str]:
        """The object patterns the caller's token may send commands to (none without one)."""
        token = bearer(request.headers.get("authorization", ""))
        for secret, _objects, actuate in self.grants:
            if token and hmac.compare_digest(token, secret):
                return list(actuate)
        return []

    def _who(self, request: Request) -> str:
        """The name of the caller's token: acknowledging and clearing need one."""
        token = bearer(request.headers.get("authorization", ""))
        for secret, name in self.names:
            if token and hmac.compare_digest(token, secret):
                return name
        raise HTTPException(401, "acknowledging or clearing an alarm needs a token")

    def _check(self, request: Request, so: str) -> None:
        if not self._may(self._readable(request), so):
            # the same answer as for an object that does not exist: private stays private
            raise HTTPException(404, f"no service object {so!r} (or not yours to read)")

    # API -------------------------------------------------------------------------------------

    def _app(self) -> FastAPI:
        app = FastAPI(  # /docs served with local assets (local_docs), no ReDoc (a CDN's)
            docs_url=None,
            redoc_url=None,
            title="cloudlet cloud objects",
            description="What the cloudlets forwarded, per service object and stream.",
        )
        local_docs(app, app.title)
        app.mount("/assets", StaticFiles(directory=ASSETS), name="assets")  # the page's charts
        store = self.store

        @app.middleware("http")
        async def count(request: Request, call_next: Any) -> Response:
            response: Response = await call_next(request)
            self.metrics.requests.labels(str(response.status_code)).inc()
            return response

        @app.get("/objects")
        def objects(request: Request) -> list[dict[str, Any]]:
            """The service objects you may read, with their streams."""
            readable = self._readable(request)
            return [o for o in store.objects() if self._may(readable, o["id"])]

        @app.get("/objects/{so}/streams/{stream}/lastUpdate")
        def last(so: str, stream: str, request: Request) -> dict[str, Any]:
            """The newest update of a stream (by lastUpdate)."""
            self._check(request, so)
            found = store.last(so, stream)
            if found is None:
                raise HTTPException(404, f"{so}/{stream} has no update yet")
            return found

        @app.get("/objects/{so}/streams/{stream}")
        def history(
            so: str, stream: str, request: Request,
            start: Annotated[int | None, Query(alias="from", description="ms, inclusive",
                                               ge=MIN_MS, le=MAX_MS)] = None,
            end: Annotated[int | None, Query(alias="to", description="ms, exclusive",
                                             ge=MIN_MS, le=MAX_MS)] = None,
            limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
            cursor: str | None = None,
        ) -> dict[str, Any]:  # fmt: skip
            """Updates in a time range, oldest first, a page at a time (follow `next`)."""
            self._check(request, so)
            try:
                page = store.history(so, stream, start=start, end=end, limit=limit,
                                     cursor=cursor)  # fmt: skip
            except ValueError as exc:
                raise HTTPException(400, str(exc)) from None
            return {"updates": page.updates, "next": page.next}

        @app.get("/search/{stream}")
        def search(
            stream: str, request: Request,
            channel: str | None = None,
            minimum: Annotated[float | None, Query(alias="min", allow_inf_nan=False)] = None,
            maximum: Annotated[float | None, Query(alias="max", allow_inf_nan=False)] = None,
            near: Annotated[str | None, Query(description="lat,lon,radius in metres")] = None,
            bbox: Annotated[str | None, Query(description="minLat,minLon,maxLat,maxLon")] = None,
            start: Annotated[int | None, Query(alias="from", ge=MIN_MS, le=MAX_MS)] = None,
            end: Annotated[int | None, Query(alias="to", ge=MIN_MS, le=MAX_MS)] = None,
            limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
        ) -> dict[str, Any]:  # fmt: skip
            """Updates of a stream by a numeric range of a channel, or by distance from a point
            or a bounding box on a geo_point channel, within a time range; newest first."""
            readable = self._readable(request)
            mine = [o["id"] for o in store.objects() if self._may(readable, o["id"])]
            try:
                circle = _floats(near, 3, "near") if near else None
                box = _floats(bbox, 4, "bbox") if bbox else None
            except ValueError as exc:
                raise HTTPException(400, str(exc)) from None
            found = store.search(
                stream, channel=channel, minimum=minimum, maximum=maximum,
                near=(circle[0], circle[1], circle[2]) if circle else None,
                bbox=(box[0], box[1], box[2], box[3]) if box else None,
                start=start, end=end, objects=mine, limit=limit,
            )  # fmt: skip
            return {"updates": found}

        @app.post("/objects/{so}/actions/{action}", status_code=202)
        async def act(so: str, action: str, request: Request) -> dict[str, Any]:
            """Send a command to a device through its cloudlet; follow it at /commands/{id}."""
            self._check(request, so)
            self._actuator(request, so)
            if self.settings.kafka is None:
                raise HTTPException(503, "no command path: this cloud has no kafka configured")
            try:
                body = orjson.loads(await request.body() or b"{}")
                parameters = body.get("parameters", {}) if isinstance(body, dict) else None
            except orjson.JSONDecodeError:
                parameters = None
            if not isinstance(parameters, dict):
                raise HTTPException(400, 'the body must be {"parameters": {...}}')
            site = await asyncio.to_thread(store.site_of, so)
            if site is None:
                raise HTTPException(404, f"no cloudlet has reported {so!r} yet")
            command = Actuation(so, action, parameters, issued_at=int(time.time() * 1000))
            await asyncio.to_thread(store.add_command, command.id, site, so, action,
                                    parameters, command.issued_at)  # fmt: skip
            await self._send_command(command, site)
            return {"id": command.id, "site": site, "status": "submitted"}

        @app.get("/commands/{command_id}")
        def command(command_id: str, request: Request) -> dict[str, Any]:
            """A command's status and the history of its reports."""
            found = store.command(command_id)
            if found is None:
                raise HTTPException(404, f"no command {command_id!r}")
            self._check(request, found["so"])
            return found

        dashboard = Dashboard.load(self.settings.dashboard)

        @app.get("/", include_in_schema=False)
        def page(request: Request) -> Response:
            accept, headers = request.headers.get("accept", ""), request.headers
            if "text/html" not in accept and ("application/json" in accept
                                              or "authorization" in headers):  # fmt: skip
                # ServIoTicy's `GET /` (its clients send their token); a browser: the page
                readable = self._readable(request)
                return JSONResponse([so for so in self.registry.ids() if self._may(readable, so)])
            # Only our own script runs (a nonce per answer); device-provided strings are text
            # anyway (dashboard.esc), this is the second line.
            nonce = secrets.token_urlsafe(16)
            return HTMLResponse(
                PAGE.replace("<script", f'<script nonce="{nonce}"'),
                headers={"Content-Security-Policy": page_policy(nonce),
                         "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"},
            )  # fmt: skip

        @app.get("/api/dashboard")
        def dashboard_data(request: Request) -> dict[str, Any]:
            """The dashboard's charts: lines per object (or per a channel's value) and marks
            (401 when nothing is public and no token was sent: the page asks to sign in)."""
            readable = self._readable(request)
            if not readable:
                raise HTTPException(401, "sign in with a token: nothing here is public")
            return chart_data(store, dashboard, lambda so: self._may(readable, so))

        @app.get("/api/site")
        def site(request: Request) -> dict[str, Any]:
            """The page's other panels: latest values per object and stream, the actuators
            with their state and buttons, and the plan (objects by their geo_point)."""
            readable = self._readable(request)
            if not readable:
                raise HTTPException(401, "sign in with a token: nothing here is public")
            grants = self._actuations(request)
            return site_data(store, dashboard, lambda so: self._may(readable, so),
                             lambda so: self._may(grants, so))  # fmt: skip

        @app.get("/api/health")
        def health(request: Request) -> list[dict[str, Any]]:
            """The cloudlet units' counters, from their /metrics (a token, unless every
            object is public)."""
            self._operator(request)
            return self.health.health()

        @app.get("/healthz", include_in_schema=False)
        def healthz() -> PlainTextResponse:
            ok = self.alive
            return PlainTextResponse("ok" if ok else "the Kafka consumer stopped",
                                     status_code=200 if ok else 503)  # fmt: skip

        @app.get("/readyz", include_in_schema=False)
        def readyz() -> PlainTextResponse:
            ok = self.alive and (self.materializer is None or self.materializer.ready.is_set())
            return PlainTextResponse("ready" if ok else "not consuming (see the log)",
                                     status_code=200 if ok else 503)  # fmt: skip

        @app.get("/metrics", include_in_schema=False)
        def metrics(request: Request) -> Response:
            self._operator(request)
            return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        self._alarm_api(app)
        install(app, self, self.registry)  # `/{soId}`: after every other path

        @app.exception_handler(HTTPException)
        async def error(_request: Request, exc: HTTPException) -> JSONResponse:
            return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

        return app

    def _alarm_api(self, app: FastAPI) -> None:
        store = self.store

        @app.get("/alarms")
        def alarms(
            request: Request, state: Literal["active", "cleared", "all"] = "active",
            limit: int = Query(100, ge=1, le=10_000),
        ) -> list[dict[str, Any]]:  # fmt: skip
            """Alarms of the objects you may read, newest first: active ones (by default),
            cleared ones, or all, each with its history (raised, acknowledged, cleared: when
            and by whom)."""
            readable = self._readable(request)
            active = {"active": True, "cleared": False, "all": None}[state]
            return [a for a in store.alarms(active, limit) if self._may(readable, a["so"])]

        @app.get("/alarms/{id}")
        def alarm(id: str, request: Request) -> dict[str, Any]:
            """One alarm, with its history."""
            found = store.alarm(id)
            if found is None or not self._may(self._readable(request), found["so"]):
                raise HTTPException(404, f"no alarm {id!r} (or not yours to read)")
            return found

        def step(id: str, request: Request, to: str) -> dict[str, Any]:
            who = self._who(request)
            found = store.alarm(id)
            if found is None or not self._may(self._readable(request), found["so"]):
                raise HTTPException(404, f"no alarm {id!r} (or not yours to read)")
            done = store.alarm_step(id, to, int(time.time() * 1000), who)
            assert done is not None
            changed, result = done
            if changed and self.notifier is not None:
                self.notifier.notify(to, result)
            return result

        @app.post("/alarms/{id}/ack")
        def acknowledge(id: str, request: Request) -> dict[str, Any]:
            """Acknowledge an alarm (a token that may read its object); again: no change."""
            return step(id, request, "acknowledged")

        @app.post("/alarms/{id}/clear")
        def clear(id: str, request: Request) -> dict[str, Any]:
            """Clear an alarm by hand; it comes again only when its condition goes away and
            comes back."""
            return step(id, request, "cleared")

    async def _send_command(self, command: Actuation, site: str) -> None:
        from aiokafka import AIOKafkaProducer

        assert self.settings.kafka is not None
        if self._producer is None:  # made in the API's event loop, where it is used
            self._producer = AIOKafkaProducer(
                bootstrap_servers=self.settings.kafka.bootstrap_servers, acks="all"
            )
            await self._producer.start()
        topic = self.settings.kafka.commands.commands
        await self._producer.send_and_wait(topic, command_record(command, site), key=site.encode())

    # lifecycle -------------------------------------------------------------------------------

    def start(self) -> CloudService:
        if self.settings.units:
            self.health.start()
        if self.notifier is not None:
            self.notifier.start()
        if self.alarms is not None:
            self.alarms.start()
        if self.materializer is not None:
            self.materializer.start()
        if self.publisher is not None:
            self.publisher.start()
        self._server = BackgroundServer(
            self.app, self.settings.host, self.settings.port, "cloudlet-cloud-api"
        ).start()
        self.port = self._server.port
        return self

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.port}"

    @property
    def alive(self) -> bool:
        """Every background thread runs (`cloudlet cloud serve` exits non-zero otherwise)."""
        threads = (self.materializer, self.publisher, self.alarms)
        return all(w is None or w.alive for w in threads) and (
            not self.settings.units or self.health.alive
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
        if self.publisher is not None:
            self.publisher.stop()
        if self.materializer is not None:
            self.materializer.stop()
        if self.alarms is not None:
            self.alarms.stop()
        if self.notifier is not None:
            self.notifier.stop()
        self.health.stop()
        self.store.close()


def _floats(text: str, n: int, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        values = ()
    if len(values) != n or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{what} must be {n} comma-separated numbers, got {text[:200]!r}")
    return values
