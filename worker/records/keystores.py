"""Keystore records: PKCS#12 or PEM files holding CA certificates and signing keys.

Used as truststores (which CAs to trust for TLS), as key credentials (an
OAuth client certificate) and as signing keystores (S/MIME, DKIM). Loading is
lazy: callers that use a key per message cache what they load
(:mod:`worker.mail.signing`); every failure names the record field, never a
password.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from asn1crypto import pkcs12 as a12
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_der_private_key,
    load_pem_private_key,
    pkcs12,
)
from pydantic import model_validator

from worker.errors import ConfigurationError
from worker.records.fields import Loaded, RecordModel, SecretField


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
class Keystore(Loaded[KeystoreRecord]):
    """A validated keystore record, ready to open."""

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

    def _password(self) -> bytes | None:
        rec = self.record
        return rec.password.reveal().encode() if rec.password else None

    def _load_pkcs12(self) -> tuple[bytes, pkcs12.PKCS12KeyAndCertificates]:
        """The file's bytes and cryptography's view of it (which checks the password)."""
        rec = self.record
        assert rec.path is not None
        data = self._read("path", rec.path)
        try:
            return data, pkcs12.load_pkcs12(data, self._password())
        except ValueError:
            pass
        if _is_pfx(data):
            raise ConfigurationError(
                f"keystore {self.name}: password: wrong password for the PKCS#12 file "
                "(its integrity check fails)"
            ) from None
        raise ConfigurationError(
            f"keystore {self.name}: path: {self._file(rec.path)} is not a PKCS#12 file"
        ) from None

    def trusted_certificates(self) -> list[x509.Certificate]:
        """The CA certificates this keystore holds, for use as a truststore."""
        rec = self.record
        if rec.type == "pkcs12":
            _data, loaded = self._load_pkcs12()
            certs = ([loaded.cert.certificate] if loaded.cert is not None else []) + [
                c.certificate for c in loaded.additional_certs
            ]
        else:
            certs = []
            for field_name in ("certificates", "chain"):
                value = getattr(rec, field_name)
                if value:
                    certs += self._pem_certificates(field_name, value)
        if not certs:
            raise ConfigurationError(f"keystore {self.name}: holds no certificates")
        return certs

    def _pem_certificates(self, field_name: str, value: str) -> list[x509.Certificate]:
        try:
            return x509.load_pem_x509_certificates(self._read(field_name, value))
        except ValueError:
            raise ConfigurationError(
                f"keystore {self.name}: {field_name}: no PEM certificates in {value}"
            ) from None

    def cadata(self) -> str:
        """PEM text of the trusted certificates, for ``ssl.SSLContext.load_verify_locations``."""
        return "".join(c.public_bytes(Encoding.PEM).decode("ascii") for c in self.trusted_certificates())

    def files(self) -> tuple[Path, ...]:
        """Every file this keystore reads (the record, its key/certificate files, a password file)."""
        rec = self.record
        paths = [self.source]
        for value in (rec.path, rec.certificates, rec.key, rec.chain):
            if value:
                paths.append(self._file(value))
        for secret in (rec.password, rec.key_password):
            secret_path = secret.path() if secret is not None else None
            if secret_path is not None:
                paths.append(secret_path)
        return tuple(paths)

    def key_entries(self) -> list[KeyEntry]:
        """Every private key this keystore holds, with its certificate and chain.

        PKCS#12: one entry per key bag, named by its friendly name (the alias
        Java keytool and OpenSSL write). ``cryptography`` reads only the first
        key of a file, so the bag structure is read with ``asn1crypto`` and each
        shrouded key bag is decrypted by ``cryptography``; the certificates come
        from ``cryptography`` (which also verifies the file's MAC, i.e. the
        password). PEM: the one key, with ``chain`` (leaf first).
        """
        rec = self.record
        if rec.type == "pem":
            if not rec.key:
                raise ConfigurationError(
                    f"keystore {self.name}: key: a PEM keystore needs key for a key entry"
                )
            key_password = rec.key_password.reveal().encode() if rec.key_password else None
            try:
                key = load_pem_private_key(self._read("key", rec.key), key_password)
            except (ValueError, TypeError):
                raise ConfigurationError(
                    f"keystore {self.name}: key: cannot load the private key "
                    "(wrong key_password or not a PEM key)"
                ) from None
            certs = self._pem_certificates("chain", rec.chain) if rec.chain else []
            leaf = certs[0] if certs else None
            return [KeyEntry(None, key, leaf, _chain(leaf, certs[1:]) if leaf else ())]

        data, loaded = self._load_pkcs12()
        password = self._password()
        bundled = ([loaded.cert] if loaded.cert is not None else []) + list(loaded.additional_certs)
        all_certs = [c.certificate for c in bundled]
        try:
            bags = _key_bags(data)
        except ValueError:  # a structure asn1crypto cannot read: fall back to the first key
            bags = None
        entries: list[KeyEntry] = []
        if bags:
            for alias, der, encrypted in bags:
                try:
                    key = load_der_private_key(der, password if encrypted else None)
                except (ValueError, TypeError, UnsupportedAlgorithm):
                    raise ConfigurationError(
                        f"keystore {self.name}: path: cannot decrypt the key "
                        f"{alias or '(no alias)'!r} with the keystore password"
                    ) from None
                entries.append(KeyEntry(alias, key, *_certificate_for(key, all_certs)))
        elif loaded.key is not None:  # keys inside an encrypted container: cryptography's first key
            name = loaded.cert.friendly_name if loaded.cert is not None else None
            entries.append(
                KeyEntry(name.decode("utf-8", "replace") if name else None, loaded.key,
                         *_certificate_for(loaded.key, all_certs))
            )  # fmt: skip
        return entries

    def aliases(self) -> list[str]:
        """The aliases (friendly names) of the keys, in file order."""
        return [e.alias or "(no alias)" for e in self.key_entries()]

    def key_entry(self, alias: str | None = None) -> KeyEntry:
        """The entry ``alias`` names (exact, else case-insensitive like keytool); blank = the first."""
        entries = self.key_entries()
        if not entries:
            raise ConfigurationError(f"keystore {self.name}: holds no private key")
        if alias is None or not alias.strip() or self.record.type == "pem":
            return entries[0]
        found = [e for e in entries if e.alias == alias] or [
            e for e in entries if (e.alias or "").lower() == alias.lower()
        ]
        if found:
            return found[0]
        present = ", ".join(repr(e.alias) if e.alias else "(no alias)" for e in entries)
        raise ConfigurationError(
            f"keystore {self.name}: alias: no key with alias {alias!r} (aliases present: {present})"
        )

    def private_key(self, alias: str | None = None) -> tuple[str, x509.Certificate]:
        """(PKCS#8 PEM private key, its certificate) for a key credential; ``alias``
        picks a PKCS#12 entry by friendly name (empty = the first key).

        The PEM text is a secret: callers hand it to the signer and drop it.
        """
        entry = self.key_entry(alias)
        if entry.certificate is None:
            raise ConfigurationError(f"keystore {self.name}: holds no private key with a certificate")
        return entry.key_pem(), entry.certificate


@dataclass(frozen=True)
class KeyEntry:
    """One private key of a keystore, its certificate (None if the store has none for it)
    and the issuers above that certificate as far as the store has them."""

    alias: str | None
    key: PrivateKeyTypes = field(repr=False)
    certificate: x509.Certificate | None
    chain: tuple[x509.Certificate, ...] = ()

    def key_pem(self) -> str:
        """The key as unencrypted PKCS#8 PEM: a secret, for libraries that want text."""
        return self.key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode("ascii")

    def key_matches_certificate(self) -> bool:
        if self.certificate is None:
            return False
        return _spki(self.certificate.public_key()) == _spki(self.key.public_key())


def _spki(public_key: Any) -> bytes:
    return bytes(public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))


def _is_pfx(data: bytes) -> bool:
    try:
        pfx = a12.Pfx.load(data)
        return pfx["version"].native == "v3" and pfx["auth_safe"]["content_type"].native in (
            "data",
            "signed_data",
        )
    except (ValueError, TypeError, KeyError):
        return False


def _key_bags(data: bytes) -> list[tuple[str | None, bytes, bool]]:
    """(friendly name, DER, encrypted?) of every key bag in the unencrypted parts of a PFX.

    Raises ValueError when the structure cannot be read."""
    found: list[tuple[str | None, bytes, bool]] = []

    def walk(bags: Any) -> None:
        for bag in bags:
            kind = bag["bag_id"].native
            if kind == "pkcs8_shrouded_key_bag":
                found.append((_friendly_name(bag), bag["bag_value"].untag().dump(), True))
            elif kind == "key_bag":
                found.append((_friendly_name(bag), bag["bag_value"].untag().dump(), False))
            elif kind == "safe_contents":
                walk(bag["bag_value"])

    try:
        pfx = a12.Pfx.load(data)
        for content_info in pfx.authenticated_safe:
            if content_info["content_type"].native == "data":
                walk(a12.SafeContents.load(content_info["content"].native))
    except (TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"unreadable PKCS#12 structure ({type(exc).__name__})") from None
    return found


def _friendly_name(bag: Any) -> str | None:
    for attribute in bag["bag_attributes"]:
        if attribute["type"].native == "friendly_name":
            values = attribute["values"].native
            if values:
                return str(values[0])
    return None


def _certificate_for(
    key: PrivateKeyTypes, certs: list[x509.Certificate]
) -> tuple[x509.Certificate | None, tuple[x509.Certificate, ...]]:
    """The certificate of ``key`` among ``certs`` (by public key) and its chain."""
    wanted = _spki(key.public_key())
    for cert in certs:
        if _spki(cert.public_key()) == wanted:
            return cert, _chain(cert, [c for c in certs if c is not cert])
    return None, ()


def _chain(leaf: x509.Certificate, pool: list[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    """The issuers of ``leaf`` found in ``pool``, nearest first (each verified to have signed
    the one below it); stops at a self-signed certificate."""
    chain: list[x509.Certificate] = []
    current = leaf
    seen = {leaf.fingerprint(hashes.SHA256())}
    while current.issuer != current.subject:
        parent = None
        for candidate in pool:
            if candidate.subject != current.issuer or candidate.fingerprint(hashes.SHA256()) in seen:
                continue
            try:
                current.verify_directly_issued_by(candidate)
            except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
                continue
            parent = candidate
            break
        if parent is None:
            break
        chain.append(parent)
        seen.add(parent.fingerprint(hashes.SHA256()))
        current = parent
    return tuple(chain)
