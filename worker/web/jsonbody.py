"""JSON from an untrusted source, with its nesting bounded before it is parsed.

``json.loads`` recurses once per level of nesting: a body of 100,000 ``[``
raises RecursionError (and one just under the interpreter's limit reaches
every consumer of the value). :func:`loads` measures the nesting first, in a
few passes of C-speed bytes operations (strings taken out, then everything but
brackets, then the innermost pairs removed level by level), and refuses
anything deeper than ``max_depth`` before the parser sees it.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 32  # levels of arrays/objects; a Postroom payload needs 4 (a batch's, 5)

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


class JsonBodyError(ValueError):
    """The text is not JSON, or is nested deeper than allowed (``str`` says which)."""


def _unpaired(data: bytes, max_depth: int) -> bytes:
    """The brackets of ``data`` left once ``max_depth`` levels of innermost pairs are taken
    out: empty for JSON nested at most ``max_depth`` deep."""
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    for _ in range(max_depth):
        shorter = brackets.replace(b"[]", b"").replace(b"{}", b"")
        if len(shorter) == len(brackets):
            break  # empty, or nothing pairs up any more
        brackets = shorter
    return brackets


def loads(data: bytes | bytearray | str, max_depth: int = MAX_DEPTH) -> Any:
    """The value of JSON text ``data``; :class:`JsonBodyError` when it is not JSON or nests
    deeper than ``max_depth``."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    left = _unpaired(raw, max_depth)
    if left:
        opened = left.count(b"[") + left.count(b"{")
        if opened and opened == len(left) - opened:
            raise JsonBodyError(f"the JSON is nested deeper than {max_depth} levels")
        raise JsonBodyError("the body is not JSON")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise JsonBodyError("the body is not JSON") from None
