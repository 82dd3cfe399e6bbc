"""OAuth 2.0 auth profile records (validated now; used by the Graph/XOAUTH2 transports).

The ``type`` field selects the model directly (rather than a pydantic union) so
errors point at the real field path, not at a union branch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from pydantic import Field, field_validator, model_validator

from worker.errors import ConfigurationError
from worker.records.fields import Address, Loaded, RecordModel, SecretField

MS_GRAPH_DEFAULT_SCOPE = "https://graph.microsoft.com/.default"


def _https(value: str) -> str:
    if not value.startswith(("https://", "http://127.0.0.1", "http://localhost")):
        raise ValueError("must be an https:// URL")
    return value.rstrip("/")


class KeystoreRef(RecordModel):
    keystore: str
    alias: str | None = None


class ClientCredentialsProfile(RecordModel):
    type: Literal["client_credentials"]
    authority: str
    client_id: str = Field(min_length=1)
    client_secret: SecretField | None = None
    certificate: KeystoreRef | None = None
    scopes: list[str] = Field(default_factory=lambda: [MS_GRAPH_DEFAULT_SCOPE], min_length=1)
    truststore: str | None = None

    _authority = field_validator("authority")(_https)

    @model_validator(mode="after")
    def _one_credential(self) -> ClientCredentialsProfile:
        if (self.client_secret is None) == (self.certificate is None):
            raise ValueError("client_credentials needs exactly one of client_secret or certificate")
        return self


class PasswordProfile(RecordModel):
    type: Literal["password"]
    authority: str
    client_id: str = Field(min_length=1)
    client_secret: SecretField | None = None
    username: Address
    password: SecretField
    scopes: list[str] = Field(default_factory=lambda: [MS_GRAPH_DEFAULT_SCOPE], min_length=1)
    truststore: str | None = None

    _authority = field_validator("authority")(_https)


class JwtBearerProfile(RecordModel):
    type: Literal["jwt_bearer"]
    service_account_file: str
    subject: Address
    token_url: str = "https://oauth2.googleapis.com/token"  # noqa: S105 (a URL)
    scope: str = "https://mail.google.com/"
    truststore: str | None = None

    _token_url = field_validator("token_url")(_https)


AuthProfileRecord = ClientCredentialsProfile | PasswordProfile | JwtBearerProfile
PROFILE_TYPES: dict[str, type[AuthProfileRecord]] = {
    "client_credentials": ClientCredentialsProfile,
    "password": PasswordProfile,
    "jwt_bearer": JwtBearerProfile,
}


def profile_model(data: dict[str, Any]) -> type[AuthProfileRecord] | str:
    """The model for ``data['type']``, or the reason there is none."""
    kind = data.get("type")
    if kind not in PROFILE_TYPES:
        return f"must be one of {', '.join(PROFILE_TYPES)} (got {kind!r})"
    return PROFILE_TYPES[kind]


@dataclass(frozen=True)
class AuthProfile(Loaded[AuthProfileRecord]):
    @property
    def type(self) -> str:
        return self.record.type

    def keystore_refs(self) -> list[tuple[str, str]]:
        """(field, keystore name) pairs this profile depends on."""
        refs = []
        if self.record.truststore:
            refs.append(("truststore", self.record.truststore))
        if isinstance(self.record, ClientCredentialsProfile) and self.record.certificate:
            refs.append(("certificate.keystore", self.record.certificate.keystore))
        return refs


# ---- Google service account key files (jwt_bearer) ----------------------------------------


@dataclass(frozen=True)
class ServiceAccount:
    client_email: str
    private_key: str = field(repr=False)
    private_key_id: str | None


def load_service_account(profile: AuthProfile) -> ServiceAccount:
    """Read and check the profile's Google JSON key file (ConfigurationError otherwise)."""
    rec = profile.record
    assert isinstance(rec, JwtBearerProfile)
    path = service_account_path(profile)
    where = f"auth profile {profile.name}: service_account_file"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigurationError(f"{where}: cannot read {path}: {exc.strerror}") from None
    except ValueError:
        raise ConfigurationError(
            f"{where}: {path} is not JSON (expected Google's service account key)"
        ) from None
    if not isinstance(data, dict):
        raise ConfigurationError(f"{where}: {path} is not a service account key file")
    missing = [k for k in ("client_email", "private_key") if not isinstance(data.get(k), str)]
    if missing:
        raise ConfigurationError(f"{where}: {path} has no {' or '.join(missing)}")
    key = data["private_key"]
    try:
        loaded = load_pem_private_key(key.encode(), None)
    except (ValueError, TypeError):
        raise ConfigurationError(f"{where}: private_key in {path} is not a PEM private key") from None
    if not isinstance(loaded, RSAPrivateKey):
        raise ConfigurationError(f"{where}: private_key in {path} is not an RSA key (RS256 needs one)")
    key_id = data.get("private_key_id")
    return ServiceAccount(data["client_email"], key, key_id if isinstance(key_id, str) else None)


def service_account_path(profile: AuthProfile) -> Path:
    rec = profile.record
    assert isinstance(rec, JwtBearerProfile)
    path = Path(rec.service_account_file).expanduser()
    return path if path.is_absolute() else profile.source.parent / path
