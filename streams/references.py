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

REFERENCE_PATTERN = re.compile(
    r"""\{\$(?P<input>[^.{}\s]+)\.(?:
        channels\.(?P<channel>[^.{}\[\]\s'"]+)
            (?:\.current-value|\[\s*(?P<q>['"])current-value(?P=q)\s*\])
      | (?P<last>lastUpdate)
    )\}""",
    re.VERBOSE,
)
MAX_ALIAS_DEPTH = 16


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
