"""A throwaway PKI generated once per test session.

Two unrelated CAs: ``ca`` issues the certificates the tests trust (a server
certificate for ``localhost``/``127.0.0.1`` and one for the wrong host name);
``other`` issues a server certificate nobody trusts.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

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


def _ca(common_name: str) -> tuple[x509.Certificate, Key]:
    key = _key()
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _server(
    ca: tuple[x509.Certificate, Key], common_name: str, names: list[x509.GeneralName]
) -> tuple[x509.Certificate, Key]:
    ca_cert, ca_key = ca
    key = _key()
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=20))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
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
            path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            return path

        def write_key(name: str, key: Key) -> Path:
            path = root / name
            path.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
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
