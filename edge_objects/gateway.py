"""The HTTP ingest gateway, for web objects that speak only HTTP.

`PUT /{soId}/streams/{streamId}` with a ServIoTicy sensor update (one, a list, or the
columnar form; JSON or msgpack) is checked against the service objects and published, as it
came, on the object's device topic with QoS 1. The answer says what happened:

- 202 accepted: the broker has the message (its PUBACK arrived); the units take it from there.
- 400 malformed body, 413 too large, 415 unsupported content type, 404 unknown object or
  stream, 409 a stream the cloudlet derives, 422 a value that does not fit its channel
  (the whole request is refused, so a corrected retry does not double anything), each with
  the reasons; 401 no token, 403 a token that does not grant that object;
  503 broker unreachable, or the broker did not confirm in time: retry. A retry of the same
  body is idempotent: if the earlier attempt reached the broker after all, it is answered 202
  and not published again.

Refused updates are also published on the dead-letter topic with their reason and counted, as
the units do for MQTT input. Tokens are per service object (glob patterns), compared in
constant time; the tokens themselves can come from environment variables.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import logging
import threading
import time
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any

import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.concurrency import run_in_threadpool

from streams import InvalidUpdate, Registry, Rejection, RejectReason, TopicScheme
from streams.catalog import Catalog
from streams.codec import DEFAULT_MAX_PAYLOAD, decode
from streams.registry import Problem, validation_problems
from streams.rejections import dead_letter_record, no_updates, show_value
from streams.transport.mqtt import (
    MqttSettings,
    connect,
    content_type_properties,
    make_client,
    refused,
    refused_because,
)
from streams.transport.web import BackgroundServer, Token, bearer, local_docs

log = logging.getLogger(__name__)
MAX_UNCONFIRMED = 10_000  # 503'd publishes remembered so that a retry does not double them
MAX_LETTER_BYTES = 16 * 1024 * 1024  # dead letters waiting for the broker; more are dropped

STATUS = {
    RejectReason.OVERSIZED: 413,
    RejectReason.UNSUPPORTED_CONTENT_TYPE: 415,
    RejectReason.MALFORMED: 400,
    RejectReason.UNKNOWN_OBJECT: 404,
    RejectReason.UNKNOWN_STREAM: 404,
    RejectReason.DERIVED_STREAM: 409,
    RejectReason.INTERNAL_ERROR: 500,
}  # anything else (a value that does not fit its channel): 422


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenGrant(Token):
    """A token and the service objects (glob patterns) it may post to."""

    objects: list[str] = Field(default=["*"], min_length=1)


class GatewaySettings(_Strict):
    """```yaml
    objects: [objects/]
    mqtt: {url: mqtt://127.0.0.1:1883}
    http: {host: 0.0.0.0, port: 8080}
    tokens:
      - {token_env: FIELD_TOKEN, objects: ["field-*"]}
      - {token: s3cret, objects: [weather-1]}
    # allow_anonymous: true     # no tokens at all (a closed network only)
    ```"""

    objects: list[Path] = Field(min_length=1)
    mqtt: MqttSettings = MqttSettings()
    topics: TopicScheme = TopicScheme()
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    max_payload: int = Field(default=DEFAULT_MAX_PAYLOAD, ge=64)
    tokens: list[TokenGrant] = []
    allow_anonymous: bool = False
    client_id: str = "cloudlet-gateway"
    publish_timeout: float = Field(default=10.0, gt=0)
    # /metrics with `Authorization: Bearer <token>` only (for a gateway on the site network)
    metrics_token: Token | None = None

    @model_validator(mode="after")
    def _some_access(self) -> GatewaySettings:
        if not self.tokens and not self.allow_anonymous:
            raise ValueError(
                "no tokens: list tokens (each with the objects it may post to), or set"
                " allow_anonymous: true for a closed network"
            )
        return self

    @classmethod
    def load(cls, path: Path) -> GatewaySettings:
        source = str(path)
        try:
            doc = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise GatewayConfigError([Problem(source, f"cannot be read: {exc}")]) from None
        if not isinstance(doc, dict):
            raise GatewayConfigError([Problem(source, "a gateway config must be a mapping")])
        http = doc.pop("http", None) or {}
        try:
            settings = cls.model_validate({**doc, **http})
        except ValidationError as exc:
            raise GatewayConfigError(validation_problems(exc, source)) from None
        return settings.model_copy(update={"objects": [path.parent / p for p in settings.objects]})


class GatewayConfigError(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("cloudlet_gateway_requests", "Requests by status", ["status"],
                                registry=self.registry)  # fmt: skip
        self.accepted = Counter("cloudlet_gateway_updates_accepted", "Sensor updates published",
                                registry=self.registry)  # fmt: skip
        self.rejected = Counter("cloudlet_gateway_updates_rejected", "Input refused, by reason",
                                ["reason"], registry=self.registry)  # fmt: skip
        self.letters_dropped = Counter(
            "cloudlet_gateway_dead_letters_dropped",
            "Dead letters not published: the broker unreachable, or too many waiting for it",
            registry=self.registry,
        )
        self.retries_deduplicated = Counter(
            "cloudlet_gateway_retries_deduplicated",
            "Retries of a 503'd request whose first attempt reached the broker after all",
            registry=self.registry,
        )


class Gateway:
    def __init__(self, settings: GatewaySettings, registry: Registry | None = None) -> None:
        self.settings = settings
        self.registry = registry or Catalog.load(settings.objects).registry
        self.topics = settings.topics
        self.grants = [(g.secret().encode(), g.objects) for g in settings.tokens]
        self.metrics = _Metrics()
        self.connected = threading.Event()
        # Its identity's name is its client id (the broker binds them), unless told otherwise.
        self.client_id = (
            settings.client_id
            if "client_id" in settings.model_fields_set
            else settings.mqtt.username or settings.client_id
        )
        self.client = make_client(settings.mqtt, self.client_id)
        self.client.on_connect = lambda _c, _u, _f, reason, _p: (
            log.error("gateway: %s", refused_because(reason, settings.mqtt, self.client_id))
            if refused(reason)
            else self.connected.set()
        )
        self.client.on_disconnect = lambda *_: self.connected.clear()
        # PUBACKs that refused a publish (the broker's ACL), by packet id: paho runs this
        # before it marks the message published, so the request sees it.
        self._refused_mids: OrderedDict[int, int] = OrderedDict()

        def on_publish(_c: object, _u: object, mid: int, reason: Any, _p: object) -> None:
            if getattr(reason, "is_failure", False):
                with self._lock:
                    self._refused_mids[mid] = int(reason.value)
                    while len(self._refused_mids) > MAX_UNCONFIRMED:
                        self._refused_mids.popitem(last=False)

        self.client.on_publish = on_publish
        # Our own thread around paho's loop (not loop_start): its death is ours to see, and
        # /healthz says so.
        self._network = threading.Thread(
            target=lambda: self.client.loop_forever(retry_first_connection=True),
            name="cloudlet-gateway-mqtt", daemon=True,
        )  # fmt: skip
        # Publishes answered 503 that paho may still deliver, by content: a retry of the same
        # body waits for that one instead of publishing a second copy.
        self._unconfirmed: OrderedDict[bytes, Any] = OrderedDict()
        self._letters: deque[tuple[Any, int]] = deque()  # dead letters waiting for the broker
        self._letter_bytes = 0
        self._lock = threading.Lock()
        self.app = self._app()
        self._server: BackgroundServer | None = None
        self.port = settings.port

    # HTTP --------------------------------------------------------------------------------

    def _app(self) -> FastAPI:
        app = FastAPI(  # /docs served with local assets (local_docs), no ReDoc (a CDN's)
            docs_url=None,
            redoc_url=None,
            title="cloudlet ingest gateway",
            description="Sensor updates from HTTP-only web objects, onto the cloudlet's broker.",
        )
        local_docs(app, app.title)

        @app.put("/{so_id}/streams/{stream_id}", status_code=202)
        async def put_update(so_id: str, stream_id: str, request: Request) -> Response:
            """Post sensor updates (one, a list, or columnar) of a stream."""
            denied = self._authorize(request, so_id)
            if denied is not None:
                return self._answer(*denied)
            body = await self._body(request)
            if body is None:
                limit = self.settings.max_payload
                return self._refuse(so_id, stream_id, b"", Rejection(
                    RejectReason.OVERSIZED, f"{so_id}/{stream_id}: the body is more than the"
                    f" limit of {limit} bytes", so_id, stream_id))  # fmt: skip
            content_type = request.headers.get("content-type")
            return await run_in_threadpool(self._post, so_id, stream_id, body, content_type)

        @app.get("/healthz", include_in_schema=False)
        def healthz() -> PlainTextResponse:
            ok = self.alive
            return PlainTextResponse("ok" if ok else "the MQTT thread stopped",
                                     status_code=200 if ok else 503)  # fmt: skip

        @app.get("/readyz", include_in_schema=False)
        def readyz() -> PlainTextResponse:
            ready = self.connected.is_set()
            return PlainTextResponse("ready" if ready else "broker unreachable",
                                     status_code=200 if ready else 503)  # fmt: skip

        metrics_token = (
            self.settings.metrics_token.secret().encode() if self.settings.metrics_token else None
        )

        @app.get("/metrics", include_in_schema=False)
        def metrics(request: Request) -> Response:
            if metrics_token is not None and not hmac.compare_digest(
                bearer(request.headers.get("authorization", "")), metrics_token
            ):
                return PlainTextResponse("send Authorization: Bearer <token>", status_code=401)
            return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        return app

    def _authorize(self, request: Request, so_id: str) -> tuple[int, dict[str, Any]] | None:
        if self.settings.allow_anonymous:
            return None
        token = bearer(request.headers.get("authorization", ""))
        if not token:
            return 401, {"error": "unauthorized", "message": "send Authorization: Bearer <token>"}
        for secret, patterns in self.grants:
            if hmac.compare_digest(token, secret):
                if any(fnmatch.fnmatchcase(so_id, p) for p in patterns):
                    return None
                break
        return 403, {"error": "forbidden",
                     "message": f"this token may not post to service object {so_id!r}"}  # fmt: skip

    async def _body(self, request: Request) -> bytes | None:
        """The body, or None if it exceeds the limit (read no further than that)."""
        limit = self.settings.max_payload
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > 16 * limit:
            return None  # not worth reading: the client may see the connection close
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            # beyond the limit, read on without keeping anything, so that the client gets
            # its 413 instead of a reset connection
        return b"".join(chunks) if size <= limit else None

    def _post(self, so_id: str, stream_id: str, body: bytes, content_type: str | None) -> Response:
        try:
            return self._checked_post(so_id, stream_id, body, content_type)
        except Exception as exc:  # a bug of ours costs this request, answered and dead-lettered
            log.exception("internal error on PUT /%s/streams/%s", show_value(so_id, 100),
                          show_value(stream_id, 100))  # fmt: skip
            return self._refuse(so_id, stream_id, body, Rejection(
                RejectReason.INTERNAL_ERROR,
                f"{so_id}/{stream_id}: the request could not be handled ({type(exc).__name__});"
                " it was dead-lettered", so_id, stream_id))  # fmt: skip

    def _checked_post(
        self, so_id: str, stream_id: str, body: bytes, content_type: str | None
    ) -> Response:
        try:
            validator = self.registry.validator(so_id, stream_id)
            doc = decode(body, content_type, max_bytes=self.settings.max_payload)
        except InvalidUpdate as exc:
            r = exc.rejection
            if r.so_id is None:
                r = Rejection(r.reason, f"{so_id}/{stream_id}: {r.message}", so_id, stream_id)
            return self._refuse(so_id, stream_id, body, r)
        accepted, rejections = validator.document(doc)
        if rejections:
            return self._refuse(so_id, stream_id, body, *rejections)
        if not accepted:
            return self._refuse(so_id, stream_id, body, no_updates(so_id, stream_id))
        topic = self.topics.device_update(so_id, stream_id)
        key = hashlib.sha256(b"\0".join([topic.encode(), (content_type or "").encode(), body]))
        with self._lock:
            info = self._unconfirmed.pop(key.digest(), None)
        if info is not None:
            self.metrics.retries_deduplicated.inc()  # the earlier attempt is the one
        elif not self.alive:
            return self._answer(503, {"error": "unavailable",
                                      "message": "the gateway's MQTT thread stopped (see its"
                                      " log); nothing was published"})  # fmt: skip
        elif not self.connected.is_set():
            return self._answer(503, {"error": "unavailable",
                                      "message": "the broker is unreachable; nothing was"
                                      " published, retry later"})  # fmt: skip
        else:
            info = self.client.publish(
                topic, body, qos=1,
                properties=content_type_properties(content_type or "application/json"),
            )  # fmt: skip
        try:
            info.wait_for_publish(self.settings.publish_timeout)
        except (RuntimeError, ValueError):
            pass
        if not info.is_published():
            with self._lock:
                self._unconfirmed[key.digest()] = info
                while len(self._unconfirmed) > MAX_UNCONFIRMED:
                    self._unconfirmed.popitem(last=False)
            return self._answer(503, {"error": "unavailable",
                                      "message": "the broker did not confirm the message in"
                                      f" {self.settings.publish_timeout} s; retry the same"
                                      " request: it will not be published twice"})  # fmt: skip
        with self._lock:
            refused_code = self._refused_mids.pop(info.mid, None)
        if refused_code is not None:
            log.error("the broker refused the gateway's publish to %s (reason 0x%02x): is %s a"
                      " gateway account?", topic, refused_code, self.client_id)  # fmt: skip
            return self._answer(502, {"error": "refused by the broker",
                                      "message": f"the broker refused to publish to {topic}"
                                      f" (reason 0x{refused_code:02x}): the gateway's identity"
                                      " may not post for this object"})  # fmt: skip
        self.metrics.accepted.inc(len(accepted))
        return self._answer(202, {"accepted": len(accepted), "topic": topic})

    def _refuse(self, so_id: str, stream_id: str, body: bytes, *rejections: Rejection) -> Response:
        received = int(time.time() * 1000)
        for r in rejections:
            self.metrics.rejected.labels(r.reason.value).inc()
            letter = dead_letter_record(r, topic=f"PUT /{so_id}/streams/{stream_id}",
                                        payload=body, received_at=received)  # fmt: skip
            self._dead_letter(self.topics.dead_letter(r.so_id, r.stream_id), letter)
        status = STATUS.get(rejections[0].reason, 422)
        return self._answer(status, {
            "error": rejections[0].reason.value,
            "message": rejections[0].message,
            "rejected": [{"reason": r.reason.value, "message": r.message, "index": r.index}
                         for r in rejections[:100]],
            "rejectedCount": len(rejections),
        })  # fmt: skip

    def _dead_letter(self, topic: str, letter: bytes) -> None:
        """Publish a dead letter, unless the broker is away or too many already wait for it:
        paho's queue is unbounded, and a client sending bad bodies must not grow it."""
        with self._lock:
            while self._letters and self._letters[0][0].is_published():
                self._letter_bytes -= self._letters.popleft()[1]
            if not self.connected.is_set() or self._letter_bytes + len(letter) > MAX_LETTER_BYTES:
                self.metrics.letters_dropped.inc()
                return
            properties = content_type_properties("application/json")
            info = self.client.publish(topic, letter, qos=1, properties=properties)
            self._letters.append((info, len(letter)))
            self._letter_bytes += len(letter)

    def _answer(self, status: int, body: dict[str, Any]) -> Response:
        self.metrics.requests.labels(str(status)).inc()
        return JSONResponse(body, status_code=status)

    # lifecycle ---------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """The MQTT network thread runs (or has not started yet): what the gateway accepts
        can reach the broker."""
        return self._network.is_alive() or not self._network.ident

    def start(self) -> Gateway:
        connect(self.client, self.settings.mqtt, persistent=False)
        self._network.start()
        self._server = BackgroundServer(
            self.app, self.settings.host, self.settings.port, "cloudlet-gateway"
        ).start()
        self.port = self._server.port
        log.info("gateway on http://%s:%d, broker %s", self.settings.host, self.port,
                 self.settings.mqtt.url)  # fmt: skip
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
        self.client.disconnect()  # loop_forever returns
        if self._network.ident:
            self._network.join(10)

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.port}"
