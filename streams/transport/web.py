"""What every cloudlet HTTP service shares (the ingest gateway, the cloud API): an API token
configured inline or through the environment, bearer-token reading, and a uvicorn server run
in a thread on a socket bound up front (so port 0 gives a free port we know)."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, SecretStr, model_validator


class Token(BaseModel):
    """A token, inline (`token`) or from an environment variable (`token_env`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    token: SecretStr | None = None
    token_env: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Token:
        if (self.token is None) == (self.token_env is None):
            raise ValueError("a token grant needs exactly one of token or token_env")
        return self

    def secret(self) -> str:
        if self.token is not None:
            return self.token.get_secret_value()
        value = os.environ.get(self.token_env or "")
        if not value:
            raise ValueError(f"environment variable {self.token_env} (token_env) is not set")
        return value


def bearer(authorization: str) -> bytes:
    """The token of an Authorization header: "Bearer <token>", or ServIoTicy's bare form."""
    return authorization.removeprefix("Bearer ").strip().encode()


class BackgroundServer:
    """An ASGI app served by uvicorn in a daemon thread."""

    def __init__(self, app: Any, host: str, port: int, name: str) -> None:
        self.host = host
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        self.port: int = sock.getsockname()[1]
        import uvicorn  # here: a process that serves nothing does not load it

        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name=name, daemon=True)  # fmt: skip

    def start(self, timeout: float = 10.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)


# Swagger UI for the APIs' /docs, vendored from npm (swagger-ui-dist, pinned: the version in
# its package.json) and served by the API itself: FastAPI's default page loads it from a CDN,
# and a site often has no way out, so /docs would be blank there.
SWAGGER_UI = Path(__file__).parent / "swagger_ui"


def local_docs(app: Any, title: str) -> None:
    """`/docs` for a FastAPI app made with `docs_url=None, redoc_url=None`, every asset from
    the app itself."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import HTMLResponse
    from fastapi.staticfiles import StaticFiles

    app.mount("/_docs", StaticFiles(directory=SWAGGER_UI), name="docs-assets")

    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url, title=f"{title}: API",
            swagger_js_url="/_docs/swagger-ui-bundle.js", swagger_css_url="/_docs/swagger-ui.css",
            swagger_favicon_url="/_docs/favicon-32x32.png",
        )  # fmt: skip

    app.add_api_route("/docs", docs, methods=["GET"], include_in_schema=False)
