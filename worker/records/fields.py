"""Field types shared by the record models: addresses, secrets, TLS versions."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PlainSerializer,
    PlainValidator,
    ValidationInfo,
)

from worker.records.secrets import Secret

# Deliberately simple: RFC 5322 allows more, but nothing a mail queue should accept
# from a producer contains whitespace, angle brackets, quotes or control characters.
_ADDRESS = re.compile(r"^[^\s@<>()\[\],;:\"\\]+@[^\s@<>()\[\],;:\"\\]+$")
_DOMAIN_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
# C0 but TAB, DEL, C1 and lone surrogates: never in a value that ends up in a header
CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\ud800-\udfff]")


def check_address(value: Any) -> str:
    """Validate one bare email address (``user@example.com``); returns it stripped."""
    if not isinstance(value, str):
        raise ValueError("must be an email address")
    text = value.strip()
    if "\t" in text or CONTROL.search(text):
        raise ValueError("an email address cannot contain control characters (CR/LF, DEL, C1)")
    if not _ADDRESS.match(text) or len(text) > 254:
        raise ValueError(f"{text!r} is not a valid email address")
    local, domain = text.rsplit("@", 1)
    if len(local) > 64 or local.startswith(".") or local.endswith(".") or ".." in local:
        raise ValueError(f"{text!r} is not a valid email address")
    try:
        ascii_domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"{text!r} has an invalid domain") from None
    if not all(_DOMAIN_LABEL.match(label) for label in ascii_domain.split(".")):
        raise ValueError(f"{text!r} has an invalid domain")
    return text


def _tls_version(value: Any) -> Any:
    # YAML reads an unquoted 1.2 as a float
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value}.0"
    return value


def _secret(value: Any, info: ValidationInfo) -> Secret:
    base_dir = (info.context or {}).get("base_dir")
    return Secret.parse(value, base_dir=Path(base_dir) if base_dir else None)


def _single_line(value: Any) -> Any:
    if isinstance(value, str) and ("\r" in value or "\n" in value):
        raise ValueError("must be a single line (no CR/LF)")
    if isinstance(value, str) and (found := CONTROL.search(value)):
        raise ValueError(f"control character U+{ord(found.group()):04X} is not allowed")
    return value


Address = Annotated[str, PlainValidator(check_address)]
SecretField = Annotated[
    Secret, PlainValidator(_secret), PlainSerializer(lambda s: s.reference, return_type=str)
]
TlsVersion = Annotated[Literal["1.0", "1.1", "1.2", "1.3"], BeforeValidator(_tls_version)]
Line = Annotated[str, BeforeValidator(_single_line)]


class RecordModel(BaseModel):
    """Base of record models: unknown fields are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)
