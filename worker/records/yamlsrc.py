"""YAML loading that remembers where every value came from.

Record errors must read ``accounts/orders.yaml:7: smtp.port: …``, so the loader
keeps a map from each field path (``("smtp", "port")``) to its 1-based line,
and validation problems are reported through :meth:`YamlDocument.problem`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from worker.errors import RecordError, RecordProblem

Loc = tuple[str | int, ...]


def display_path(path: Path) -> str:
    """The path as a user would type it: relative to the working directory if below it."""
    try:
        return os.path.relpath(path) if path.is_absolute() and _below_cwd(path) else str(path)
    except ValueError:
        return str(path)


def _below_cwd(path: Path) -> bool:
    try:
        path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return False
    return True


def dotted(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


@dataclass
class YamlDocument:
    path: Path
    data: Any
    lines: dict[Loc, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.stem

    def line_of(self, loc: Sequence[str | int]) -> int | None:
        """Line of the deepest known prefix of ``loc`` (a missing key points at its parent)."""
        key = tuple(loc)
        while key:
            if key in self.lines:
                return self.lines[key]
            key = key[:-1]
        return self.lines.get((), None)

    def problem(self, loc: Sequence[str | int], reason: str) -> RecordProblem:
        return RecordProblem(display_path(self.path), self.line_of(loc), dotted(loc), reason)

    def problems_from(self, error: ValidationError) -> list[RecordProblem]:
        """Turn pydantic's errors into file:line problems, without echoing input values."""
        found = []
        for item in error.errors(include_input=False, include_url=False):
            loc = [p for p in item["loc"] if not _is_union_tag(p)]
            message = item["msg"]
            if item["type"] == "extra_forbidden":
                message = "unknown field"
            elif message.startswith("Value error, "):
                message = message[len("Value error, ") :]
            found.append(self.problem(loc, message))
        return found


def _is_union_tag(part: str | int) -> bool:
    # pydantic inserts the chosen model/type name into loc for unions; it is not a field
    return isinstance(part, str) and (part[:1].isupper() or part.startswith("function-"))


# A record is a page of fields, not a data set: these bounds refuse a file that would cost
# the loader memory or stack (a billion-laughs alias bomb, a list nested 20,000 deep) as that
# record's own file:line error, before it can stop every other account.
MAX_RECORD_BYTES = 1024 * 1024
MAX_DEPTH = 64  # nested mappings/sequences
MAX_VALUES = 100_000  # values built, every alias expanded where it is used


class _TooMuch(Exception):
    """A record over one of the bounds, named by the field it is under (the path of the
    value itself may be 64 levels deep): that field's line and path, and what is wrong."""

    def __init__(self, path: Sequence[tuple[str | int | None, int]], reason: str) -> None:
        super().__init__(reason)
        keys = [i for i, (part, _) in enumerate(path[:5]) if isinstance(part, str)]
        field_path = path[: keys[-1] + 1] if keys else path[:1]
        self.loc: Loc = tuple(part for part, _ in field_path if part is not None)
        self.line = field_path[-1][1] if field_path else 1
        self.reason = reason


class RecordLoader(yaml.SafeLoader):
    """PyYAML's pure-Python safe loader, with the composer's nesting bounded.

    ``Composer.compose_node`` recurses once per level (twice counting the collection
    composer): a deep enough document reaches Python's recursion limit. This one counts
    the levels and stops at :data:`MAX_DEPTH`, naming the field path it was composing."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._path: list[tuple[str | int | None, int]] = []  # (key or index, its line)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        line = self.peek_event().start_mark.line + 1  # type: ignore[no-untyped-call]
        if isinstance(parent, yaml.SequenceNode) and isinstance(index, int):
            self._path.append((index, line))
        elif isinstance(index, yaml.ScalarNode):  # a mapping value; index is its key
            self._path.append((str(index.value), index.start_mark.line + 1))
        else:  # the document root, or a mapping key
            self._path.append((None, line))
        try:
            if len(self._path) > MAX_DEPTH and self.check_event(
                yaml.SequenceStartEvent, yaml.MappingStartEvent
            ):
                raise _TooMuch(self._path, f"nested deeper than {MAX_DEPTH} levels")
            node = super().compose_node(parent, index)
            assert node is not None  # get_single_node asked for one: there is a node event here
            return node
        finally:
            self._path.pop()


def load_yaml(path: Path) -> YamlDocument:
    """Parse one YAML record; syntax errors and oversized records become a RecordError with the line."""
    shown = display_path(path)
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_RECORD_BYTES + 1)
    except OSError as exc:
        raise RecordError([RecordProblem(shown, None, "", f"cannot read: {exc.strerror}")]) from None
    if len(raw) > MAX_RECORD_BYTES:
        raise RecordError(
            [RecordProblem(shown, None, "", f"the file is larger than {MAX_RECORD_BYTES} bytes")]
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        at = raw[: exc.start].count(b"\n") + 1
        raise RecordError([RecordProblem(shown, at, "", "not UTF-8 text")]) from None
    loader = RecordLoader(text)
    try:
        node = loader.get_single_node()
        doc = YamlDocument(path, None)
        if node is None:
            raise RecordError([RecordProblem(shown, None, "", "the file is empty")])
        doc.data = _Builder(loader, doc.lines, shown).build(node, (), 0)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        reason = exc.problem or str(exc)
        raise RecordError([RecordProblem(shown, line, "", f"invalid YAML: {reason}")]) from None
    except _TooMuch as exc:
        raise RecordError([RecordProblem(shown, exc.line, dotted(exc.loc), exc.reason)]) from None
    finally:
        loader.dispose()
    if not isinstance(doc.data, dict):
        raise RecordError([RecordProblem(shown, 1, "", "a record must be a mapping of fields")])
    return doc


@dataclass
class _Builder:
    """Python values from the composed nodes, with each field's line; aliases are expanded
    here (every use builds the anchored value again), so here the values are counted."""

    loader: RecordLoader
    lines: dict[Loc, int]
    shown: str
    built: int = 0

    def build(self, node: yaml.Node, loc: Loc, depth: int) -> Any:
        self.built += 1
        if self.built > MAX_VALUES:
            raise self._too_much(loc, f"more than {MAX_VALUES} values (aliases expanded)")
        self.lines.setdefault(loc, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode | yaml.SequenceNode) and depth >= MAX_DEPTH:
            # only aliases get here (the composer bounds the text's own nesting), even cyclic ones
            raise self._too_much(loc, f"nested deeper than {MAX_DEPTH} levels (aliases expanded)")
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, loc, depth)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*loc, i), depth + 1) for i, item in enumerate(node.value)]
        return self.loader.construct_object(node, deep=True)

    def _too_much(self, loc: Loc, reason: str) -> _TooMuch:
        return _TooMuch([(part, self.lines.get(loc[: i + 1], 1)) for i, part in enumerate(loc)], reason)

    def _mapping(self, node: yaml.MappingNode, loc: Loc, depth: int) -> dict[Any, Any]:
        self.loader.flatten_mapping(node)
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = (
                self.loader.construct_object(key_node, deep=True)
                if isinstance(key_node, yaml.ScalarNode)
                else None
            )
            if not isinstance(key, str | int | bool | float):
                raise RecordError(
                    [
                        RecordProblem(
                            self.shown,
                            key_node.start_mark.line + 1,
                            dotted(loc),
                            "keys must be plain scalars",
                        )
                    ]
                )
            key = str(key) if not isinstance(key, str) else key
            child = (*loc, key)
            if key in result:
                raise RecordError(
                    [RecordProblem(self.shown, key_node.start_mark.line + 1, dotted(child), "duplicate key")]
                )
            self.lines[child] = key_node.start_mark.line + 1
            result[key] = self.build(value_node, child, depth + 1)
        return result
