"""Account records as written (contract §1): the YAML's fields and the checks one field can
make alone. worker/records/account/account.py resolves them (presets, advanced keys, the rules
across fields) into what the transports use."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from worker.records.account.bounces import BouncesSettings
from worker.records.account.providers import Provider
from worker.records.fields import Address, Line, RecordModel, SecretField, TlsVersion

AuthMode = Literal["password", "oauth", "none"]
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(second|minute|hour|day|s|m|h|d)\s*$")
_RATE_SECONDS = {
    "second": 1,
    "s": 1,
    "minute": 60,
    "m": 60,
    "hour": 3600,
    "h": 3600,
    "day": 86400,
    "d": 86400,
}
_DKIM_SELECTOR = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_-]{1,63})*$")
_DKIM_DOMAIN = re.compile(r"^(?=.{1,253}$)(?:(?!-)[A-Za-z0-9-]{1,63}(?<!-)\.)+[A-Za-z]{2,63}$")


class SigningSettings(RecordModel):
    keystore: str
    alias: str | None = None


class DkimSettings(RecordModel):
    """DKIM signing (beyond the account model this follows): the key is a keystore
    entry (``keystore`` + ``alias``) or a PEM private key secret (``private_key``)."""

    domain: Line
    selector: Line
    keystore: str | None = None
    alias: str | None = None
    private_key: SecretField | None = None
    headers: list[Line] | None = None  # header fields to sign; default: dkimpy's recommended set
    canonicalization: Literal["relaxed/relaxed", "relaxed/simple", "simple/simple", "simple/relaxed"] = (
        "relaxed/relaxed"
    )

    @field_validator("domain")
    @classmethod
    def _domain(cls, value: str) -> str:
        if not _DKIM_DOMAIN.match(value.rstrip(".")):
            raise ValueError(f"{value!r} is not a domain name")
        return value

    @field_validator("selector")
    @classmethod
    def _selector(cls, value: str) -> str:
        if not _DKIM_SELECTOR.match(value):
            raise ValueError(f"{value!r} is not a valid selector (DNS labels: letters, digits, '-', '_')")
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and "from" not in (h.lower() for h in value):
            raise ValueError("must include From (RFC 6376 requires it to be signed)")
        return value

    @model_validator(mode="after")
    def _one_key(self) -> DkimSettings:
        if (self.keystore is None) == (self.private_key is None):
            raise ValueError("give exactly one of keystore (with an optional alias) or private_key")
        if self.alias is not None and self.keystore is None:
            raise ValueError("alias applies to keystore, not private_key")
        return self


class SmtpSettings(RecordModel):
    address: Address
    display_name: Line | None = None
    user_id: Line | None = None
    password: SecretField | None = None
    reply_to: Address | None = None
    host: Line | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    secure: bool = True
    protocol: Literal["starttls", "smtps"] | None = None
    min_tls_version: TlsVersion = "1.2"
    truststore: str | None = None
    auth: AuthMode | None = None
    oauth_profile: str | None = None
    signing: SigningSettings | None = None
    advanced: dict[str, str | int | float | bool] = Field(default_factory=dict)


class GraphSettings(RecordModel):
    user_principal_name: Address
    address: Address | None = None
    display_name: Line | None = None
    reply_to: Address | None = None
    auth_profile: str
    base_url: str = "https://graph.microsoft.com"
    truststore: str | None = None
    timeout: float = Field(default=30.0, gt=0, le=600)
    signing: SigningSettings | None = None

    @field_validator("base_url")
    @classmethod
    def _https(cls, value: str) -> str:
        if not value.startswith("https://"):
            raise ValueError("must be an https:// URL")
        return value.rstrip("/")


class LimitsSettings(RecordModel):
    rate: str | None = None
    max_connections: int | None = Field(default=None, ge=1, le=100)
    daily_recipients: int | None = Field(default=None, ge=1)
    max_recipients_per_message: int | None = Field(default=None, ge=1)

    @field_validator("rate")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value is not None and not _RATE.match(value):
            raise ValueError('must look like "30/minute" (per second, minute, hour or day)')
        return value


class AccountRecord(RecordModel):
    description: Line | None = None
    provider: Provider | None = None
    send_using: Literal["smtp", "graph"] = "smtp"
    smtp: SmtpSettings | None = None
    graph: GraphSettings | None = None
    limits: LimitsSettings | None = None
    dkim: DkimSettings | None = None
    bounces: BouncesSettings | None = None  # the bounce reader (worker/records/account/bounces.py)


def parse_rate(text: str) -> tuple[int, float]:
    match = _RATE.match(text)
    assert match, text
    return int(match.group(1)), float(_RATE_SECONDS[match.group(2)])
