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


def load_yaml(path: Path) -> YamlDocument:
    """Parse one YAML record; syntax errors become a RecordError with the line."""
    shown = display_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecordError([RecordProblem(shown, None, "", f"cannot read: {exc.strerror}")]) from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        doc = YamlDocument(path, None)
        if node is None:
            raise RecordError([RecordProblem(shown, None, "", "the file is empty")])
        doc.data = _build(loader, node, (), doc.lines, shown)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        reason = exc.problem or str(exc)
        raise RecordError([RecordProblem(shown, line, "", f"invalid YAML: {reason}")]) from None
    finally:
        loader.dispose()
    if not isinstance(doc.data, dict):
        raise RecordError([RecordProblem(shown, 1, "", "a record must be a mapping of fields")])
    return doc


def _build(loader: yaml.SafeLoader, node: yaml.Node, loc: Loc, lines: dict[Loc, int], shown: str) -> Any:
    lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | bool | float):
                raise RecordError(
                    [
                        RecordProblem(
                            shown,
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
                    [RecordProblem(shown, key_node.start_mark.line + 1, dotted(child), "duplicate key")]
                )
            lines[child] = key_node.start_mark.line + 1
            result[key] = _build(loader, value_node, child, lines, shown)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_build(loader, item, (*loc, i), lines, shown) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)
