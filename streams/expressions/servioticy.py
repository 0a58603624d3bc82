"""ServIoTicy 0.2.0 descriptors wrote JavaScript functions; cloudlet does not run them.

Where a function is a single `return <expression>;` over its inputs, the equivalent native
expression is mechanical, and the error shows it so that porting is copy and paste.
"""

from __future__ import annotations

import re

from streams.expressions.syntax import ExpressionError, parse

_FUNCTION = re.compile(
    r"^\s*function\s*\([^)]*\)\s*\{\s*return\s+(?P<body>.*?)\s*;?\s*\}\s*$", re.DOTALL
)
_CHANNEL = re.compile(
    r"""(?P<input>[A-Za-z_$][\w$]*)\.channels\.(?P<channel>[A-Za-z_$][\w$-]*)
        (?:\[\s*(?P<q>['"])current-value(?P=q)\s*\]|\.current-value)""",
    re.VERBOSE,
)


def native_equivalent(function_text: str) -> str | None:
    """The native expression equal to a ServIoTicy 0.2.0 function, or None if not mechanical."""
    m = _FUNCTION.match(function_text)
    if m is None:
        return None
    body = _CHANNEL.sub(lambda c: f"{c['input']}.{c['channel']}", m["body"])
    try:
        parse(body)
    except ExpressionError:
        return None
    return body


def is_javascript_function(text: str) -> bool:
    return text.lstrip().startswith("function")
