"""What every cloudlet HTTP service shares (the ingest gateway, the cloud API): an API token
configured inline or through the environment, bearer-token reading, and a uvicorn server run
in a thread on a socket bound up front (so port 0 gives a free port we know)."""

from __future__ import annotations

import os
import socket
import threading
import time
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
