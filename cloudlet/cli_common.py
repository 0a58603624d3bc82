"""What the command line's modules share: consoles, failing with a message, signals."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import orjson
import typer
from rich.console import Console

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

OBJECTS_ENV = "CLOUDLET_OBJECTS"


def fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    return typer.Exit(1)


def device_secrets(path: Path) -> dict[str, str]:
    """id -> secret, from {"id": "secret"} or {"id": {"secret": ...}} (device sync's file)."""
    try:
        doc = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise fail(f"cannot read the credentials in {path}: {exc}") from None
    if not isinstance(doc, dict):
        raise fail(f"{path} must hold a JSON object: device id -> secret")
    out: dict[str, str] = {}
    for so, value in doc.items():
        secret = value.get("secret") if isinstance(value, dict) else value
        if not isinstance(secret, str) or not secret:
            raise fail(f"{path}: no secret for {so!r}")
        out[so] = secret
    return out


def default_objects() -> list[Path]:
    configured = os.environ.get(OBJECTS_ENV)
    return [Path(configured)] if configured else [Path("objects")]


def stop_on_signals(interrupt: bool = True) -> threading.Event:
    """An event set by SIGTERM (and SIGINT, Ctrl-C): a service's cue to stop cleanly."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if interrupt:
        signal.signal(signal.SIGINT, lambda *_: stop.set())
    return stop


def wait(stop: threading.Event, alive: Callable[[], bool] = lambda: True, what: str = "") -> None:
    """Until SIGTERM or Ctrl-C; exits non-zero (for a supervisor to restart us) as soon as a
    background thread has died."""
    while not stop.wait(0.5):  # a timed wait lets the signal handlers run
        if not alive():
            raise fail(f"{what}: a background thread stopped; see the log above")
