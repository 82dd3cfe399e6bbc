"""Secret references: ``${ENV_NAME}`` or ``{file: path}``, resolved only at use.

A record never holds a secret value, only where to find it, so records (and
anything built from them: task payloads, reprs, logs) can be printed freely.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from worker.errors import ConfigurationError

_ENV_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")


class Secret:
    """A reference to a secret; ``reveal()`` reads it, nothing else prints it."""

    __slots__ = ("_base_dir", "env", "file")

    def __init__(
        self, *, env: str | None = None, file: str | None = None, base_dir: Path | None = None
    ) -> None:
        if (env is None) == (file is None):
            raise ValueError("a secret names exactly one of env or file")
        self.env = env
        self.file = file
        self._base_dir = base_dir

    @classmethod
    def parse(cls, value: Any, *, base_dir: Path | None = None) -> Secret:
        """Build from the YAML form; literal secrets are refused on purpose."""
        if isinstance(value, Secret):
            return value
        if isinstance(value, str):
            match = _ENV_REF.match(value.strip())
            if match:
                return cls(env=match.group(1), base_dir=base_dir)
            raise ValueError(
                "a secret must be written as ${ENV_VAR} or {file: path}; "
                "literal secrets are not allowed in records"
            )
        if isinstance(value, dict) and set(value) == {"file"} and isinstance(value["file"], str):
            return cls(file=value["file"], base_dir=base_dir)
        raise ValueError("a secret must be written as ${ENV_VAR} or {file: path}")

    @property
    def reference(self) -> str:
        """Where the secret lives, safe to show (``${X}`` or ``file:path``)."""
        return f"${{{self.env}}}" if self.env else f"file:{self.file}"

    def path(self) -> Path | None:
        if self.file is None:
            return None
        path = Path(self.file).expanduser()
        if not path.is_absolute() and self._base_dir is not None:
            path = self._base_dir / path
        return path

    def problem(self) -> str | None:
        """Why this secret cannot be resolved right now, or None."""
        if self.env is not None:
            return None if self.env in os.environ else f"environment variable {self.env} is not set"
        path = self.path()
        assert path is not None
        if not path.is_file():
            return f"secret file {path} does not exist"
        if not os.access(path, os.R_OK):
            return f"secret file {path} is not readable"
        return None

    def reveal(self) -> str:
        """Read the secret. Raises ConfigurationError naming the reference, never a value."""
        problem = self.problem()
        if problem:
            raise ConfigurationError(f"secret {self.reference}: {problem}")
        if self.env is not None:
            return os.environ[self.env]
        path = self.path()
        assert path is not None
        return path.read_text(encoding="utf-8").rstrip("\r\n")

    def __repr__(self) -> str:
        return f"Secret({self.reference})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and (self.env, self.file) == (other.env, other.file)

    def __hash__(self) -> int:
        return hash((self.env, self.file))


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret value in it replaced by ``***`` (a server's or a driver's words
    may quote what they were given; a value under 4 characters would mangle the text)."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text
