"""`cloudlet processor new NAME`: an installable plug-in package with a passing test."""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path
from string import Template

_NAME = re.compile(r"^[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*$")


class ScaffoldError(Exception):
    pass


def new_processor(name: str, parent: Path) -> Path:
    """Write the package for processor `name` into parent/name; its path."""
    if not _NAME.match(name):
        raise ScaffoldError(
            f"{name!r} is not a usable name: lower-case letters and digits, words joined by"
            " '-' or '_' (e.g. smoothing, peak-detector)"
        )
    target = parent / name
    if target.exists():
        raise ScaffoldError(f"{target} already exists; choose another name or directory")
    package = name.replace("-", "_")
    words = re.split(r"[-_]", name)
    values = {
        "name": name,
        "package": package,
        "class_name": "".join(w.capitalize() for w in words),
        "title": " ".join(words).capitalize(),
    }
    root = files("cloudlet") / "templates" / "processor"
    written = 0
    for source in _walk(root):
        relative = Path(*source.relative_parts).with_suffix("")  # drop .tmpl
        path = target / Path(*(package if p == "__package__" else p for p in relative.parts))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(Template(source.read_text()).substitute(values))
        written += 1
    if not written:
        raise ScaffoldError("the processor template is missing from this installation")
    return target


class _Source:
    def __init__(self, node: object, parts: tuple[str, ...]) -> None:
        self.node = node
        self.relative_parts = parts

    def read_text(self) -> str:
        return self.node.read_text()  # type: ignore[attr-defined,no-any-return]


def _walk(node: object, parts: tuple[str, ...] = ()) -> list[_Source]:
    out = []
    for child in sorted(node.iterdir(), key=lambda c: c.name):  # type: ignore[attr-defined]
        if child.is_dir():
            out += _walk(child, (*parts, child.name))
        elif child.name.endswith(".tmpl"):
            out.append(_Source(child, (*parts, child.name)))
    return out
