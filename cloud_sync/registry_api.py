"""The registry's REST API, ServIoTicy's paths and bodies: `POST /` (a descriptor; the id is
made when absent) answers the object's id and its API token; `GET /` lists the objects you may
read, `GET /{soId}` gives a descriptor, `PUT /{soId}` changes it, `DELETE /{soId}` removes it,
and `GET /{soId}/history` lists every version with who made it and when.

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

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response

from cloud_sync.registry import FleetRegistry, Refused
from streams.transport.web import bearer

if TYPE_CHECKING:
    from cloud_sync.cloud import CloudService


def _refused(exc: Refused) -> JSONResponse:
    return JSONResponse({"error": exc.problems[0] if len(exc.problems) == 1 else
                         f"{len(exc.problems)} problems", "problems": exc.problems},
                        status_code=exc.status)  # fmt: skip


async def _body(request: Request) -> Any:
    import orjson

    try:
        return orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise HTTPException(400, f"the body is not JSON: {exc}") from None


def install(app: FastAPI, service: CloudService, registry: FleetRegistry) -> None:
    """The registry's routes, after every other route of the app (their paths are catch-alls
    of one segment)."""

    registrars = [(t.secret().encode(), t.register, t.name) for t in service.settings.tokens]

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

    @app.post("/", status_code=201)
    async def create(request: Request) -> Any:
        """Register a service object (ServIoTicy's `POST /`): its id and API token."""
        descriptor = await _body(request)
        so = descriptor.get("id") if isinstance(descriptor, dict) else None
        who = registrar(request, so if isinstance(so, str) else None)
        if who is None:
            raise HTTPException(403, "this token may not register service objects")
        try:
            created = registry.create(descriptor, who, now())
        except Refused as exc:
            return _refused(exc)
        return {"id": created.id, "version": created.version, "api_token": created.api_token}

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
        return Response(status_code=204)

    @app.get("/{so}/history")
    def history(so: str, request: Request) -> list[dict[str, Any]]:
        """Every version of a service object: when, by whom, what (deletions included)."""
        may_read(request, so)
        found = registry.history(so)
        if not found:
            raise HTTPException(404, f"no service object {so!r} (or not yours to read)")
        return found
