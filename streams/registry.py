"""The registry: every service object a cloudlet knows, loaded and cross-checked at once.

`Registry.load` reads descriptor files (JSON or YAML; one object, a list of objects, or several
YAML documents per file) from files and directories, and reports every problem it finds, each
naming the file, the object, the field and the reason, instead of stopping at the first.

Files named `*.flow.yaml`, `*.flows.yaml` (and `.yml`) hold flow definitions, not service
objects; the registry skips them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml
from pydantic import ValidationError

from streams.objects import ServiceObject
from streams.rejections import InvalidUpdate, Rejection, RejectReason
from streams.updates import StreamKey, StreamValidator

DESCRIPTOR_SUFFIXES = (".json", ".yaml", ".yml")
FLOW_SUFFIXES = (".flow.yaml", ".flow.yml", ".flows.yaml", ".flows.yml")


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with the descriptors, located as precisely as we can."""

    source: str
    message: str
    object_id: str | None = None
    field: str | None = None

    def __str__(self) -> str:
        parts = [self.source]
        if self.object_id is not None:
            parts.append(f"so {self.object_id!r}")
        if self.field:
            parts.append(self.field)
        return ": ".join([*parts, self.message])


class RegistryError(Exception):
    """The descriptors have problems; `problems` lists every one of them."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in the service object descriptors:\n{lines}")


def field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if part == "[key]":  # pydantic's marker for an invalid mapping key: the key is named
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def validation_problems(
    error: ValidationError, source: str, object_id: str | None = None
) -> list[Problem]:
    """A pydantic validation error as problems, one per field, in our words."""
    return [
        Problem(source, e["msg"].removeprefix("Value error, "), object_id, field_path(e["loc"]))
        for e in error.errors()
    ]


def yaml_mapping(path: Path, what: str) -> tuple[dict[str, Any] | None, Problem | None]:
    """A config file's YAML mapping, or the problem that stops it being read (what: "a unit
    config", "a topology")."""
    source = str(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        return None, Problem(source, f"cannot be read: {exc.strerror}")
    except yaml.YAMLError as exc:
        return None, Problem(source, f"cannot be read as yaml: {str(exc).splitlines()[0]}")
    if not isinstance(doc, dict):
        return None, Problem(source, f"{what} must be a mapping")
    return doc, None


def descriptor_files(paths: Iterable[Path | str]) -> Iterator[Path]:
    """The descriptor files named by `paths`: files as given, directories searched recursively,
    each file once however often it is named."""
    seen: set[Path] = set()
    for path in _expand(paths):
        name = path.name
        if name.endswith(FLOW_SUFFIXES) or path.resolve() in seen:
            continue  # flow files are the catalog's to read
        seen.add(path.resolve())
        yield path


def _expand(paths: Iterable[Path | str]) -> Iterator[Path]:
    for entry in map(Path, paths):
        if entry.is_dir():
            for path in sorted(entry.rglob("*")):
                if (
                    path.is_file()
                    and path.name.endswith(DESCRIPTOR_SUFFIXES)
                    and not any(part.startswith(".") for part in path.relative_to(entry).parts)
                ):
                    yield path
        else:
            yield entry


def _documents(path: Path) -> list[Any]:
    data = path.read_bytes()
    if path.suffix == ".json":
        doc = orjson.loads(data)
        return doc if isinstance(doc, list) else [doc]
    docs = [d for d in yaml.safe_load_all(data) if d is not None]
    if len(docs) == 1 and isinstance(docs[0], list):
        return list(docs[0])
    return docs


class Registry:
    """Validated service objects by id, with one compiled validator per raw stream."""

    def __init__(
        self,
        objects: Mapping[str, ServiceObject],
        sources: Mapping[str, str],
        *,
        produced: frozenset[StreamKey] = frozenset(),
    ) -> None:
        self.objects = dict(objects)
        self.sources = dict(sources)
        self.produced = produced  # streams the cloudlet writes (flow outputs), not devices
        self._validators = {
            (so_id, stream_id): StreamValidator(so_id, stream_id, stream)
            for so_id, so in self.objects.items()
            for stream_id, stream in so.streams.items()
            if not stream.derived and StreamKey(so_id, stream_id) not in produced
        }

    def __len__(self) -> int:
        return len(self.objects)

    def __contains__(self, so_id: object) -> bool:
        return so_id in self.objects

    def get(self, so_id: str) -> ServiceObject:
        return self.objects[so_id]

    # Loading ------------------------------------------------------------------------------

    @classmethod
    def load(cls, paths: Iterable[Path | str]) -> Registry:
        """Load and cross-check descriptors; RegistryError listing every problem otherwise."""
        registry, problems = cls.check(paths)
        if problems:
            raise RegistryError(problems)
        return registry

    @classmethod
    def check(cls, paths: Iterable[Path | str]) -> tuple[Registry, list[Problem]]:
        """Load what is valid and list every problem; the registry holds the valid objects."""
        parsed, problems = cls.parse(paths)
        problems += parsed.cross_check()
        return parsed.without({p.object_id for p in problems}), problems

    def cross_check(self) -> list[Problem]:
        """Problems between objects: groups naming unknown objects or streams, and so on."""
        return list(_cross_check(self.objects, self.sources))

    def without(self, object_ids: set[str | None]) -> Registry:
        """This registry less the given objects (those with problems, say)."""
        keep = {k: v for k, v in self.objects.items() if k not in object_ids}
        produced = frozenset(k for k in self.produced if k.so in keep)
        return Registry(keep, {k: self.sources[k] for k in keep}, produced=produced)

    @classmethod
    def parse(cls, paths: Iterable[Path | str]) -> tuple[Registry, list[Problem]]:
        """Every object whose descriptor parses, and the problems of those that do not.
        Cross-references are not checked yet (`cross_check`): flows may add streams first."""
        objects: dict[str, ServiceObject] = {}
        sources: dict[str, str] = {}
        problems: list[Problem] = []
        for path in descriptor_files(paths):
            source = str(path)
            try:
                docs = _documents(path)
            except FileNotFoundError:
                problems.append(Problem(source, "no such file or directory"))
                continue
            except (OSError, ValueError, yaml.YAMLError) as exc:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                problems.append(Problem(source, f"cannot be read as {path.suffix[1:]}: {reason}"))
                continue
            if not docs:
                problems.append(Problem(source, "holds no service object"))
            for i, doc in enumerate(docs):
                where = source if len(docs) == 1 else f"{source}[{i}]"
                so = _parse(doc, where, path.stem if len(docs) == 1 else None, problems)
                if so is None or so.id is None:
                    continue
                if so.id in objects:
                    problems.append(
                        Problem(
                            where,
                            f"is already defined in {sources[so.id]}",
                            so.id,
                            "id",
                        )
                    )
                    continue
                objects[so.id] = so
                sources[so.id] = where
        return cls(objects, sources), problems

    @classmethod
    def from_objects(cls, objects: Iterable[ServiceObject]) -> Registry:
        """A registry from descriptors built in code (each must have an id)."""
        by_id: dict[str, ServiceObject] = {}
        for so in objects:
            if so.id is None:
                raise ValueError("a service object built in code needs an id")
            by_id[so.id] = so
        problems = list(_cross_check(by_id, dict.fromkeys(by_id, "<memory>")))
        if problems:
            raise RegistryError(problems)
        return cls(by_id, dict.fromkeys(by_id, "<memory>"))

    # Ingest --------------------------------------------------------------------------------

    def validator(self, so_id: str, stream_id: str) -> StreamValidator:
        """The validator for a device stream; InvalidUpdate if devices cannot post there."""
        found = self._validators.get((so_id, stream_id))
        if found is not None:
            return found
        so = self.objects.get(so_id)
        if so is None:
            raise InvalidUpdate(
                Rejection(
                    RejectReason.UNKNOWN_OBJECT,
                    f"{so_id}/{stream_id}: unknown service object {so_id!r}",
                    so_id,
                    stream_id,
                )
            )
        if stream_id in so.streams:
            raise InvalidUpdate(
                Rejection(
                    RejectReason.DERIVED_STREAM,
                    f"{so_id}/{stream_id}: stream {stream_id!r} is derived by the cloudlet;"
                    " devices cannot post to it",
                    so_id,
                    stream_id,
                )
            )
        raise InvalidUpdate(
            Rejection(
                RejectReason.UNKNOWN_STREAM,
                f"{so_id}/{stream_id}: service object {so_id!r} has no stream {stream_id!r}"
                f" (it has: {', '.join(so.streams)})",
                so_id,
                stream_id,
            )
        )


def _parse(
    doc: Any, where: str, default_id: str | None, problems: list[Problem]
) -> ServiceObject | None:
    if not isinstance(doc, dict):
        problems.append(
            Problem(where, f"a service object must be a mapping, got {type(doc).__name__}")
        )
        return None
    if "id" not in doc and default_id is not None:
        doc = {**doc, "id": default_id}  # ServIoTicy exports may lack ids: use the file name
    object_id = doc.get("id") if isinstance(doc.get("id"), str) else None
    try:
        so = ServiceObject.model_validate(doc)
    except ValidationError as exc:
        problems.extend(validation_problems(exc, where, object_id))
        return None
    if so.id is None:
        problems.append(Problem(where, "has no id (required when a file holds several objects)"))
        return None
    return so


def _cross_check(
    objects: Mapping[str, ServiceObject], sources: Mapping[str, str]
) -> Iterator[Problem]:
    for so_id, so in objects.items():
        source = sources[so_id]
        for group_id, group in so.groups.items():
            yield from _check_group(objects, source, so_id, group_id, group.so_ids, group.stream)


def _check_group(
    objects: Mapping[str, ServiceObject],
    source: str,
    so_id: str,
    group_id: str,
    members: list[str],
    stream_id: str,
) -> Iterator[Problem]:
    seen_types: dict[str, tuple[str, str]] = {}
    for i, member in enumerate(members):
        field = f"groups.{group_id}.soIds[{i}]"
        target = objects.get(member)
        if target is None:
            yield Problem(source, f"unknown service object {member!r}", so_id, field)
            continue
        stream = target.streams.get(stream_id)
        if stream is None:
            yield Problem(
                source,
                f"member {member!r} has no stream {stream_id!r}"
                f" (it has: {', '.join(target.streams)})",
                so_id,
                f"groups.{group_id}.stream",
            )
            continue
        for name, channel in stream.channels.items():
            first = seen_types.setdefault(name, (member, channel.type.value))
            if first[1] != channel.type.value:
                yield Problem(
                    source,
                    f"channel {name!r} is a {first[1]} on {first[0]!r} but a"
                    f" {channel.type.value} on {member!r}; group members must agree",
                    so_id,
                    f"groups.{group_id}",
                )
