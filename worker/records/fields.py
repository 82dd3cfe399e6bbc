"""Field types shared by the record models: addresses, secrets, TLS versions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PlainSerializer,
    PlainValidator,
    ValidationInfo,
)

from worker.records.addresses import check_address, check_mailbox, check_visible_text
from worker.records.secrets import Secret


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
    if isinstance(value, str):
        check_visible_text(value, tab=True)
    return value


Address = Annotated[str, PlainValidator(check_address)]  # bare: a@b (records)
MailboxText = Annotated[str, PlainValidator(check_mailbox)]  # a@b or "Name <a@b>" (payloads)
SecretField = Annotated[
    Secret, PlainValidator(_secret), PlainSerializer(lambda s: s.reference, return_type=str)
]
TlsVersion = Annotated[Literal["1.0", "1.1", "1.2", "1.3"], BeforeValidator(_tls_version)]
Line = Annotated[str, BeforeValidator(_single_line)]


class RecordModel(BaseModel):
    """Base of record models: unknown fields are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


RecordT = TypeVar("RecordT", bound=RecordModel)


@dataclass(frozen=True)
class Loaded(Generic[RecordT]):
    """A record as the loader found it: its name (the file's stem), its file, its fields."""

    name: str
    source: Path
    record: RecordT
