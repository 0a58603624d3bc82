"""cloudlet's expression language: parsed once, compiled to closures, evaluated per update.

No `eval`/`exec` of user text, no attribute access, no imports; size and depth are bounded.
"""

from streams.expressions.compiler import (
    CHANNEL_TYPES,
    NOT_AVAILABLE,
    CompiledExpression,
    Env,
    Scope,
    compile_expression,
)
from streams.expressions.functions import FUNCTIONS, EvaluationError, Type
from streams.expressions.scopes import InputsScope, StreamScope, channel_value_type
from streams.expressions.syntax import ExpressionError, parse

__all__ = [
    "CHANNEL_TYPES",
    "FUNCTIONS",
    "NOT_AVAILABLE",
    "CompiledExpression",
    "Env",
    "EvaluationError",
    "ExpressionError",
    "InputsScope",
    "Scope",
    "StreamScope",
    "Type",
    "channel_value_type",
    "compile_expression",
    "parse",
]
