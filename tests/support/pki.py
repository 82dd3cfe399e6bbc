"""A throwaway PKI generated once per test session.

Two unrelated CAs: ``ca`` issues the certificates the tests trust (a server
certificate for ``localhost``/``127.0.0.1`` and one for the wrong host name);
``other`` issues a server certificate nobody trusts.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Key = ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Postroom tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key() -> Key:
    return ec.generate_private_key(ec.SECP256R1())


def key_usage(*, ca: bool) -> x509.KeyUsage:
    """A CA signs certificates and CRLs; a leaf signs (and commits to) content."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=not ca,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: Any) -> bytes:
    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


def certificate(
    subject: x509.Name,
    public_key: Any,
    issuer: tuple[x509.Name, Any],
    valid: tuple[datetime, datetime],
    extensions: Sequence[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    """One certificate: ``issuer`` is (its name, its private key); each extension with its
    criticality. Every certificate of the suite (TLS and signing) is built here."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0])
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer[1], hashes.SHA256())


def ca_extensions(key: Any, *, path_length: int | None = None, issuer_key: Any = None) -> list[Any]:
    """What a CA certificate carries (the authority key id when another CA issued it)."""
    found: list[Any] = [
        (x509.BasicConstraints(ca=True, path_length=path_length), True),
        (key_usage(ca=True), True),
        (x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False),
    ]
    if issuer_key is not None:
        found.append((x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False))
    return found


def _ca(common_name: str) -> tuple[x509.Certificate, Key]:
    key = _key()
    now = datetime.now(UTC)
    name = _name(common_name)
    cert = certificate(
        name,
        key.public_key(),
        (name, key),
        (now - timedelta(days=1), now + timedelta(days=30)),
        ca_extensions(key),
    )
    return cert, key


def _server(
    ca: tuple[x509.Certificate, Key], common_name: str, names: list[x509.GeneralName]
) -> tuple[x509.Certificate, Key]:
    ca_cert, ca_key = ca
    key = _key()
    now = datetime.now(UTC)
    cert = certificate(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]),
        key.public_key(),
        (ca_cert.subject, ca_key),
        (now - timedelta(days=1), now + timedelta(days=20)),
        [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.SubjectAlternativeName(names), False),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
            (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False),
        ],
    )
    return cert, key


@dataclass(frozen=True)
class Pki:
    """Paths of the generated PEM / PKCS#12 files."""

    root: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    wrong_host_cert: Path
    wrong_host_key: Path
    other_ca_cert: Path
    other_server_cert: Path
    other_server_key: Path
    ca_p12: Path
    ca_p12_password: str

    @classmethod
    def create(cls, root: Path) -> Pki:
        root.mkdir(parents=True, exist_ok=True)

        def write_cert(name: str, cert: x509.Certificate) -> Path:
            path = root / name
            path.write_bytes(cert_pem(cert))
            return path

        def write_key(name: str, key: Key) -> Path:
            path = root / name
            path.write_bytes(key_pem(key))
            return path

        ca = _ca("Postroom Test CA")
        other = _ca("Untrusted Test CA")
        local = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        server = _server(ca, "localhost", local)
        wrong = _server(ca, "wrong.example", [x509.DNSName("wrong.example")])
        other_server = _server(other, "localhost", local)

        p12_password = "p12-test-password"
        ca_p12 = root / "ca.p12"
        ca_p12.write_bytes(
            pkcs12.serialize_key_and_certificates(
                b"ca",
                None,
                None,
                [pkcs12.PKCS12Certificate(ca[0], b"postroom-test-ca")],
                serialization.BestAvailableEncryption(p12_password.encode()),
            )
        )
        return cls(
            root=root,
            ca_cert=write_cert("ca.pem", ca[0]),
            server_cert=write_cert("server.pem", server[0]),
            server_key=write_key("server.key", server[1]),
            wrong_host_cert=write_cert("wrong-host.pem", wrong[0]),
            wrong_host_key=write_key("wrong-host.key", wrong[1]),
            other_ca_cert=write_cert("other-ca.pem", other[0]),
            other_server_cert=write_cert("other-server.pem", other_server[0]),
            other_server_key=write_key("other-server.key", other_server[1]),
            ca_p12=ca_p12,
            ca_p12_password=p12_password,
        )
