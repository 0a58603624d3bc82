"""The registry's REST API, ServIoTicy's paths and bodies: `POST /` (a descriptor; the id is
made when absent) answers the object's id and its API token; `GET /` lists the objects you may
read, `GET /{soId}` gives a descriptor, `PUT /{soId}` changes it, `DELETE /{soId}` removes it,
and `GET /{soId}/history` lists every version with who made it and when. ServIoTicy's data
paths: `PUT /{soId}/streams/{streamId}` posts updates (checked, stored in the cloud),
`GET /{soId}/streams/{streamId}`, `.../lastUpdate` and `POST .../search` read the store.

Who may: a token grant's `register` patterns name the objects it may create, change and
remove; an object's own API token may read, change and remove that object. Reading follows the
read grants (`objects`, `public`). A refused change answers 422 (the object's own problems, as
`cloudlet so validate` words them) or 409 (it would break another object), with every reason.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from cloud_sync.registry import FleetRegistry, Refused
from cloud_sync.store import CloudMessage
from streams import encode_update
from streams.objects import ServiceObject
from streams.rejections import InvalidUpdate, no_updates
from streams.transport.web import bearer
from streams.updates import StreamValidator

if TYPE_CHECKING:
    from cloud_sync.cloud import CloudService


def _refused(exc: Refused) -> JSONResponse:
    return JSONResponse({"error": exc.problems[0] if len(exc.problems) == 1 else
                         f"{len(exc.problems)} problems", "problems": exc.problems},
                        status_code=exc.status)  # fmt: skip


MAX_BODY = 1 << 20  # bytes of a descriptor or a search kept: memory stays bounded
DRAIN_MAX = 16 << 20  # past MAX_BODY, read and dropped up to this, so the client reads the 413


async def _body(request: Request) -> Any:
    """The JSON body, at most MAX_BODY bytes of it kept (413 past it)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= MAX_BODY:
            chunks.append(chunk)
        elif size > DRAIN_MAX:  # the connection is dropped on the rest
            break
    if size > MAX_BODY:
        raise HTTPException(413, f"the body is over {MAX_BODY} bytes")
    try:
        return orjson.loads(b"".join(chunks))
    except orjson.JSONDecodeError as exc:
        raise HTTPException(400, f"the body is not JSON: {exc}") from None


def install(app: FastAPI, service: CloudService, registry: FleetRegistry) -> None:
    """The registry's routes, after every other route of the app (their paths are catch-alls
    of one segment)."""

    registrars = [(t.secret().encode(), t.may_register, t.name) for t in service.settings.tokens]

    def now() -> int:
        return int(time.time() * 1000)

    def registrar(request: Request, so: str | None) -> str | None:
        """Who the caller is when its token may register `so` (None: an id yet to be made,
        which needs `register: ["*"]`); None when it may not; 401 without a known token."""
        token = bearer(request.headers.get("authorization", ""))
        if not token:
            raise HTTPException(401, "send Authorization: Bearer <token>")
        for secret, patterns, name in registrars:
            if hmac.compare_digest(token, secret):
                allowed = "*" in patterns if so is None else service._may(patterns, so)
                who = name or f"token {hashlib.sha256(secret).hexdigest()[:8]}"
                return who if allowed else None
        raise HTTPException(401, "unknown token")

    def own(request: Request, so: str) -> bool:
        """Whether the caller holds the object's own API token."""
        token = bearer(request.headers.get("authorization", ""))
        return bool(token) and registry.by_token(token.decode()) == so

    def may_read(request: Request, so: str) -> None:
        if not own(request, so):
            service._check(request, so)

    def may_change(request: Request, so: str) -> str:
        """Who is asking, when they may change `so`; 401/403 otherwise."""
        if own(request, so):
            return f"so {so}"
        who = registrar(request, so)
        if who is None:
            raise HTTPException(403, f"this token may not register or change {so!r}")
        return who

    def changed() -> None:  # send it to the cloudlets now
        if service.publisher is not None:
            service.publisher.wake.set()

    @app.post("/", status_code=201)
    async def create(request: Request, site: str | None = None) -> Any:
        """Register a service object (ServIoTicy's `POST /`): its id, its API token, and its
        MQTT credentials at its site (`mqtt`: username, password, client id; given once; null
        unless `site` is one whose key the cloud holds, `site_keys`). `site`: the cloudlet it
        belongs to (none: every cloudlet has it)."""
        descriptor = await _body(request)
        so = descriptor.get("id") if isinstance(descriptor, dict) else None
        who = registrar(request, so if isinstance(so, str) else None)
        if who is None:
            raise HTTPException(403, "this token may not register service objects")
        try:
            created = registry.create(descriptor, who, now(), site, credentials=True)
        except Refused as exc:
            return _refused(exc)
        changed()
        mqtt = None  # without a site whose key the cloud holds: `cloudlet device add` there
        if created.mqtt_secret is not None:
            mqtt = {"username": created.id, "password": created.mqtt_secret,
                    "client_id": created.id, "site": site}  # fmt: skip
        return {"id": created.id, "version": created.version, "api_token": created.api_token,
                "mqtt": mqtt}  # fmt: skip

    store = service.store

    @app.get("/{so}/streams/{stream}/lastUpdate")
    def last_update(so: str, stream: str, request: Request) -> Any:
        """ServIoTicy's newest update of a stream."""
        may_read(request, so)
        found = store.last(so, stream)
        if found is None:
            raise HTTPException(404, f"{so}/{stream} has no update yet")
        return found

    @app.get("/{so}/streams/{stream}")
    def updates(so: str, stream: str, request: Request, cursor: str | None = None) -> Any:
        """ServIoTicy's updates of a stream, oldest first (`{"data": [...]}`), a page of 1,000
        at a time (follow `next`: ServIoTicy gave all at once)."""
        may_read(request, so)
        try:
            page = store.history(so, stream, limit=1000, cursor=cursor)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        return {"data": page.updates, "next": page.next}

    @app.put("/{so}/streams/{stream}", status_code=202)
    async def post_updates(so: str, stream: str, request: Request) -> Any:
        """ServIoTicy's sensor update (one, or a list): checked against the stream's channels
        as a cloudlet checks it, and stored in the cloud at once (what a web object posting
        to the cloud, ServIoTicy's way, then reads back). The object's own token, or a token
        that may register it. The same reading sent twice is stored once."""
        if not own(request, so) and registrar(request, so) is None:
            raise HTTPException(403, f"this token may not post updates of {so!r}")
        found = registry.get(so)
        if found is None:
            raise HTTPException(404, f"no service object {so!r}")
        body = await _body(request)
        try:
            messages = cloud_messages(so, stream, found, body, now())
        except InvalidUpdate as exc:
            return JSONResponse({"error": exc.rejection.reason.value,
                                 "problems": [exc.rejection.message]}, status_code=422)  # fmt: skip
        except LookupError as exc:
            raise HTTPException(404, str(exc.args[0])) from None
        return {"stored": await run_in_threadpool(store.write, messages)}

    @app.post("/{so}/streams/{stream}/search")
    async def search(so: str, stream: str, request: Request) -> Any:
        """ServIoTicy's search of a stream: `timerange` (`rangefrom`, `rangeto`, ms),
        `numericrange` (and `numericrangefield`: `channels.<ch>.current-value`),
        `geodistance` (`pointlat`, `pointlon`, `geodistancevalue`, `geodistanceunit`: m or km),
        `geoboundingbox` (`geoboxupperleftlat`, ...lon, `geoboxbottomrightlat`, ...lon) or
        `match` (`matchfield`: `channels.<ch>.current-value`, `matchstring`: the channel's
        text contains it, in any case); `limit` with `limitcount` (at most 1,000)."""
        may_read(request, so)
        body = await _body(request)
        try:
            query = servioticy_search(body)
        except (KeyError, TypeError, ValueError) as exc:
            raise HTTPException(400, f"not a search this API knows: {exc}") from None
        return {"data": [e["update"] for e in store.search(stream, objects=[so], **query)]}

    @app.get("/{so}")
    def read(so: str, request: Request) -> Any:
        """A service object's descriptor."""
        may_read(request, so)
        found = registry.get(so)
        if found is None:
            raise HTTPException(404, f"no service object {so!r} (or not yours to read)")
        return JSONResponse(found["descriptor"], headers={"X-Version": str(found["version"])})

    @app.put("/{so}")
    async def update(so: str, request: Request) -> Any:
        """Change a service object (a new version)."""
        who = may_change(request, so)
        try:
            version = registry.update(so, await _body(request), who, now())
        except KeyError:
            raise HTTPException(404, f"no service object {so!r}") from None
        except Refused as exc:
            return _refused(exc)
        changed()
        return {"id": so, "version": version}

    @app.delete("/{so}", status_code=204)
    def delete(so: str, request: Request) -> Response:
        """Remove a service object (its history stays)."""
        who = may_change(request, so)
        try:
            registry.delete(so, who, now())
        except KeyError:
            raise HTTPException(404, f"no service object {so!r}") from None
        except Refused as exc:
            return _refused(exc)
        changed()
        return Response(status_code=204)

    @app.get("/{so}/history")
    def history(so: str, request: Request) -> list[dict[str, Any]]:
        """Every version of a service object: when, by whom, what (deletions included)."""
        may_read(request, so)
        found = registry.history(so)
        if not found:
            raise HTTPException(404, f"no service object {so!r} (or not yours to read)")
        return found


def cloud_messages(so: str, stream: str, found: dict[str, Any], body: Any,
                   received: int) -> list[CloudMessage]:  # fmt: skip
    """Updates posted to the cloud as the store keeps what the cloudlets forward (their
    message id made from the content: a resend is stored once). InvalidUpdate names what is
    wrong (as a cloudlet's dead letter would); LookupError: no such stream to post to."""
    described = ServiceObject.model_validate(found["descriptor"])
    definition = described.streams.get(stream)
    if definition is None:
        raise LookupError(f"{so} has no stream {stream!r}")
    if definition.derived:
        raise LookupError(f"{so}/{stream} is a composite stream: computed, not posted")
    check = StreamValidator(so, stream, definition)
    docs = body if isinstance(body, list) else [body]
    if not docs:
        raise InvalidUpdate(no_updates(so, stream))
    out = []
    for i, doc in enumerate(docs):
        update = check.update(doc, i if isinstance(body, list) else None)
        encoded = encode_update(update)
        digest = hashlib.sha256(b"\0".join((so.encode(), stream.encode(), encoded)))
        out.append(CloudMessage(f"api-{digest.hexdigest()[:32]}", found["site"] or "cloud", so,
                                stream, received, orjson.loads(encoded)))  # fmt: skip
    return out


def _channel(field: str) -> str:
    """`channels.<ch>.current-value` (ServIoTicy's field path) or a bare channel name."""
    parts = field.split(".")
    if len(parts) == 3 and parts[0] == "channels" and parts[2] == "current-value":
        return parts[1]
    if len(parts) == 1 and field:
        return field
    raise ValueError(f"field {field!r} is not channels.<channel>.current-value")


def servioticy_search(body: Any) -> dict[str, Any]:
    """A ServIoTicy search body as the store's search arguments."""
    if not isinstance(body, dict):
        raise TypeError("the body is a JSON object")
    query: dict[str, Any] = {}
    if body.get("timerange"):
        query["start"] = int(body["rangefrom"])
        query["end"] = int(body["rangeto"]) + 1  # ServIoTicy's range is inclusive
    if body.get("numericrange"):
        query["channel"] = _channel(body["numericrangefield"])
        query["minimum"] = float(body["rangefrom"])
        query["maximum"] = float(body["rangeto"])
    if body.get("geodistance"):
        scale = {"m": 1.0, "km": 1000.0}[body.get("geodistanceunit", "km")]
        query["near"] = (float(body["pointlat"]), float(body["pointlon"]),
                         float(body["geodistancevalue"]) * scale)  # fmt: skip
    if body.get("geoboundingbox"):
        top, left = float(body["geoboxupperleftlat"]), float(body["geoboxupperleftlon"])
        bottom, right = float(body["geoboxbottomrightlat"]), float(body["geoboxbottomrightlon"])
        query["bbox"] = (bottom, left, top, right)
    if body.get("match"):  # ServIoTicy's term filter on a text channel
        query["channel"] = _channel(body["matchfield"])
        query["match"] = str(body["matchstring"])
    if not query:
        raise ValueError("none of timerange, numericrange, geodistance, geoboundingbox, match")
    if body.get("limit"):
        query["limit"] = max(1, min(1000, int(body["limitcount"])))
    return query
