"""Message signing: S/MIME (detached ``multipart/signed``) and DKIM.

Runs in the worker after the MIME is built and before it is handed to a
transport, so SMTP and Graph (MIME mode) carry the same signed bytes.

S/MIME (RFC 8551): the message's content headers (``Content-*``) and body
become the signed entity, canonicalised to CRLF and made 7-bit safe first
(quoted-printable for text, base64 otherwise; trailing whitespace and
``From `` at a line start are encoded too, since relays mangle them). The
exact bytes signed are the bytes placed in the message: ``cryptography``'s
PKCS#7 builder is given ``Binary`` so it does not re-canonicalise them, and
``DetachedSignature`` so mail clients without S/MIME still show the message.
Every other header (From, To, Subject, Message-ID, custom ones) stays on the
outer ``multipart/signed`` message. SHA-256, signer certificate and the chain
the keystore holds are included.

DKIM (RFC 6376) is applied last, over the final (S/MIME-signed) message, with
``dkimpy``; relaxed/relaxed canonicalisation by default.

Keys are loaded once per process and cached: a cached signer is reused until
its keystore record, a file it reads, or the account's settings change. A
signer never prints its key; errors name records and fields, never secrets.
Whether the material is usable at all (certificate dates and address, key type
and size) is decided by :mod:`worker.records.signing_material`, which
``accounts check`` shares; its names (``Finding``, ``smime_findings``, ...) were
first defined here and stay importable from here.
"""

from __future__ import annotations

import base64
import quopri
import re
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from email.generator import BytesGenerator
from email.parser import BytesParser
from email.policy import compat32
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import dkim
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, pkcs7

from worker.errors import ConfigurationError
from worker.records.keystores import KeyEntry, Keystore
from worker.records.signing_material import (
    EXPIRY_WARNING_DAYS,
    certificate_emails,
    days_left,
    dkim_key,
    dkim_key_findings,
    first_error,
    smime_findings,
)
from worker.records.signing_material import Finding as Finding
from worker.records.signing_material import Severity as Severity
from worker.records.signing_material import dkim_settings_findings as dkim_settings_findings

if TYPE_CHECKING:  # pragma: no cover
    from worker.records.account.account import EmailAccount
    from worker.records.account.record import DkimSettings
    from worker.records.loader import Records

_WIRE = compat32.clone(linesep="\r\n", max_line_length=78)
_FROM_LINE = re.compile(rb"^From ", re.MULTILINE)


# ---- S/MIME ----------------------------------------------------------------------------


class SmimeSigner:
    """Signs rendered messages with one key entry; holds the key, never shows it."""

    def __init__(self, keystore: str, entry: KeyEntry) -> None:
        if entry.certificate is None:  # refused by smime_findings first
            raise ConfigurationError(f"keystore {keystore}: no certificate for the signing key")
        self.keystore = keystore
        self.alias = entry.alias
        self.certificate: x509.Certificate = entry.certificate
        self.chain = entry.chain
        if not isinstance(entry.key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise ConfigurationError(f"keystore {keystore}: S/MIME signing needs an RSA or EC key")
        self._key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = entry.key

    def __repr__(self) -> str:
        return f"SmimeSigner(keystore={self.keystore!r}, alias={self.alias!r}, subject={self.subject!r})"

    @property
    def subject(self) -> str:
        return self.certificate.subject.rfc4514_string()

    def describe(self, now: datetime | None = None) -> dict[str, Any]:
        """What connectivity and health reports show: subject, issuer, expiry, days left."""
        cert = self.certificate
        info: dict[str, Any] = {
            "keystore": self.keystore,
            "alias": self.alias,
            "subject": self.subject,
            "issuer": cert.issuer.rfc4514_string(),
            "email": certificate_emails(cert),
            "expires": cert.not_valid_after_utc.isoformat(),
            "days_left": days_left(cert, now),
        }
        if info["days_left"] < EXPIRY_WARNING_DAYS:
            info["warning"] = f"the signing certificate expires in {info['days_left']} days"
        return info

    def sign(self, data: bytes) -> bytes:
        """The message ``data`` as a detached ``multipart/signed`` message."""
        expires = self.certificate.not_valid_after_utc
        if expires <= datetime.now(UTC):  # it may have expired since the signer was cached
            raise ConfigurationError(
                f"keystore {self.keystore}: certificate {self.subject} expired on {expires:%Y-%m-%d}"
            )
        outer, entity = split_entity(data)
        builder = pkcs7.PKCS7SignatureBuilder().set_data(entity)
        builder = builder.add_signer(self.certificate, self._key, hashes.SHA256())
        for cert in self.chain:
            builder = builder.add_certificate(cert)
        signature = builder.sign(
            Encoding.DER, [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary]
        )
        boundary = f"----=_smime_{uuid.uuid4().hex}".encode("ascii")
        if boundary in entity:  # pragma: no cover - 128 random bits
            raise ValueError("boundary collision")
        encoded = base64.encodebytes(signature).replace(b"\n", b"\r\n")
        return b"".join(
            [
                *(f + b"\r\n" for f in outer),
                b'Content-Type: multipart/signed; protocol="application/pkcs7-signature";\r\n'
                b' micalg=sha-256; boundary="' + boundary + b'"\r\n',
                b"\r\n",
                b"This is an S/MIME signed message\r\n",
                b"\r\n",
                b"--" + boundary + b"\r\n",
                entity,
                b"\r\n--" + boundary + b"\r\n",
                b'Content-Type: application/pkcs7-signature; name="smime.p7s"\r\n',
                b"Content-Transfer-Encoding: base64\r\n",
                b'Content-Disposition: attachment; filename="smime.p7s"\r\n',
                b"Content-Description: S/MIME Cryptographic Signature\r\n",
                b"\r\n",
                encoded,
                b"--" + boundary + b"--\r\n",
            ]
        )


def canonical(data: bytes) -> bytes:
    """CRLF line endings everywhere (bare CR or LF become CRLF)."""
    return re.sub(rb"\r\n|\r|\n", b"\r\n", data)


def split_entity(data: bytes) -> tuple[list[bytes], bytes]:
    """(outer header fields, the canonical 7-bit entity to sign) of a rendered message.

    Outer fields keep their folding and order, without their final CRLF; the
    entity is the ``Content-*`` fields, a blank line and the body.
    """
    data = canonical(data)
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        head, body = data.removesuffix(b"\r\n"), b""
    fields: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        elif line:
            fields.append(line)
    outer: list[bytes] = []
    content: list[bytes] = []
    for f in fields:
        name = f.split(b":", 1)[0].strip().lower()
        (content if name.startswith(b"content-") else outer).append(f)
    if not any(f.split(b":", 1)[0].strip().lower() == b"content-type" for f in content):
        content.insert(0, b'Content-Type: text/plain; charset="us-ascii"')
    if not any(f.split(b":", 1)[0].strip().lower() == b"mime-version" for f in outer):
        outer.append(b"MIME-Version: 1.0")
    entity = b"\r\n".join(content) + b"\r\n\r\n" + body
    if _transport_unsafe(entity):
        entity = _make_7bit(entity)
    return outer, entity


def _transport_unsafe(entity: bytes) -> bool:
    """Whether a relay could change these bytes: 8-bit data, overlong lines, trailing
    whitespace (stripped by some MTAs) or ``From `` at a line start (mbox quoting)."""
    if not entity.isascii() or b"\x00" in entity or _FROM_LINE.search(entity):
        return True
    return any(len(line) > 998 or line.endswith((b" ", b"\t")) for line in entity.split(b"\r\n"))


def _make_7bit(entity: bytes) -> bytes:
    """Re-encode the leaves a relay could alter: text as quoted-printable, the rest base64."""
    msg = BytesParser(policy=compat32).parsebytes(entity)
    for part in msg.walk():
        if part.is_multipart():
            continue
        cte = str(part.get("Content-Transfer-Encoding", "7bit")).strip().lower()
        if cte == "base64":
            continue
        if cte == "quoted-printable":
            payload = part.get_payload()
            if isinstance(payload, str):
                part.set_payload(re.sub(r"(?m)^From ", "=46rom ", payload))
            continue
        raw = part.get_payload(decode=True)
        raw = raw if isinstance(raw, bytes) else b""
        del part["Content-Transfer-Encoding"]
        if part.get_content_maintype() == "text":
            encoded = quopri.encodestring(raw.replace(b"\r\n", b"\n"), quotetabs=False)
            encoded = _FROM_LINE.sub(b"=46rom ", encoded)
            part.set_payload(encoded.decode("ascii"))
            part["Content-Transfer-Encoding"] = "quoted-printable"
        else:
            part.set_payload(base64.encodebytes(raw).decode("ascii"))
            part["Content-Transfer-Encoding"] = "base64"
    out = BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=_WIRE).flatten(msg)
    return canonical(out.getvalue())


# ---- DKIM ------------------------------------------------------------------------------


class DkimSigner:
    """Adds a DKIM-Signature header; holds the key, never shows it."""

    def __init__(self, settings: DkimSettings, key: rsa.RSAPrivateKey, key_pem: str) -> None:
        self.domain = settings.domain.lower().rstrip(".")
        self.selector = settings.selector
        self.headers = tuple(h.lower() for h in settings.headers) if settings.headers else None
        header_canon, _, body_canon = settings.canonicalization.partition("/")
        self.canonicalization = (header_canon.encode(), body_canon.encode())
        self.key_bits = key.key_size
        # what the selector's TXT record publishes as p= (base64 SubjectPublicKeyInfo): no secret
        public = key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        self.public_key = base64.b64encode(public).decode("ascii")
        self._key_pem = key_pem.encode("ascii")

    def __repr__(self) -> str:
        return f"DkimSigner(domain={self.domain!r}, selector={self.selector!r})"

    def describe(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "selector": self.selector,
            "algorithm": "rsa-sha256",
            "key_bits": self.key_bits,
            "canonicalization": b"/".join(self.canonicalization).decode(),
        }

    def sign(self, data: bytes) -> bytes:
        data = canonical(data)
        try:
            header = dkim.sign(
                data,
                self.selector.encode("ascii"),
                self.domain.encode("ascii"),
                self._key_pem,
                canonicalize=self.canonicalization,
                include_headers=self._signed_headers(data),
                linesep=b"\r\n",
            )
        except dkim.DKIMException as exc:  # its messages may quote key parsing details: name the class only
            raise ConfigurationError(f"DKIM signing failed ({type(exc).__name__})") from None
        return bytes(header) + data

    def _signed_headers(self, data: bytes) -> list[bytes]:
        """The account's list (dkimpy's recommended set of those present without one), plus
        the RFC 8058 pair when the message has it: a one-click unsubscribe that is not
        signed does not count (RFC 8058 §4, Gmail and Yahoo)."""
        if self.headers:
            names = [h.encode("ascii") for h in self.headers]
        else:
            names = list(dkim.DKIM(data).default_sign_headers())
        head = data.split(b"\r\n\r\n", 1)[0]
        present = {
            line.split(b":", 1)[0].strip().lower() for line in head.split(b"\r\n") if line[:1] not in b" \t"
        }
        for name in (b"list-unsubscribe", b"list-unsubscribe-post"):
            if name in present and name not in (n.lower() for n in names):
                names.append(name)
        return names


# ---- loading, with a per-process cache --------------------------------------------------


def _stamp(paths: tuple[Path, ...]) -> tuple[tuple[str, int, int], ...]:
    out = []
    for path in paths:
        try:
            st = path.stat()
            out.append((str(path), st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((str(path), -1, -1))
    return tuple(out)


def load_smime(keystore: Keystore, alias: str | None, from_address: str) -> SmimeSigner:
    """A signer for ``alias`` of ``keystore``, or a ConfigurationError saying what is wrong."""
    entry = keystore.key_entry(alias)
    problem = first_error(smime_findings(entry, from_address))
    if problem:
        shown = f" alias {entry.alias!r}" if entry.alias else ""
        raise ConfigurationError(f"keystore {keystore.name}{shown}: {problem}")
    return SmimeSigner(keystore.name, entry)


def load_dkim(settings: DkimSettings, records: Records) -> DkimSigner:
    key, _files = dkim_key(settings, records)
    problem = first_error(dkim_key_findings(key))
    if problem:
        raise ConfigurationError(f"dkim key for {settings.domain}: {problem}")
    assert isinstance(key, rsa.RSAPrivateKey)
    entry = KeyEntry(None, key, None)
    return DkimSigner(settings, key, entry.key_pem())


class SignerCache:
    """The process's loaded signers, by account; reloaded when a record or file changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._smime: dict[str, tuple[Any, SmimeSigner]] = {}
        self._dkim: dict[str, tuple[Any, DkimSigner]] = {}

    def smime(self, account: EmailAccount, records: Records) -> SmimeSigner | None:
        if account.signing is None:
            return None
        keystore = records.keystore(account.signing.keystore)
        stamp = (keystore, account.signing, account.from_address, _stamp(keystore.files()))
        with self._lock:
            cached = self._smime.get(account.name)
            if cached is not None and cached[0] == stamp:
                return cached[1]
        signer = load_smime(keystore, account.signing.alias, account.from_address)
        with self._lock:
            self._smime[account.name] = (stamp, signer)
        return signer

    def dkim(self, account: EmailAccount, records: Records) -> DkimSigner | None:
        settings = account.dkim
        if settings is None:
            return None
        if settings.keystore:
            keystore = records.keystore(settings.keystore)
            files: tuple[Path, ...] = keystore.files()
            stamp: Any = (settings, keystore, _stamp(files))
        else:
            assert settings.private_key is not None
            path = settings.private_key.path()
            stamp = (settings, _stamp((path,) if path else ()))
        with self._lock:
            cached = self._dkim.get(account.name)
            if cached is not None and cached[0] == stamp:
                return cached[1]
        signer = load_dkim(settings, records)
        with self._lock:
            self._dkim[account.name] = (stamp, signer)
        return signer

    def clear(self) -> None:
        with self._lock:
            self._smime.clear()
            self._dkim.clear()


_cache = SignerCache()


def signers() -> SignerCache:
    return _cache


def sign_message(data: bytes, account: EmailAccount, records: Records) -> bytes:
    """``data`` S/MIME-signed then DKIM-signed as the account says (unchanged when it says neither).

    Raises ConfigurationError when the signing material is broken: the job
    must not be sent unsigned.
    """
    if account.signing is None and account.dkim is None:
        return data
    smime = _cache.smime(account, records)
    if smime is not None:
        data = smime.sign(data)
    signer = _cache.dkim(account, records)
    if signer is not None:
        data = signer.sign(data)
    return data


class _Describable(Protocol):
    def describe(self) -> dict[str, Any]: ...


def describe_signing(account: EmailAccount, records: Records) -> dict[str, Any]:
    """The ``signing`` / ``dkim`` parts of a connectivity report (errors as ``{"error": ...}``)."""
    out: dict[str, Any] = {}
    if account.signing is not None:
        out["signing"] = _describe(lambda: _cache.smime(account, records), keystore=account.signing.keystore)
    if account.dkim is not None:
        out["dkim"] = _describe(lambda: _cache.dkim(account, records), domain=account.dkim.domain)
    return out


def _describe(load: Callable[[], _Describable | None], **names: str) -> dict[str, Any]:
    """One signer's report part; a signer that cannot load is shown by ``names`` and the error,
    so a broken key fails the connectivity check instead of raising out of it."""
    try:
        signer = load()
        assert signer is not None
        return signer.describe()
    except ConfigurationError as exc:
        return {**names, "error": str(exc)}
