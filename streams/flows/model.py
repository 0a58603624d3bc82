"""Flow files: windowed, keyed aggregations declared in YAML beside the descriptors.

```yaml
# irrigation.flows.yaml
flows:
  soil-moisture-10min:
    from: "field-*-soil/soil"         # so/stream; * and ? match; one or a list
    where: "moisture >= 0"            # optional filter over the input's channels
    key: so                           # so (default), none, or an expression
    window: {tumbling: 10m}           # {hopping: 1h, every: 10m} {sliding: 1h}
                                      # {session: 5m} {count: 100, every: 10}
    time: event                       # event (lastUpdate, default) or processing
    watermark: {delay: 0s, lateness: 0s}
    emit_empty: false
    aggregates:
      moisture: avg(moisture)         # count() sum avg min max first last stddev
      samples: count()                # stddevp percentile(x, 90) rate(x) rate()
    into: "{so}/moisture_10min"       # {so} is the key's object when key is so

rules:
  water-dry-fields:
    when: "field-*-soil/irrigate"     # so/stream patterns
    if: "now"                         # over the stream's channels
    act: {so: "{customFields.valve}", action: open, parameters: {minutes: 20}}
    min_interval: 1h                  # per target, in event time
```
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def duration_ms(value: Any) -> int:
    """Milliseconds from 250ms, 30s, 10m, 1h, 2d, or a whole number of milliseconds."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int):
        ms = value
    else:
        m = _DURATION.match(str(value))
        if m is None:
            raise ValueError(f"{value!r} is not a duration (write e.g. 500ms, 30s, 10m, 1h or 2d)")
        ms = round(float(m[1]) * _UNITS[m[2]])
    if ms < 0:
        raise ValueError(f"a duration cannot be negative, got {value!r}")
    return ms


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class WindowDefinition(_Strict):
    tumbling: int | None = None
    hopping: int | None = None
    sliding: int | None = None
    session: int | None = None
    count: int | None = None
    every: int | str | None = None

    @field_validator("tumbling", "hopping", "sliding", "session", mode="before")
    @classmethod
    def _durations(cls, value: Any) -> Any:
        return None if value is None else duration_ms(value)

    @model_validator(mode="after")
    def _one_kind(self) -> WindowDefinition:
        kinds = [
            k
            for k in ("tumbling", "hopping", "sliding", "session", "count")
            if getattr(self, k) is not None
        ]
        if len(kinds) != 1:
            raise ValueError(
                "a window is exactly one of tumbling, hopping, sliding, session or count"
                f" (got {', '.join(kinds) or 'none'})"
            )
        kind = kinds[0]
        size = getattr(self, kind)
        if size <= 0:
            raise ValueError(f"the {kind} window size must be positive")
        if kind == "hopping" and self.every is None:
            raise ValueError("a hopping window needs every: how often a window starts (e.g. 10m)")
        if kind not in ("hopping", "count") and self.every is not None:
            raise ValueError(f"every applies to hopping and count windows, not {kind}")
        return self

    @property
    def kind(self) -> Literal["tumbling", "hopping", "sliding", "session", "count"]:
        for k in ("tumbling", "hopping", "sliding", "session", "count"):
            if getattr(self, k) is not None:
                return k
        raise AssertionError("validated to have one kind")

    @property
    def size(self) -> int:
        value = getattr(self, self.kind)
        assert isinstance(value, int)
        return value

    @property
    def step(self) -> int:
        if self.every is None:
            return 0
        if self.kind == "count":
            if not isinstance(self.every, int) or self.every <= 0:
                raise ValueError("every of a count window is a whole number of updates")
            return self.every
        return duration_ms(self.every)


class Watermark(_Strict):
    delay: int = 0
    lateness: int = 0
    # a key (a device) silent this long, by the unit's clock, has its open windows fired:
    # each key's clock moves only with its own updates, so without this the last window of a
    # device that goes quiet would wait for its next update; null: wait
    idle: int | None = 300_000

    @field_validator("delay", "lateness", mode="before")
    @classmethod
    def _durations(cls, value: Any) -> int:
        return duration_ms(value)

    @field_validator("idle", mode="before")
    @classmethod
    def _idle(cls, value: Any) -> int | None:
        return None if value is None else duration_ms(value)


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _stream_patterns(value: list[str]) -> list[str]:
    if not value:
        raise ValueError("from needs at least one so/stream pattern")
    for pattern in value:
        if pattern.count("/") != 1 or not all(pattern.split("/")):
            raise ValueError(f"{pattern!r} is not a so/stream pattern (e.g. field-*-soil/soil)")
    return value


StreamPatterns = Annotated[
    list[str], BeforeValidator(_one_or_many), AfterValidator(_stream_patterns)
]
"""`from:` of flows and processors: one so/stream pattern or a list ('*' and '?' match)."""


class FlowDefinition(_Strict):
    inputs: StreamPatterns = Field(alias="from")
    where: str | None = None
    key: str = "so"
    window: WindowDefinition
    time: Literal["event", "processing"] = "event"
    watermark: Watermark = Watermark()
    emit_empty: bool = False
    # With a key expression (its values come from the devices): how many keys may have open
    # windows at once. An update that would open a window for one more is dead-lettered
    # `too_many_keys` (memory is bounded whatever devices send); with `so` or `none` the keys
    # are the registry's objects, or one.
    max_keys: int = Field(default=10_000, ge=1, le=10_000_000)
    aggregates: dict[str, str]
    into: str
    description: str | None = None

    @field_validator("aggregates")
    @classmethod
    def _some(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("a flow needs at least one aggregate")
        return value

    @field_validator("into")
    @classmethod
    def _into_shape(cls, value: str) -> str:
        if value.count("/") != 1 or not all(value.split("/")):
            raise ValueError(f"into {value!r} must be <so>/<stream>, where <so> may be {{so}}")
        return value


class ActDefinition(_Strict):
    so: str  # an id, "{so}" (the object whose stream triggered), or "{customFields.<name>}"
    action: str
    parameters: dict[str, Any] = {}


class RuleDefinition(_Strict):
    """Act locally: when an update on `when` satisfies `if`, send a command (at most once per
    `min_interval` of event time per target)."""

    when: Annotated[list[str], BeforeValidator(_one_or_many)]
    condition: str = Field(alias="if")
    act: ActDefinition
    min_interval: int = 0
    description: str | None = None

    @field_validator("min_interval", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> int:
        return duration_ms(value)


class FlowFile(_Strict):
    flows: dict[str, FlowDefinition] = {}
    rules: dict[str, RuleDefinition] = {}
