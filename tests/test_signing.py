"""Signing: S/MIME and DKIM, checked by independent verifiers.

S/MIME output is verified with ``openssl smime -verify`` against the test
root CA only (so the chain must be in the signature), naming the signer it
found; DKIM with dkimpy and a local DNS lookup function. End-to-end tests go
producer → real Redis → real Celery worker → real SMTP server (aiosmtpd) or
the local Graph, and verify what was delivered.
"""

from __future__ import annotations

import base64
import email
import email.policy
import json
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import NamedTuple

import dkim
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from test_graph_queue import MAILBOX, GraphRecords

from support.cloud import CloudServer
from support.mailcheck import strict_parse
from support.pki import Pki
from support.queue import POSTROOM, Live, OrderNotice, QueueEnv, Worker, cli, finished, unique
from support.signing_pki import P12_PASSWORD, Signer, SigningPki
from support.smtpd import SmtpServer
from worker.client import Producer
from worker.errors import ConfigurationError
from worker.mail import signing
from worker.mail.message import Attachment, MessageSpec, build_message
from worker.mail.signing import SmimeSigner
from worker.records.keystores import Keystore, KeystoreRecord
from worker.records.loader import Records

ServerFactory = Callable[..., SmtpServer]
NON_ASCII = "Grüße aus Köln — 東京 ✓\nZeile zwei\n"


@pytest.fixture(scope="session")
def spki(tmp_path_factory: pytest.TempPathFactory) -> SigningPki:
    return SigningPki(tmp_path_factory.mktemp("signing-pki"))


# ---- independent verifiers ---------------------------------------------------------------


@dataclass
class Verified:
    ok: bool
    signer: x509.Certificate | None
    content: bytes
    stderr: str


def openssl_verify(data: bytes, ca_file: Path, work: Path) -> Verified:
    """``openssl smime -verify`` with only the root CA; the signer certificate it names."""
    work.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    message, signer, content = work / f"{tag}.eml", work / f"{tag}-signer.pem", work / f"{tag}-content"
    message.write_bytes(data)
    result = subprocess.run(
        ["openssl", "smime", "-verify", "-in", str(message), "-CAfile", str(ca_file),
         "-signer", str(signer), "-out", str(content)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    ok = result.returncode == 0 and "Verification successful" in result.stderr
    cert = x509.load_pem_x509_certificate(signer.read_bytes()) if ok and signer.exists() else None
    return Verified(ok, cert, content.read_bytes() if content.exists() else b"", result.stderr)


def dns_for(selector: str, domain: str, key: rsa.RSAPrivateKey) -> Callable[..., bytes | None]:
    """A DNS TXT lookup answering only ``selector._domainkey.domain`` with ``key``'s public key."""
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)
    wanted = f"{selector}._domainkey.{domain}.".encode()

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return record if name == wanted else None

    return lookup


def tamper(data: bytes) -> bytes:
    """Change one character of the signed body (the first 'o' after the signed part's headers)."""
    start = data.index(b"------=_smime_")
    body = data.index(b"\r\n\r\n", start) + 4
    at = data.index(b"o", body)
    return data[:at] + b"0" + data[at + 1 :]


def same_cert(a: x509.Certificate | None, b: x509.Certificate) -> bool:
    return a is not None and a.fingerprint(hashes.SHA256()) == b.fingerprint(hashes.SHA256())


# ---- records ---------------------------------------------------------------------------------


class SigningRecords:
    """Keystore records (password in a secret file) and account YAML with signing and DKIM."""

    def __init__(self, accounts: Path, config: Path, spki: SigningPki) -> None:
        self.accounts, self.config, self.spki = accounts, config, spki
        self.secrets = (config.parent / "signing-secrets").resolve()
        self.secrets.mkdir(parents=True, exist_ok=True)

    def secret_file(self, value: str) -> Path:
        path = self.secrets / unique("pw-")
        path.write_text(value + "\n")
        return path

    def pkcs12_keystore(self, path: Path, password: str = P12_PASSWORD, name: str | None = None) -> str:
        name = name or unique("p12-")
        (self.config / "keystores" / f"{name}.yaml").write_text(
            f"type: pkcs12\npath: {path}\npassword: {{file: {self.secret_file(password)}}}\n"
        )
        return name

    def pem_keystore(self, key: Path, chain: Path) -> str:
        name = unique("pem-")
        (self.config / "keystores" / f"{name}.yaml").write_text(f"type: pem\nkey: {key}\nchain: {chain}\n")
        return name

    def smtp_account(
        self,
        name: str,
        server: SmtpServer | None,
        *,
        keystore: str | None = None,
        alias: str | None = None,
        dkim_lines: str = "",
    ) -> str:
        port = server.port if server is not None else 2525
        text = (
            f"provider: other\nsmtp:\n  address: {name}@example.com\n  host: 127.0.0.1\n"
            f"  port: {port}\n  secure: false\n  auth: none\n"
        )
        if keystore:
            text += f"  signing:\n    keystore: {keystore}\n"
            text += f"    alias: {alias}\n" if alias is not None else "    alias: null\n"
        (self.accounts / f"{name}.yaml").write_text(text + dkim_lines)
        return name

    def signing_account(
        self, name: str, server: SmtpServer | None, selector: str, *, days: int = 365
    ) -> tuple[Signer, rsa.RSAPrivateKey, Path]:
        """An account that signs with S/MIME (a PKCS#12 keystore, alias k) and DKIM (``selector``
        of example.com); returns its signer, its DKIM key and that key's file."""
        signer = self.spki.signer(f"{name}@example.com", days=days)
        key, key_file = rsa_key_file(self.secrets)
        keystore = self.pkcs12_keystore(self.spki.pkcs12(signer, "k"))
        self.smtp_account(
            name, server, keystore=keystore, dkim_lines=dkim_block("example.com", selector, key_file)
        )
        return signer, key, key_file


def dkim_block(domain: str, selector: str, key_file: Path) -> str:
    return f"dkim:\n  domain: {domain}\n  selector: {selector}\n  private_key: {{file: {key_file}}}\n"


def rsa_key_file(folder: Path) -> tuple[rsa.RSAPrivateKey, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = folder / unique("dkim-")
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return key, path


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spki: SigningPki) -> Iterator[SigningRecords]:
    monkeypatch.chdir(tmp_path)
    for folder in ("accounts", "config/keystores", "config/auth-profiles"):
        (tmp_path / folder).mkdir(parents=True)
    yield SigningRecords(Path("accounts"), Path("config"), spki)


def load(tree: SigningRecords) -> Records:
    return Records.load(tree.accounts, tree.config)


def keystore(path: Path, password: str = P12_PASSWORD, tmp: Path | None = None) -> Keystore:
    folder = tmp or path.parent
    secret = folder / unique("pw-")
    secret.write_text(password)
    record = KeystoreRecord.model_validate(
        {"type": "pkcs12", "path": str(path), "password": {"file": str(secret)}}
    )
    return Keystore("ks", folder / "ks.yaml", record)


# ---- S/MIME, without the queue ---------------------------------------------------------------


def test_signed_message_verifies_with_openssl_names_the_signer_and_tampering_fails(
    spki: SigningPki, tmp_path: Path
) -> None:
    signer = spki.signer("orders@example.com")
    entry = keystore(spki.pkcs12(signer, "orders")).key_entry(None)
    built = build_message(
        MessageSpec(
            "orders@example.com",
            to=["customer@example.net"],
            subject="Your order",
            text="Thanks for your order.\n",
            headers={"X-Order": "42"},
        )
    )
    signed = SmimeSigner("ks", entry).sign(built.data)
    head = signed.split(b"\r\n\r\n", 1)[0].decode()
    assert 'Content-Type: multipart/signed; protocol="application/pkcs7-signature";' in head
    assert "micalg=sha-256" in head
    for header in ("From: orders@example.com", "Subject: Your order", "X-Order: 42", "Message-ID: "):
        assert header in head  # the outer message keeps every non-content header
    assert b"\r\n" in signed and b"\n" not in signed.replace(b"\r\n", b"")

    verified = openssl_verify(signed, spki.ca_file, tmp_path)
    assert verified.ok, verified.stderr
    assert same_cert(verified.signer, signer.cert)
    assert b"Thanks for your order." in verified.content
    assert not openssl_verify(tamper(signed), spki.ca_file, tmp_path).ok


def test_attachments_non_ascii_and_fragile_lines_survive_a_mangling_relay(
    spki: SigningPki, tmp_path: Path
) -> None:
    """8-bit text is quoted-printable, binary is base64, and lines a relay rewrites (trailing
    whitespace, 'From ' at a line start) are encoded before signing, so the signature holds."""
    signer = spki.signer("orders@example.com", rsa_key=False)  # an EC signer this time
    key_file, chain_file = spki.pem(signer)
    record = KeystoreRecord.model_validate({"type": "pem", "key": str(key_file), "chain": str(chain_file)})
    entry = Keystore("pem", tmp_path / "pem.yaml", record).key_entry(None)
    built = build_message(
        MessageSpec(
            "orders@example.com",
            to=["customer@example.net"],
            subject="Grüße",
            text="Trailing space here \nFrom the start of a line\n" + NON_ASCII,
            html="<p>Grüße</p>",
            attachments=[Attachment("daten.bin", "application/octet-stream", bytes(range(256)) * 4)],
        )
    )
    signed = SmimeSigner("pem", entry).sign(built.data)
    assert signed.isascii()
    lines = signed.split(b"\r\n")
    assert not any(line.startswith(b"From ") or line.endswith(b" ") for line in lines[8:])
    # what a careless relay does: strip trailing whitespace and quote "From " lines
    relayed = b"\r\n".join(
        (b">" + line if line.startswith(b"From ") else line).rstrip(b" \t") for line in lines
    )
    verified = openssl_verify(relayed, spki.ca_file, tmp_path)
    assert verified.ok, verified.stderr
    assert same_cert(verified.signer, signer.cert)


def test_keytool_multi_key_pkcs12_selects_by_alias_and_blank_alias_is_the_first(
    spki: SigningPki, tmp_path: Path
) -> None:
    first, second = spki.signer("first@example.com"), spki.signer("second@example.com", rsa_key=False)
    ks = keystore(spki.keytool_pkcs12([("alpha", first), ("beta", second)]), tmp=tmp_path)
    assert ks.aliases() == ["alpha", "beta"]
    assert same_cert(ks.key_entry("beta").certificate, second.cert)
    assert same_cert(ks.key_entry("BETA").certificate, second.cert)  # keytool aliases are case-insensitive
    for blank in (None, "", "  "):
        assert same_cert(ks.key_entry(blank).certificate, first.cert)
    entry = ks.key_entry("beta")
    assert entry.key_matches_certificate()
    assert [c.subject for c in entry.chain] == [spki.sub_cert.subject, spki.ca_cert.subject]
    with pytest.raises(
        ConfigurationError, match=r"no key with alias 'gamma' \(aliases present: 'alpha', 'beta'\)"
    ):
        ks.key_entry("gamma")
    with pytest.raises(ConfigurationError, match="wrong password for the PKCS#12 file"):
        keystore(spki.keytool_pkcs12([("alpha", first)]), password="not-it", tmp=tmp_path).key_entry(None)
    assert P12_PASSWORD not in repr(entry) and "PRIVATE" not in repr(entry)


def test_the_signer_is_cached_per_process_and_reloaded_when_a_file_changes(
    tree: SigningRecords, spki: SigningPki
) -> None:
    name = unique("cache")
    old, new = spki.signer(f"{name}@example.com"), spki.signer(f"{name}@example.com")
    path = spki.pkcs12(old, "k")
    tree.smtp_account(name, None, keystore=tree.pkcs12_keystore(path))
    records = load(tree)
    account = records.account(name)
    first = signing.signers().smime(account, records)
    assert first is not None and signing.signers().smime(account, records) is first
    path.write_bytes(spki.pkcs12(new, "k").read_bytes())
    os.utime(path, ns=(1, 1))  # a different mtime whatever the clock's resolution
    second = signing.signers().smime(account, records)
    assert second is not None and second is not first and same_cert(second.certificate, new.cert)


# ---- accounts check ---------------------------------------------------------------------------


def test_accounts_check_reports_each_bad_signing_keystore_with_file_and_line(
    tree: SigningRecords, spki: SigningPki
) -> None:
    good = spki.signer("good@example.com")
    multi = spki.keytool_pkcs12([("alpha", spki.signer("alias@example.com")), ("beta", good)])
    wrong_pw = tree.pkcs12_keystore(spki.pkcs12(good, "good"), password="not-the-password", name="wrongpw")
    tree.smtp_account("wrongpw", None, keystore=wrong_pw)
    tree.smtp_account("alias", None, keystore=tree.pkcs12_keystore(multi, name="multi"), alias="gamma")
    expired = spki.signer("expired@example.com", expired=True)
    tree.smtp_account("expired", None, keystore=tree.pkcs12_keystore(spki.pkcs12(expired, "e"), name="exp"))
    soon = spki.signer("soon@example.com", days=10)
    tree.smtp_account("soon", None, keystore=tree.pkcs12_keystore(spki.pkcs12(soon, "s"), name="soon"))
    other = spki.signer("someone-else@example.com")
    tree.smtp_account("mismatch", None, keystore=tree.pkcs12_keystore(spki.pkcs12(other, "o"), name="other"))
    wrong_key = spki.signer("wrongkey@example.com")
    key_file, chain_file = spki.pem(wrong_key, key=spki.signer("wrongkey@example.com").key)
    tree.smtp_account("wrongkey", None, keystore=tree.pem_keystore(key_file, chain_file))
    tree.smtp_account("good", None, keystore=tree.pkcs12_keystore(multi, name="multi2"), alias="beta")

    checked = {name: [str(p) for p in problems] for name, problems in load(tree).check().items()}
    assert checked["wrongpw"] == [
        "config/keystores/wrongpw.yaml:3: password: "
        "wrong password for the PKCS#12 file (its integrity check fails)"
    ]
    assert checked["alias"] == [
        "accounts/alias.yaml:10: smtp.signing.alias: keystore multi: "
        "no key with alias 'gamma' (aliases present: 'alpha', 'beta')"
    ]
    (line,) = checked["expired"]
    assert line.startswith(
        "accounts/expired.yaml:9: smtp.signing.keystore: keystore exp alias 'e': certificate "
    )
    assert "expired on" in line
    (line,) = checked["soon"]
    assert line.startswith("accounts/soon.yaml:9: smtp.signing.keystore: warning: keystore soon alias 's': ")
    assert "expires on" in line and ("(in 9 days" in line or "(in 10 days" in line)
    (line,) = checked["mismatch"]
    assert "is for someone-else@example.com, not the account's address mismatch@example.com" in line
    (line,) = checked["wrongkey"]
    assert line.startswith("accounts/wrongkey.yaml:9: smtp.signing.keystore: ")
    assert "key/certificate mismatch" in line
    assert checked["good"] == []


def test_accounts_check_cli_fails_on_errors_and_only_warns_for_an_expiring_certificate(
    tree: SigningRecords, spki: SigningPki
) -> None:
    soon = spki.signer("soon@example.com", days=10)
    tree.smtp_account("soon", None, keystore=tree.pkcs12_keystore(spki.pkcs12(soon, "s"), name="soon"))
    env = {**os.environ, "POSTROOM_ACCOUNTS_DIR": "accounts", "POSTROOM_CONFIG_DIR": "config"}

    def check(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTROOM, "accounts", "check", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    result = check()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning: keystore soon alias 's': certificate" in result.stdout and "soon: ok" in result.stdout
    as_json = json.loads(check("--json").stdout)
    assert as_json["ok"] and as_json["accounts"]["soon"]["problems"][0]["severity"] == "warning"

    expired = spki.signer("bad@example.com", expired=True)
    tree.smtp_account("bad", None, keystore=tree.pkcs12_keystore(spki.pkcs12(expired, "b"), name="bad"))
    result = check()
    assert (
        result.returncode == 1
        and "accounts/bad.yaml:9: smtp.signing.keystore: keystore bad alias 'b'" in result.stdout
    )
    assert P12_PASSWORD not in result.stdout + result.stderr


def test_dkim_settings_are_validated(tree: SigningRecords, spki: SigningPki) -> None:
    cfg = Path("config").resolve()
    _key, key_file = rsa_key_file(cfg)
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - the point
    small_file = cfg / "small.key"
    small_file.write_bytes(
        small.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    ec_signer = spki.signer("x@example.com", rsa_key=False)
    ec_file = cfg / "ec.key"
    ec_file.write_bytes(ec_signer.key_pem)
    tree.smtp_account("ok", None, dkim_lines=dkim_block("example.com", "s1", key_file))
    tree.smtp_account("unaligned", None, dkim_lines=dkim_block("example.org", "s1", key_file))
    tree.smtp_account("small", None, dkim_lines=dkim_block("example.com", "s1", small_file))
    tree.smtp_account("eckey", None, dkim_lines=dkim_block("example.com", "s1", ec_file))
    tree.smtp_account("missing", None, dkim_lines=dkim_block("example.com", "s1", cfg / "nope.key"))
    tree.smtp_account("selector", None, dkim_lines=dkim_block("example.com", "bad selector!", key_file))
    tree.smtp_account(
        "both", None, dkim_lines=dkim_block("example.com", "s1", key_file) + "  keystore: somewhere\n"
    )
    records = load(tree)
    checked = {name: [str(p) for p in problems] for name, problems in records.check().items()}
    assert checked["ok"] == []
    assert checked["unaligned"] == [
        "accounts/unaligned.yaml:9: dkim.domain: warning: example.org does not align with the From domain "
        "example.com (DMARC will not count this signature)"
    ]
    assert checked["small"] == [
        "accounts/small.yaml:11: dkim.private_key: warning: the RSA key has 1024 bits; use 2048 or more"
    ]
    assert checked["eckey"] == [
        "accounts/eckey.yaml:11: dkim.private_key: DKIM signing needs an RSA private key (rsa-sha256)"
    ]
    (line,) = checked["missing"]
    assert (
        line.startswith("accounts/missing.yaml:11: dkim.private_key: secret file ")
        and "does not exist" in line
    )
    (line,) = checked["selector"]
    assert line.startswith("accounts/selector.yaml:10: dkim.selector: ") and "not a valid selector" in line
    (line,) = checked["both"]
    assert "give exactly one of keystore" in line


# ---- DKIM, without the queue ------------------------------------------------------------------


def test_dkim_over_smime_verifies_with_dkimpy_and_openssl_and_international_mail_reads_back(
    tree: SigningRecords, spki: SigningPki, tmp_path: Path
) -> None:
    name = unique("both")
    signer, key, _ = tree.signing_account(name, None, "sel2026")
    records = load(tree)
    account = records.account(name)
    plain = MessageSpec(f"{name}@example.com", to=["a@example.net"], subject="Hi", text=NON_ASCII)
    signed = signing.sign_message(build_message(plain).data, account, records)
    assert signed.startswith(b"DKIM-Signature: ")
    assert dkim.verify(signed, dnsfunc=dns_for("sel2026", "example.com", key))
    assert not dkim.verify(signed, dnsfunc=dns_for("sel2026", "example.com", rsa_key_file(tmp_path)[0]))
    assert not dkim.verify(tamper(signed), dnsfunc=dns_for("sel2026", "example.com", key))
    verified = openssl_verify(signed, spki.ca_file, tmp_path)
    assert verified.ok and same_cert(verified.signer, signer.cert)

    # international: IDNA domain, encoded words, a non-ASCII attachment name; no parse defect
    international = MessageSpec(
        f"{name}@example.com",
        display_name="Zoë's Shop",
        to=['"Kraków, Office" <office@bücher.example>'],
        subject="Zamówienie",
        text=NON_ASCII,
        attachments=[Attachment("lista.csv", "text/csv", "Zoë,Kraków\n".encode())],
        own_headers={"List-Unsubscribe": "<https://example.com/u/1>"},
    )
    signed = signing.sign_message(build_message(international).data, account, records)
    message = strict_parse(signed)
    assert message["To"].addresses[0].addr_spec == "office@xn--bcher-kva.example"
    assert message["Subject"] == "Zamówienie"
    assert dkim.verify(signed, dnsfunc=dns_for("sel2026", "example.com", key))
    assert openssl_verify(signed, spki.ca_file, tmp_path).ok


def test_dkim_key_from_a_keystore_record(tree: SigningRecords, tmp_path: Path) -> None:
    key, key_file = rsa_key_file(tmp_path)
    (tree.config / "keystores" / "dkim-keys.yaml").write_text(f"type: pem\nkey: {key_file}\n")
    tree.smtp_account(
        "fromstore", None, dkim_lines="dkim:\n  domain: example.com\n  selector: ks1\n  keystore: dkim-keys\n"
    )
    records = load(tree)
    assert records.check(["fromstore"]) == {"fromstore": []}
    built = build_message(MessageSpec("fromstore@example.com", to=["a@example.net"], subject="Hi", text="x"))
    signed = signing.sign_message(built.data, records.account("fromstore"), records)
    assert dkim.verify(signed, dnsfunc=dns_for("ks1", "example.com", key))


# ---- through the queue: SMTP -------------------------------------------------------------------


@pytest.fixture
def queue_records(queue_env: QueueEnv, spki: SigningPki) -> SigningRecords:
    return SigningRecords(queue_env.accounts, queue_env.config, spki)


class SignedSmtp(NamedTuple):
    """A running queue, its signing PKI and records, and a plain SMTP server for its accounts."""

    queue_env: QueueEnv
    worker: Worker
    producer: Producer
    spki: SigningPki
    records: SigningRecords
    server: SmtpServer


@pytest.fixture
def signed_smtp(live: Live, spki: SigningPki, queue_records: SigningRecords) -> SignedSmtp:
    queue_env, worker, producer, smtp_server = live
    return SignedSmtp(queue_env, worker, producer, spki, queue_records, smtp_server(mode="plain"))


def test_smime_over_smtp_with_a_keytool_alias_verifies_after_delivery(
    signed_smtp: SignedSmtp, tmp_path: Path
) -> None:
    _, _, producer, spki, queue_records, server = signed_smtp
    name = unique("signed")
    decoy, chosen = spki.signer(f"decoy-{name}@example.com"), spki.signer(f"{name}@example.com")
    p12 = spki.keytool_pkcs12([("decoy", decoy), ("orders-2026", chosen)])
    queue_records.smtp_account(name, server, keystore=queue_records.pkcs12_keystore(p12), alias="orders-2026")
    job = OrderNotice.send(producer, name)
    assert job.state == "sent", job
    (got,) = server.received
    assert got.message.get_content_type() == "multipart/signed"
    assert got.message["X-Order"] == OrderNotice.order and got.message["Message-ID"] == job.message_id
    assert OrderNotice.bcc.encode() not in got.data
    verified = openssl_verify(got.data, spki.ca_file, tmp_path)
    assert verified.ok, verified.stderr
    assert same_cert(verified.signer, chosen.cert)
    assert OrderNotice.text.strip().encode() in verified.content
    assert not openssl_verify(tamper(got.data), spki.ca_file, tmp_path).ok


def test_pem_keystore_and_blank_alias_sign_attachments_and_non_ascii_bodies(
    signed_smtp: SignedSmtp, tmp_path: Path
) -> None:
    _, _, producer, spki, queue_records, server = signed_smtp
    pem_name, p12_name = unique("pem"), unique("blank")
    pem_signer = spki.signer(f"{pem_name}@example.com", rsa_key=False)
    queue_records.smtp_account(pem_name, server, keystore=queue_records.pem_keystore(*spki.pem(pem_signer)))
    first = spki.signer(f"{p12_name}@example.com")
    p12 = spki.keytool_pkcs12([("first", first), ("second", spki.signer(f"{p12_name}@example.com"))])
    queue_records.smtp_account(p12_name, server, keystore=queue_records.pkcs12_keystore(p12), alias="")
    attachment = {
        "filename": "Übersicht.pdf",
        "content_type": "application/pdf",
        "content_base64": base64.b64encode(bytes(range(256)) * 8).decode(),
    }
    ids = [
        producer.send_notification(
            account, to=["to@example.net"], subject="Grüße", text=NON_ASCII, html="<p>Grüße ✓</p>",
            attachments=[attachment],
        )
        for account in (pem_name, p12_name)
    ]  # fmt: skip
    for job_id in ids:
        assert finished(producer, job_id).state == "sent"
    by_account = {r.message["From"].split("@")[0]: r for r in server.received}
    for account, expected in ((pem_name, pem_signer), (p12_name, first)):
        got = by_account[account]
        verified = openssl_verify(got.data, spki.ca_file, tmp_path)
        assert verified.ok, verified.stderr
        assert same_cert(verified.signer, expected.cert)
        signed_part = email.message_from_bytes(verified.content, policy=email.policy.default)
        assert isinstance(signed_part, EmailMessage)
        assert [p.get_filename() for p in signed_part.iter_attachments()] == ["Übersicht.pdf"]
        body = signed_part.get_body(("plain",))
        assert body is not None and NON_ASCII in body.get_content().replace("\r\n", "\n")


@pytest.mark.parametrize("case", ["wrong password", "missing alias", "expired certificate", "email mismatch"])
def test_broken_signing_material_dead_letters_the_job_and_nothing_is_sent(
    case: str, signed_smtp: SignedSmtp
) -> None:
    queue_env, _, producer, spki, queue_records, server = signed_smtp
    name = unique("broken")
    signer = spki.signer(f"{name}@example.com", expired=case == "expired certificate")
    if case == "email mismatch":
        signer = spki.signer(f"someone-else-{name}@example.com")
    password = "not-the-password" if case == "wrong password" else P12_PASSWORD
    path = spki.pkcs12(signer, "key")
    queue_records.smtp_account(
        name,
        server,
        keystore=queue_records.pkcs12_keystore(path, password=password),
        alias="other" if case == "missing alias" else "key",
    )
    job = finished(producer, producer.send_notification(name, ["to@example.net"], "Never unsigned", "x"))
    assert job.state == "dead" and job.attempts == 1, job
    expected = {
        "wrong password": "wrong password for the PKCS#12 file",
        "missing alias": "no key with alias 'other' (aliases present: 'key')",
        "expired certificate": "expired on",
        "email mismatch": f"not the account's address {name}@example.com",
    }[case]
    assert job.last_error is not None and job.last_error.startswith("configuration: signing: keystore ")
    assert expected in job.last_error
    assert server.received == []
    dead = json.loads(cli(queue_env, "dead-letters", "list", "--json").stdout)
    assert any(d["id"] == job.id and expected in d["error"] for d in dead)


def test_dkim_over_smime_through_smtp_and_secrets_stay_out_of_every_output(
    signed_smtp: SignedSmtp, tmp_path: Path
) -> None:
    queue_env, worker, producer, spki, queue_records, server = signed_smtp
    name = unique("dkim")
    signer, key, key_file = queue_records.signing_account(name, server, "mail2026")
    job = finished(producer, producer.send_notification(name, ["to@example.net"], "DKIM + S/MIME", NON_ASCII))
    assert job.state == "sent", job
    (got,) = server.received
    assert got.data.startswith(b"DKIM-Signature: ")
    assert dkim.verify(got.data, dnsfunc=dns_for("mail2026", "example.com", key))
    verified = openssl_verify(got.data, spki.ca_file, tmp_path)
    assert verified.ok and same_cert(verified.signer, signer.cert)

    # a broken one too, so error paths are covered by the search below
    broken = unique("dkimbad")
    queue_records.smtp_account(
        broken,
        server,
        keystore=queue_records.pkcs12_keystore(
            spki.pkcs12(spki.signer(f"{broken}@example.com"), "k"), password="nope"
        ),
    )
    assert (
        finished(producer, producer.send_notification(broken, ["to@example.net"], "x", "x")).state == "dead"
    )

    key_body = key_file.read_text().splitlines()[1]
    signer_key_body = signer.key_pem.decode().splitlines()[1]
    outputs = {
        "worker log": worker.log(),
        "redis": queue_env.dump(),
        "job json": cli(queue_env, "job", job.id, "--json").stdout,
        "dead letters": cli(queue_env, "dead-letters", "list", "--json").stdout,
        "connectivity": cli(queue_env, "test-connectivity", name, "--json").stdout,
        "accounts list": cli(queue_env, "accounts", "list", "--json").stdout,
        "signer repr": repr(
            signing.load_smime(load_queue_keystore(queue_env, name), "k", f"{name}@example.com")
        ),
    }
    for where, text in outputs.items():
        for secret in (P12_PASSWORD, "nope\n", key_body, signer_key_body):
            assert secret not in text, f"a secret in the {where}"


def load_queue_keystore(env: QueueEnv, account: str) -> Keystore:
    records = Records.load(env.accounts, env.config)
    signing_settings = records.account(account).signing
    assert signing_settings is not None
    return records.keystore(signing_settings.keystore)


def test_connectivity_shows_the_signing_certificate_and_days_to_expiry(
    queue_env: QueueEnv,
    smtp_server: ServerFactory,
    spki: SigningPki,
    queue_records: SigningRecords,
) -> None:
    server = smtp_server(mode="plain")
    name = unique("conn")
    signer, _, _ = queue_records.signing_account(name, server, "s1", days=20)
    result = cli(queue_env, "test-connectivity", name, "--json")
    report = json.loads(result.stdout)
    assert report["ok"], report
    smime = report["detail"]["signing"]
    assert smime["subject"] == signer.subject and smime["alias"] == "k"
    assert (
        smime["days_left"] in (19, 20)
        and smime["expires"][:10] == signer.cert.not_valid_after_utc.date().isoformat()
    )
    assert "expires in" in smime["warning"]
    assert report["detail"]["dkim"] == {
        "domain": "example.com",
        "selector": "s1",
        "algorithm": "rsa-sha256",
        "key_bits": 2048,
        "canonicalization": "relaxed/relaxed",
    }
    text = cli(queue_env, "test-connectivity", name).stdout
    assert f"signing certificate: {signer.subject} (expires " in text and "days left)" in text
    health = json.loads(cli(queue_env, "health", "--json").stdout)["accounts"][name]
    assert health["ok"] and health["detail"]["signing"]["subject"] == signer.subject
    assert health["detail"]["signing"]["days_left"] == smime["days_left"]

    expired_name = unique("connexp")
    queue_records.smtp_account(
        expired_name,
        server,
        keystore=queue_records.pkcs12_keystore(
            spki.pkcs12(spki.signer(f"{expired_name}@example.com", expired=True), "k")
        ),
    )
    report = json.loads(cli(queue_env, "test-connectivity", expired_name, "--json").stdout)
    assert not report["ok"] and "expired on" in report["error"] and "error" in report["detail"]["signing"]


# ---- through the queue: Graph ----------------------------------------------------------------------


class SignedGraph(NamedTuple):
    """A Graph account (``name``) on the cloud stand-in, a running worker, and what its signing
    records are made of: what the Graph signing tests take, as one fixture."""

    queue_env: QueueEnv
    producer: Producer
    cloud: CloudServer
    spki: SigningPki
    queue_records: SigningRecords
    name: str

    def with_lines(self, lines: str) -> str:
        """The Graph account's record plus ``lines``, under a new name: the workers know a new
        name at once, where a record rewritten in place may be read as it was for up to
        RECORDS_RECHECK_SECONDS (worker/records/loader.py)."""
        name = unique("signedgraph")
        base = (self.queue_env.accounts / f"{self.name}.yaml").read_text()
        (self.queue_env.accounts / f"{name}.yaml").write_text(base + lines)
        return name


@pytest.fixture
def signed_graph(
    queue_env: QueueEnv,
    worker: Worker,
    producer: Producer,
    cloud: CloudServer,
    pki: Pki,
    spki: SigningPki,
    queue_records: SigningRecords,
) -> SignedGraph:
    name = GraphRecords(queue_env, pki, cloud).account()
    return SignedGraph(queue_env, producer, cloud, spki, queue_records, name)


def test_smime_and_dkim_over_graph_mime_mode_verify(signed_graph: SignedGraph, tmp_path: Path) -> None:
    _, producer, cloud, spki, queue_records, _ = signed_graph
    signer = spki.signer(MAILBOX)
    key, key_file = rsa_key_file(queue_records.secrets)
    store = queue_records.pkcs12_keystore(
        spki.keytool_pkcs12([("other", spki.signer(MAILBOX)), ("mail", signer)])
    )
    name = signed_graph.with_lines(
        f"  signing: {{keystore: {store}, alias: mail}}\n" + dkim_block("contoso.com", "graph1", key_file)
    )
    job = finished(
        producer,
        producer.send_notification(
            name, to=["customer@example.net"], bcc=["audit@contoso.com"], subject="Signed via Graph",
            text=NON_ASCII, attachments=[{"filename": "a.txt", "content_type": "text/plain",
                                          "content_base64": base64.b64encode(b"attached\n").decode()}],
        ),
    )  # fmt: skip
    assert job.state == "sent" and job.transport == "graph", job
    (delivered,) = cloud.delivered
    assert delivered.route == "sendMail" and delivered.message.get_content_type() == "multipart/signed"
    assert delivered.message["Bcc"] == "audit@contoso.com"  # Graph's copy names the Bcc outside the signature
    verified = openssl_verify(delivered.mime, spki.ca_file, tmp_path)
    assert verified.ok, verified.stderr
    assert same_cert(verified.signer, signer.cert)
    assert dkim.verify(delivered.mime, dnsfunc=dns_for("graph1", "contoso.com", key))
    assert not openssl_verify(tamper(delivered.mime), spki.ca_file, tmp_path).ok


def test_a_graph_account_with_broken_signing_is_dead_lettered_before_any_request(
    signed_graph: SignedGraph,
) -> None:
    _, producer, cloud, spki, queue_records, _ = signed_graph
    store = queue_records.pkcs12_keystore(spki.pkcs12(spki.signer(MAILBOX, expired=True), "old"))
    name = signed_graph.with_lines(f"  signing: {{keystore: {store}}}\n")
    job = finished(producer, producer.send_notification(name, ["customer@example.net"], "x", "x"))
    assert job.state == "dead" and "expired on" in (job.last_error or ""), job
    assert cloud.delivered == [] and cloud.calls("POST", "sendMail") == []
