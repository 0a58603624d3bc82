"""ServIoTicy 0.1.0 references inside expressions, and `aliases` text substitution.

A reference names an input of a derived stream and one of its values:

    {$group1.channels.temperature.current-value}
    {$A.channels.a['current-value']}
    {$result.channels.temperature.current-value}     (post-filter only)
    {$A.lastUpdate}

`<input>` is another stream of the same service object, a group id, the stream itself (its
previous output), or `result`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_REFERENCE = re.compile(
    r"""\{\$(?P<input>[^.{}\s]+)\.(?:
        channels\.(?P<channel>[^.{}\[\]\s'"]+)
            (?:\.current-value|\[\s*(?P<q>['"])current-value(?P=q)\s*\])
      | (?P<last>lastUpdate)
    )\}""",
    re.VERBOSE,
)
_OPENING = re.compile(r"\{\$")
MAX_ALIAS_DEPTH = 16


@dataclass(frozen=True, slots=True)
class Reference:
    input: str
    channel: str | None  # None for {$input.lastUpdate}
    start: int
    end: int


def find_references(text: str) -> list[Reference]:
    """Every ServIoTicy reference in `text`; ValueError naming the first malformed `{$...`."""
    found = [
        Reference(m["input"], m["channel"], m.start(), m.end()) for m in _REFERENCE.finditer(text)
    ]
    covered = {r.start for r in found}
    for opening in _OPENING.finditer(text):
        if opening.start() not in covered:
            end = text.find("}", opening.start())
            fragment = text[opening.start() : end + 1 if end >= 0 else len(text)]
            raise ValueError(
                f"{fragment!r} is not a ServIoTicy reference; expected"
                " {$<input>.channels.<channel>.current-value} or {$<input>.lastUpdate}"
            )
    return found


def expand_aliases(text: str, aliases: dict[str, str]) -> str:
    """`text` with every alias replaced by its text, repeatedly (aliases may use aliases)."""
    for _ in range(MAX_ALIAS_DEPTH):
        if not any(alias in text for alias in aliases):
            return text
        for alias, replacement in aliases.items():
            text = text.replace(alias, replacement)
    raise ValueError(
        f"aliases still expand after {MAX_ALIAS_DEPTH} rounds; do two aliases refer to each other?"
    )
