"""Keystore records: PKCS#12 or PEM files holding CA certificates and signing keys.

Used as truststores now (which CAs to trust for TLS) and as signing keystores
later. Loading is lazy and cached by file identity so a worker does not
re-read files per message; every failure names the record field, never a
password.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
    pkcs12,
)
from pydantic import model_validator

from worker.errors import ConfigurationError
from worker.fields import RecordModel, SecretField


class KeystoreRecord(RecordModel):
    type: Literal["pkcs12", "pem"]
    path: str | None = None  # pkcs12 file
    password: SecretField | None = None  # pkcs12 password
    certificates: str | None = None  # pem: CA bundle (truststore) or extra certificates
    key: str | None = None  # pem: private key (signing)
    key_password: SecretField | None = None
    chain: str | None = None  # pem: certificate chain for the key (leaf first)

    @model_validator(mode="after")
    def _fields_for_type(self) -> KeystoreRecord:
        if self.type == "pkcs12":
            if not self.path:
                raise ValueError("type pkcs12 needs path")
            if self.certificates or self.key or self.chain:
                raise ValueError("certificates/key/chain are for type pem; pkcs12 uses path")
        elif not (self.certificates or self.key or self.chain):
            raise ValueError("type pem needs certificates (a truststore) or key + chain")
        return self


@dataclass(frozen=True)
class Keystore:
    """A validated keystore record, ready to open."""

    name: str
    source: Path
    record: KeystoreRecord

    def _file(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.source.parent / path

    def _read(self, field: str, value: str) -> bytes:
        path = self._file(value)
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ConfigurationError(
                f"keystore {self.name}: {field}: cannot read {path}: {exc.strerror}"
            ) from None

    def trusted_certificates(self) -> list[x509.Certificate]:
        """The CA certificates this keystore holds, for use as a truststore."""
        rec = self.record
        if rec.type == "pkcs12":
            assert rec.path is not None
            data = self._read("path", rec.path)
            password = rec.password.reveal().encode() if rec.password else None
            try:
                _key, cert, extra = pkcs12.load_key_and_certificates(data, password)
            except ValueError:
                raise ConfigurationError(
                    f"keystore {self.name}: path: cannot open PKCS#12 file "
                    "(wrong password or not a PKCS#12 file)"
                ) from None
            certs = ([cert] if cert is not None else []) + list(extra)
        else:
            certs = []
            for field in ("certificates", "chain"):
                value = getattr(rec, field)
                if value:
                    try:
                        certs += x509.load_pem_x509_certificates(self._read(field, value))
                    except ValueError:
                        raise ConfigurationError(
                            f"keystore {self.name}: {field}: no PEM certificates in {value}"
                        ) from None
        if not certs:
            raise ConfigurationError(f"keystore {self.name}: holds no certificates")
        return certs

    def cadata(self) -> str:
        """PEM text of the trusted certificates, for ``ssl.SSLContext.load_verify_locations``."""
        return "".join(c.public_bytes(Encoding.PEM).decode("ascii") for c in self.trusted_certificates())

    def private_key(self, alias: str | None = None) -> tuple[str, x509.Certificate]:
        """(PKCS#8 PEM private key, its certificate) for a key credential; ``alias``
        picks a PKCS#12 entry by friendly name (empty = the first key).

        The PEM text is a secret: callers hand it to the signer and drop it.
        """
        rec = self.record
        key: PrivateKeyTypes | None
        cert: x509.Certificate | None
        if rec.type == "pkcs12":
            assert rec.path is not None
            data = self._read("path", rec.path)
            password = rec.password.reveal().encode() if rec.password else None
            try:
                loaded = pkcs12.load_pkcs12(data, password)
            except ValueError:
                raise ConfigurationError(
                    f"keystore {self.name}: path: cannot open PKCS#12 file "
                    "(wrong password or not a PKCS#12 file)"
                ) from None
            key = loaded.key
            cert = loaded.cert.certificate if loaded.cert is not None else None
            name = loaded.cert.friendly_name.decode() if loaded.cert and loaded.cert.friendly_name else None
            if alias is not None and alias != name:
                raise ConfigurationError(
                    f"keystore {self.name}: no key with alias {alias!r} (found {name or 'none'})"
                )
        else:
            if not rec.key or not rec.chain:
                raise ConfigurationError(f"keystore {self.name}: a key credential needs key and chain")
            key_password = rec.key_password.reveal().encode() if rec.key_password else None
            try:
                key = load_pem_private_key(self._read("key", rec.key), key_password)
            except (ValueError, TypeError):
                raise ConfigurationError(
                    f"keystore {self.name}: key: cannot load the private key "
                    "(wrong key_password or not a PEM key)"
                ) from None
            try:
                cert = x509.load_pem_x509_certificates(self._read("chain", rec.chain))[0]
            except ValueError:
                raise ConfigurationError(
                    f"keystore {self.name}: chain: no PEM certificates in {rec.chain}"
                ) from None
        if key is None or cert is None:
            raise ConfigurationError(f"keystore {self.name}: holds no private key with a certificate")
        pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode("ascii")
        return pem, cert
