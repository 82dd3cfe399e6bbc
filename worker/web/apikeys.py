"""Producer API keys for the HTTP submission API: ``config/api-keys/<name>.yaml``.

A key is shown to its producer once, as ``<name>.<secret>``; the record keeps
only a hash of it::

    hash: sha256:9f86d081884c7d65...          # or pbkdf2-sha256:<iterations>:<salt hex>:<hex>
    accounts: [orders, billing]              # the accounts it may send from ("*": every account)
    rate: 60/minute                          # requests per second, minute or hour
    operator: true                           # optional: the key also opens the operator dashboard

``postroom api-keys new NAME --account orders`` writes such a record;
``postroom api-keys new NAME --operator`` an operator's (``accounts`` may then
be left out: an operator key need not send from any account). The
secret is 32 random bytes, so a plain SHA-256 cannot be searched backwards; a
PBKDF2 hash is accepted for operators who bring keys of their own. The digest
of a presented key is compared with ``hmac.compare_digest`` (constant time),
and a request naming an unknown key still pays for one hash and one
comparison, so timing tells nothing about which names exist.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, ValidationInfo, field_validator

from worker.errors import RecordProblem
from worker.mail.payload import Strict
from worker.records.loader import _NAME, _load_all, _validate
from worker.records.yamlsrc import YamlDocument
from worker.settings import api_keys_dir

_RATE = re.compile(r"^\s*(\d{1,7})\s*/\s*(second|minute|hour)\s*$")
_PERIODS = {"second": 1, "minute": 60, "hour": 3600}
_SHA256 = re.compile(r"^sha256:[0-9a-f]{64}$")
_PBKDF2 = re.compile(r"^pbkdf2-sha256:(\d{1,9}):([0-9a-f]{16,128}):([0-9a-f]{64})$")
_DUMMY_HASH = "sha256:" + "0" * 64


class ApiKeyRecord(Strict):
    hash: str
    operator: bool = False  # declared before accounts: their check reads it
    accounts: list[str] = Field(default_factory=list, validate_default=True)
    rate: str = "60/minute"
    description: str = ""

    @field_validator("hash")
    @classmethod
    def _hash(cls, value: str) -> str:
        if not (_SHA256.match(value) or _PBKDF2.match(value)):
            raise ValueError(
                "must be sha256:<64 hex digits> or pbkdf2-sha256:<iterations>:<salt hex>:<64 hex digits>"
            )
        return value

    @field_validator("accounts")
    @classmethod
    def _accounts(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if not value and not info.data.get("operator"):
            raise ValueError("a producer key needs at least one account ('*' for every account)")
        for name in value:
            if name != "*" and not _NAME.match(name):
                raise ValueError(f"{name!r} is not an account name (or '*' for every account)")
        return value

    @field_validator("rate")
    @classmethod
    def _rate(cls, value: str) -> str:
        match = _RATE.match(value)
        if not match or int(match.group(1)) < 1:
            raise ValueError("must read like 60/minute (a count per second, minute or hour)")
        return value


@dataclass(frozen=True)
class ApiKey:
    name: str
    source: Path
    hash: str
    accounts: frozenset[str]
    limit: int  # requests …
    period: int  # … per this many seconds
    operator: bool = False  # may log in to the operator dashboard

    def may_send_from(self, account: str) -> bool:
        return "*" in self.accounts or account in self.accounts

    def visible_accounts(self, names: list[str]) -> list[str]:
        return [n for n in names if self.may_send_from(n)]


def _build(doc: YamlDocument) -> ApiKey:
    record = _validate(doc, ApiKeyRecord)
    limit, period = parse_rate(record.rate)
    return ApiKey(
        name=doc.name,
        source=doc.path,
        hash=record.hash,
        accounts=frozenset(record.accounts),
        limit=limit,
        period=period,
        operator=record.operator,
    )


def parse_rate(value: str) -> tuple[int, int]:
    """``10/minute`` -> (10, 60): a count and its period in seconds (ValueError when unreadable)."""
    match = _RATE.match(value)
    if not match or int(match.group(1)) < 1:
        raise ValueError(f"{value!r} does not read like 10/minute (a count per second, minute or hour)")
    return int(match.group(1)), _PERIODS[match.group(2)]


def load_api_keys(config_dir: Path) -> tuple[dict[str, ApiKey], dict[str, list[RecordProblem]]]:
    """Every key under ``config_dir/api-keys`` (or ``POSTROOM_API_KEYS_DIR``), and the problems of
    those that failed to load."""
    return _load_all(api_keys_dir(config_dir), _build)


def digest(token: str, stored: str) -> str:
    """``token`` hashed the way ``stored`` was (same algorithm, salt and iterations)."""
    pbkdf2 = _PBKDF2.match(stored)
    if pbkdf2:
        iterations, salt = int(pbkdf2.group(1)), bytes.fromhex(pbkdf2.group(2))
        value = hashlib.pbkdf2_hmac("sha256", token.encode(), salt, iterations).hex()
        return f"pbkdf2-sha256:{iterations}:{pbkdf2.group(2)}:{value}"
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def key_name(token: str | None) -> str:
    """The name part of a ``<name>.<secret>`` token ("" if it has none)."""
    return (token or "").rpartition(".")[0]


def valid_name(name: str) -> bool:
    return bool(_NAME.match(name))


def verify(keys: dict[str, ApiKey], token: str | None) -> ApiKey | None:
    """The key ``token`` (``<name>.<secret>``) belongs to, or None; compared in constant time."""
    token = token or ""
    name = key_name(token)
    key = keys.get(name) if name else None
    stored = key.hash if key is not None else _DUMMY_HASH
    matches = hmac.compare_digest(digest(token, stored).encode(), stored.encode())
    return key if matches and key is not None else None


def new_token(name: str) -> str:
    return f"{name}.{secrets.token_urlsafe(32)}"


def hash_token(token: str, *, pbkdf2_iterations: int = 0) -> str:
    """The ``hash:`` value for a token (PBKDF2 when iterations are given, else SHA-256)."""
    if pbkdf2_iterations:
        return digest(token, f"pbkdf2-sha256:{pbkdf2_iterations}:{secrets.token_hex(16)}:{'0' * 64}")
    return digest(token, _DUMMY_HASH)
