"""Signing material a record names: is it usable, and the DKIM key it points at.

The checks behind both ``postroom accounts check`` (which reports every finding
at the record's file:line) and the worker (which refuses to load a signer on the
first error): S/MIME key entries against the account's From address and their
certificates' validity, DKIM keys and the DKIM domain's alignment. They sit in
records, not beside the signers in :mod:`worker.mail.signing`, so the loader's
checks need nothing from mail: mail builds on records, never the other way.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import NameOID

from worker.errors import ConfigurationError
from worker.records.keystores import KeyEntry

if TYPE_CHECKING:  # pragma: no cover
    from worker.records.account.record import DkimSettings
    from worker.records.loader import Records

EXPIRY_WARNING_DAYS = 30
Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Finding:
    """One thing wrong (or about to be) with signing material."""

    severity: Severity
    reason: str


def certificate_emails(cert: x509.Certificate) -> list[str]:
    """The email addresses a certificate names (SAN rfc822Name, then subject emailAddress)."""
    emails: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        emails += [str(e) for e in san.get_values_for_type(x509.RFC822Name)]
    except x509.ExtensionNotFound:
        pass
    emails += [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS)]
    return emails


def days_left(cert: x509.Certificate, now: datetime | None = None) -> int:
    """Whole days until ``cert`` expires (negative once it has)."""
    delta = cert.not_valid_after_utc - (now or datetime.now(UTC))
    return delta.days


def smime_findings(entry: KeyEntry, from_address: str, now: datetime | None = None) -> list[Finding]:
    """What stops (error) or will soon stop (warning) ``entry`` from signing mail from ``from_address``."""
    cert = entry.certificate
    if cert is None:
        return [Finding("error", "the keystore has no certificate for this key")]
    found: list[Finding] = []
    subject = cert.subject.rfc4514_string()
    if not isinstance(entry.key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        found.append(Finding("error", f"S/MIME signing needs an RSA or EC key (certificate {subject})"))
    if not entry.key_matches_certificate():
        found.append(
            Finding(
                "error",
                f"the private key does not match the certificate {subject} (key/certificate mismatch)",
            )
        )
    now = now or datetime.now(UTC)
    expires = cert.not_valid_after_utc
    if expires <= now:
        found.append(Finding("error", f"certificate {subject} expired on {expires:%Y-%m-%d}"))
    elif cert.not_valid_before_utc > now:
        found.append(
            Finding(
                "error", f"certificate {subject} is not valid before {cert.not_valid_before_utc:%Y-%m-%d}"
            )
        )
    elif (expires - now).days < EXPIRY_WARNING_DAYS:
        found.append(
            Finding(
                "warning",
                f"certificate {subject} expires on {expires:%Y-%m-%d} "
                f"(in {days_left(cert, now)} days; renew it before then)",
            )
        )
    for issuer in entry.chain:
        if issuer.not_valid_after_utc <= now:
            found.append(
                Finding(
                    "error",
                    f"chain certificate {issuer.subject.rfc4514_string()} expired on "
                    f"{issuer.not_valid_after_utc:%Y-%m-%d}",
                )
            )
    emails = certificate_emails(cert)
    if from_address.lower() not in (e.lower() for e in emails):
        named = ", ".join(emails) if emails else "no email address"
        found.append(
            Finding(
                "error",
                f"certificate {subject} is for {named}, not the account's address {from_address}",
            )
        )
    return found


def dkim_key_findings(key: Any) -> list[Finding]:
    if not isinstance(key, rsa.RSAPrivateKey):
        return [Finding("error", "DKIM signing needs an RSA private key (rsa-sha256)")]
    if key.key_size < 1024:
        return [Finding("error", f"the RSA key has {key.key_size} bits; verifiers refuse fewer than 1024")]
    if key.key_size < 2048:
        return [Finding("warning", f"the RSA key has {key.key_size} bits; use 2048 or more")]
    return []


def dkim_settings_findings(settings: DkimSettings, from_address: str) -> list[tuple[str, Finding]]:
    """(field, finding) for the DKIM settings themselves (not the key)."""
    found: list[tuple[str, Finding]] = []
    domain = settings.domain.lower().rstrip(".")
    from_domain = from_address.rsplit("@", 1)[-1].lower()
    if from_domain != domain and not from_domain.endswith("." + domain):
        found.append(
            (
                "domain",
                Finding(
                    "warning",
                    f"{domain} does not align with the From domain {from_domain} "
                    "(DMARC will not count this signature)",
                ),
            )
        )
    return found


def first_error(findings: list[Finding]) -> str | None:
    """The first blocking reason, if any: what a signer refuses to load with."""
    return next((f.reason for f in findings if f.severity == "error"), None)


def dkim_key(settings: DkimSettings, records: Records) -> tuple[Any, tuple[Path, ...]]:
    """(the DKIM private key, the files it came from); ConfigurationError when it cannot be loaded."""
    if settings.keystore:
        keystore = records.keystore(settings.keystore)
        return keystore.key_entry(settings.alias).key, keystore.files()
    assert settings.private_key is not None  # the model requires one of the two
    text = settings.private_key.reveal()
    try:
        key = load_pem_private_key(text.encode("utf-8"), None)
    except (ValueError, TypeError):
        raise ConfigurationError(
            f"dkim private_key {settings.private_key.reference}: not an unencrypted PEM private key"
        ) from None
    path = settings.private_key.path()
    return key, (path,) if path is not None else ()
