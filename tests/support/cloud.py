"""A local HTTPS server standing in for the Microsoft identity platform, Graph and Google's token endpoint.

Real HTTP/1.1 over TLS (certificate from the test CA), one thread per
connection, so clients talk to it exactly as they talk to the real services:

- Microsoft identity platform, tenant :data:`TENANT`: the OpenID configuration
  document MSAL reads, the user realm lookup of the password flow, and the v2.0
  token endpoint for ``client_credentials`` (client secret, or a certificate
  assertion verified against the registered certificate) and ``password``.
- Graph: ``sendMail`` (MIME mode; a JSON body is answered 400 like Graph answers
  an empty payload), drafts from MIME, attachments, upload sessions (chunked
  PUTs that must carry no bearer token) and ``send``; and each user principal's
  mailbox, read as the bounce reader reads it (folders, listing, ``$value``, move:
  tests/support/cloud_mailbox.py), filled by :meth:`CloudServer.put_in_inbox`.
- Google's token endpoint: verifies the RS256 JWT assertion with the service
  account's public key and its claims (iss, sub, scope, aud, iat, exp).
- Token introspection (RFC 7662, ``POST /introspect`` with ``token=``), as a mail server
  asks it (Dovecot's oauth2 passdb, through tests/support/mailhost.py): an issued token
  still valid is active, for the user it was issued for.

Every request is recorded; tests script Graph answers (``graph_script`` for sends,
``mail_script`` for the mailbox), invalidate issued tokens (``expire_tokens``) and read
what was delivered.
"""

from __future__ import annotations

import base64
import contextlib
import email
import email.policy
import hashlib
import json
import secrets
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import Encoding, pkcs12
from cryptography.x509.oid import NameOID

from support.cloud_mailbox import MailStore

TENANT = "11111111-2222-3333-4444-555555555555"
CLIENT_ID = "00000000-aaaa-bbbb-cccc-000000000001"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def bearer(self) -> str | None:
        value = self.headers.get("authorization", "")
        return value.removeprefix("Bearer ") if value.startswith("Bearer ") else None


@dataclass
class Delivered:
    """One message Graph accepted: the decoded MIME and how it arrived."""

    mailbox: str
    mime: bytes
    route: str  # "sendMail" or "draft"
    attachments: list[dict[str, Any]] = field(default_factory=list)
    message: EmailMessage = field(init=False)

    def __post_init__(self) -> None:
        self.message = email.message_from_bytes(self.mime, policy=email.policy.default)


@dataclass
class Reply:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


class CloudServer:
    """The running server; ``url`` is ``https://127.0.0.1:PORT``."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.lock = threading.Lock()
        self.requests: list[Recorded] = []
        # Microsoft
        self.client_id = CLIENT_ID
        self.client_secret: str | None = None
        self.certificate: x509.Certificate | None = None
        self.users: dict[str, str] = {}
        self.token_lifetime = 3600
        self.token_errors: list[Reply] = []  # answered (in order) before any token is issued
        self.ms_token_requests: list[dict[str, str]] = []
        # Google
        self.google_public_key: RSAPublicKey | None = None
        self.google_client_email: str | None = None
        self.google_subject: str | None = None
        self.google_claims: list[dict[str, Any]] = []
        # tokens
        self.tokens: set[str] = set()  # valid now
        self.issued: list[str] = []  # every token ever handed out: what no output may show
        self.subjects: dict[str, str] = {}  # token -> the user it was issued for
        self.app_user: str | None = None  # the user an app's token (client credentials) acts as
        self.refuse_new = False  # tokens issued from now on are refused at once
        # Graph
        self.mailboxes: set[str] = set()
        self.graph_script: list[Reply] = []  # answers to sendMail / draft send, before the default 202
        self.graph_delay = 0.0  # seconds each Graph call takes
        self.in_flight: dict[str, int] = {}
        self.max_in_flight: dict[str, int] = {}
        self.delivered: list[Delivered] = []
        self.drafts: dict[str, Delivered] = {}
        self.deleted_drafts: list[str] = []
        self.uploads: dict[str, dict[str, Any]] = {}
        self.sendmail_times: list[float] = []
        self.mail: dict[str, MailStore] = {}  # each user principal's mailbox, made on first use
        self.mail_script: list[Reply] = []  # answers to mailbox calls, before the mailbox's own

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        owner = self

        class Handler(_Handler):
            cloud = owner

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="cloud", daemon=True
        )
        self._thread.start()

    # ---- addresses ----------------------------------------------------------------

    @property
    def authority(self) -> str:
        return f"{self.url}/{TENANT}"

    @property
    def token_endpoint(self) -> str:
        return f"{self.url}/{TENANT}/oauth2/v2.0/token"

    @property
    def google_token_url(self) -> str:
        return f"{self.url}/google/token"

    @property
    def introspection_url(self) -> str:
        return f"{self.url}/introspect"

    # ---- test controls ------------------------------------------------------------

    def issue(self, subject: str | None = None) -> str:
        """A new access token, for ``subject`` (a user) or, without one, for the app."""
        token = "tok-" + secrets.token_urlsafe(24)
        with self.lock:
            self.issued.append(token)
            if subject is not None:
                self.subjects[token] = subject
            if not self.refuse_new:
                self.tokens.add(token)
        return token

    def valid_tokens(self) -> set[str]:
        with self.lock:
            return set(self.tokens)

    def expire_tokens(self, *, future: bool = False) -> None:
        """Every token issued so far is refused from now on (as if it expired early); with
        ``future``, every token issued later too (a process of its own, the CLI, asks for a
        fresh token: that one must be refused as well)."""
        with self.lock:
            self.tokens.clear()
            self.refuse_new = self.refuse_new or future

    def introspect(self, token: str) -> dict[str, Any]:
        """RFC 7662's answer about ``token``: active, and whose, while it is valid."""
        with self.lock:
            if token not in self.tokens:
                return {"active": False}
            user = self.subjects.get(token, self.app_user)
        answer: dict[str, Any] = {"active": True, "token_type": "Bearer", "client_id": self.client_id}
        if user is not None:
            answer.update(username=user, email=user)
        return answer

    def mail_store(self, upn: str) -> MailStore:
        """``upn``'s mailbox (the user exists from now on)."""
        with self.lock:
            self.mailboxes.add(upn)
            return self.mail.setdefault(upn, MailStore(upn))

    def put_in_inbox(self, upn: str, raw: bytes, received: datetime | str, *, id: str | None = None) -> str:
        """Deliver the MIME message ``raw`` into ``upn``'s inbox, received at ``received``; its id."""
        return self.mail_store(upn).put(raw, received, id=id)

    def calls(self, method: str, contains: str) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if r.method == method and contains in r.path]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


def _form(body: bytes) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(body.decode(), keep_blank_values=True).items()}


def _graph_error(status: int, code: str, message: str, **headers: str) -> Reply:
    return Reply(status, {"error": {"code": code, "message": message}}, headers)


class _Handler(BaseHTTPRequestHandler):
    cloud: CloudServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # ---- plumbing ------------------------------------------------------------------

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _reply(self, reply: Reply) -> None:
        if reply.body is None:
            data = b""
        elif isinstance(reply.body, bytes):
            data = reply.body
        else:
            data = json.dumps(reply.body).encode()
        self.send_response(reply.status)
        if data and "Content-Type" not in reply.headers:
            self.send_header("Content-Type", "application/json")
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str) -> None:
        body = self._body()
        path = urlsplit(self.path).path
        record = Recorded(method, unquote(self.path), {k.lower(): v for k, v in self.headers.items()}, body)
        with self.cloud.lock:
            self.cloud.requests.append(record)
        try:
            reply = self._route(method, path, record)
        except Exception as exc:  # a bug in the fake: make it visible to the test
            reply = Reply(500, {"error": {"code": "FakeServerBug", "message": repr(exc)}})
        with contextlib.suppress(OSError):  # a client that stopped reading (a capped fetch)
            self._reply(reply)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    # ---- routes --------------------------------------------------------------------

    def _route(self, method: str, path: str, rec: Recorded) -> Reply:
        cloud = self.cloud
        if method == "GET" and path == f"/{TENANT}/v2.0/.well-known/openid-configuration":
            base = f"{cloud.url}/{TENANT}"
            return Reply(
                200,
                {
                    "issuer": f"{base}/v2.0",
                    "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                    "token_endpoint": f"{base}/oauth2/v2.0/token",
                    "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                },
            )
        if method == "GET" and path.startswith("/common/userrealm/"):
            return Reply(200, {"ver": "1.0", "account_type": "Managed", "domain_name": "contoso.com"})
        if method == "POST" and path == f"/{TENANT}/oauth2/v2.0/token":
            return self._ms_token(_form(rec.body), rec)
        if method == "POST" and path == "/google/token":
            return self._google_token(_form(rec.body))
        if method == "POST" and path == "/introspect":
            return Reply(200, cloud.introspect(_form(rec.body).get("token", "")))
        if path.startswith("/upload/") and method == "PUT":
            return self._upload(path.removeprefix("/upload/"), rec)
        if path.startswith("/v1.0/users/"):
            return self._graph(method, unquote(path.removeprefix("/v1.0/users/")), rec)
        return Reply(404, {"error": "not_found"})

    # ---- Microsoft identity platform ------------------------------------------------------

    def _ms_token(self, form: dict[str, str], rec: Recorded) -> Reply:
        cloud = self.cloud
        with cloud.lock:
            cloud.ms_token_requests.append({k: v for k, v in form.items() if k in ("grant_type", "scope")})
            if cloud.token_errors:
                return cloud.token_errors.pop(0)
        if form.get("client_id") != cloud.client_id:
            return Reply(
                400, {"error": "unauthorized_client", "error_description": "AADSTS700016: unknown app"}
            )
        grant = form.get("grant_type")
        if grant == "password":
            user, password = form.get("username", ""), form.get("password", "")
            if cloud.users.get(user) != password:
                return Reply(
                    400,
                    {
                        "error": "invalid_grant",
                        "error_description": "AADSTS50126: Error validating credentials due to "
                        "invalid username or password.",
                    },
                )
            if cloud.client_secret is not None and not self._client_ok(form, rec):
                return self._invalid_client()
        elif grant == "client_credentials":
            if not self._client_ok(form, rec):
                return self._invalid_client()
        else:
            return Reply(400, {"error": "unsupported_grant_type"})
        subject = form.get("username") if grant == "password" else None  # an app's token: no user
        return Reply(
            200,
            {
                "token_type": "Bearer",
                "expires_in": cloud.token_lifetime,
                "access_token": cloud.issue(subject),
            },
        )

    def _invalid_client(self) -> Reply:
        return Reply(
            401,
            {
                "error": "invalid_client",
                "error_description": "AADSTS7000215: Invalid client secret provided. Ensure the secret "
                "being sent in the request is the client secret value.\r\nTrace ID: 1",
            },
        )

    def _client_ok(self, form: dict[str, str], rec: Recorded) -> bool:
        cloud = self.cloud
        secret = form.get("client_secret")
        basic = rec.headers.get("authorization", "")
        if basic.startswith("Basic "):
            _, _, secret = base64.b64decode(basic[6:]).decode().partition(":")
        if secret is not None and cloud.client_secret is not None:
            return secrets.compare_digest(secret, cloud.client_secret)
        assertion = form.get("client_assertion")
        if assertion and cloud.certificate is not None:
            header = jwt.get_unverified_header(assertion)
            thumb = base64.urlsafe_b64encode(
                hashlib.sha256(cloud.certificate.public_bytes(Encoding.DER)).digest()
            ).rstrip(b"=")
            if str(header.get("x5t#S256", "")).rstrip("=") != thumb.decode():
                return False
            try:
                claims = jwt.decode(
                    assertion,
                    cloud.certificate.public_key(),  # type: ignore[arg-type]
                    algorithms=["PS256", "RS256"],
                    audience=cloud.token_endpoint,
                    issuer=cloud.client_id,
                )
            except jwt.InvalidTokenError:
                return False
            return bool(claims.get("sub") == cloud.client_id)
        return False

    # ---- Google ----------------------------------------------------------------------

    def _google_token(self, form: dict[str, str]) -> Reply:
        cloud = self.cloud
        if form.get("grant_type") != JWT_BEARER:
            return Reply(400, {"error": "unsupported_grant_type"})
        assert cloud.google_public_key is not None
        try:
            claims = jwt.decode(
                form.get("assertion", ""),
                cloud.google_public_key,
                algorithms=["RS256"],
                audience=cloud.google_token_url,
                issuer=cloud.google_client_email,
                options={"require": ["iss", "sub", "aud", "iat", "exp", "scope"]},
            )
        except jwt.InvalidSignatureError:
            return Reply(400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."})
        except jwt.InvalidTokenError as exc:
            return Reply(400, {"error": "invalid_grant", "error_description": f"Invalid JWT: {exc}"})
        with cloud.lock:
            cloud.google_claims.append(claims)
        if claims["exp"] - claims["iat"] > 3600 or claims.get("scope") != "https://mail.google.com/":
            return Reply(400, {"error": "invalid_scope", "error_description": "bad scope or lifetime"})
        if claims.get("sub") != cloud.google_subject:
            return Reply(401, {"error": "unauthorized_client", "error_description": "not delegated"})
        token = cloud.issue(claims["sub"])
        return Reply(200, {"access_token": token, "expires_in": 3599, "token_type": "Bearer"})

    # ---- Graph ------------------------------------------------------------------------

    def _graph(self, method: str, rest: str, rec: Recorded) -> Reply:
        cloud = self.cloud
        mailbox, _, action = rest.partition("/")
        if rec.bearer is None or rec.bearer not in cloud.valid_tokens():
            return _graph_error(
                401, "InvalidAuthenticationToken", "Access token has expired or is not yet valid."
            )
        if mailbox not in cloud.mailboxes:
            return _graph_error(404, "ErrorInvalidUser", f"The requested user '{mailbox}' is invalid.")
        with cloud.lock:
            now = cloud.in_flight[mailbox] = cloud.in_flight.get(mailbox, 0) + 1
            cloud.max_in_flight[mailbox] = max(cloud.max_in_flight.get(mailbox, 0), now)
        try:
            if cloud.graph_delay:
                time.sleep(cloud.graph_delay)
            return self._graph_action(method, mailbox, action, rec)
        finally:
            with cloud.lock:
                cloud.in_flight[mailbox] -= 1

    def _scripted(self) -> Reply | None:
        with self.cloud.lock:
            return self.cloud.graph_script.pop(0) if self.cloud.graph_script else None

    def _graph_action(self, method: str, mailbox: str, action: str, rec: Recorded) -> Reply:
        cloud = self.cloud
        parts = action.split("/")
        if parts[0] == "mailFolders" or (
            parts[0] == "messages" and len(parts) > 1 and parts[1] not in cloud.drafts
        ):
            return self._mailbox(method, cloud.mail_store(mailbox), action, rec)
        mime_body = rec.headers.get("content-type", "").startswith("text/plain")
        if method == "POST" and action == "sendMail":
            if not mime_body:
                return _graph_error(400, "ErrorInvalidRequest", "Empty Payload. JSON content expected.")
            with cloud.lock:
                cloud.sendmail_times.append(time.monotonic())
            scripted = self._scripted()
            if scripted is not None:
                return scripted
            mime = base64.b64decode(rec.body, validate=True)
            with cloud.lock:
                cloud.delivered.append(Delivered(mailbox, mime, "sendMail"))
            return Reply(202)
        if method == "POST" and action == "messages" and mime_body:
            draft_id = "AAMk" + uuid.uuid4().hex
            with cloud.lock:
                cloud.drafts[draft_id] = Delivered(
                    mailbox, base64.b64decode(rec.body, validate=True), "draft"
                )
            return Reply(201, {"id": draft_id})
        if action.startswith("messages/"):
            parts = action.split("/")
            draft = cloud.drafts.get(parts[1])
            if draft is None:
                return _graph_error(404, "ErrorItemNotFound", "The specified object was not found.")
            tail = "/".join(parts[2:])
            if method == "DELETE" and not tail:
                with cloud.lock:
                    cloud.deleted_drafts.append(parts[1])
                    del cloud.drafts[parts[1]]
                return Reply(204)
            if method == "POST" and tail == "attachments":
                item = json.loads(rec.body)
                content = base64.b64decode(item["contentBytes"])
                draft.attachments.append({"name": item["name"], "content": content, "route": "post"})
                return Reply(201, {"id": uuid.uuid4().hex})
            if method == "POST" and tail == "attachments/createUploadSession":
                item = json.loads(rec.body)["AttachmentItem"]
                session = uuid.uuid4().hex
                with cloud.lock:
                    cloud.uploads[session] = {
                        "draft": parts[1],
                        "name": item["name"],
                        "size": int(item["size"]),
                        "data": b"",
                        "chunks": 0,
                    }
                return Reply(
                    201, {"uploadUrl": f"{cloud.url}/upload/{session}", "nextExpectedRanges": ["0-"]}
                )
            if method == "POST" and tail == "send":
                scripted = self._scripted()
                if scripted is not None:
                    return scripted
                with cloud.lock:
                    del cloud.drafts[parts[1]]
                    cloud.delivered.append(draft)
                return Reply(202)
        return _graph_error(400, "BadRequest", f"unsupported: {method} {action}")

    def _mailbox(self, method: str, store: MailStore, action: str, rec: Recorded) -> Reply:
        with self.cloud.lock:
            if self.cloud.mail_script:
                return self.cloud.mail_script.pop(0)
        query = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query, keep_blank_values=True).items()}
        answer = store.route(
            method,
            action,
            query,
            rec.body,
            immutable='IdType="ImmutableId"' in rec.headers.get("prefer", ""),
            link=f"{self.cloud.url}/v1.0/users/{store.upn}",
        )
        return Reply(answer.status, answer.body, answer.headers)

    def _upload(self, session: str, rec: Recorded) -> Reply:
        cloud = self.cloud
        upload = cloud.uploads.get(session)
        if upload is None:
            return Reply(404, {"error": {"code": "ErrorItemNotFound", "message": "no such session"}})
        if "authorization" in rec.headers:  # Graph refuses a bearer token on the upload URL
            return _graph_error(401, "InvalidAuthenticationToken", "no Authorization header on uploads")
        unit, _, spec = rec.headers.get("content-range", "").partition(" ")
        span, _, total = spec.partition("/")
        start, _, end = span.partition("-")
        if unit != "bytes" or int(start) != len(upload["data"]) or int(total) != upload["size"]:
            return Reply(416, {"error": {"code": "InvalidRange", "message": spec}})
        if int(end) - int(start) + 1 != len(rec.body):
            return Reply(400, {"error": {"code": "InvalidRange", "message": "length mismatch"}})
        upload["data"] += rec.body
        upload["chunks"] += 1
        if len(upload["data"]) < upload["size"]:
            return Reply(200, {"nextExpectedRanges": [f"{len(upload['data'])}-"]})
        draft = cloud.drafts[upload["draft"]]
        draft.attachments.append(
            {"name": upload["name"], "content": upload["data"], "route": "upload", "chunks": upload["chunks"]}
        )
        return Reply(201, headers={"Location": f"{cloud.url}/attachments/{session}"})


# ---- credentials the tests register with the fake services ------------------------------------


def app_certificate(folder: Path, password: str) -> tuple[Path, x509.Certificate]:
    """An app registration's certificate credential: RSA key + self-signed cert in a PKCS#12 file."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "postroom-graph-app")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    path = folder / "graph-app.p12"
    path.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"graph-app", key, cert, None, serialization.BestAvailableEncryption(password.encode())
        )
    )
    return path, cert


def service_account(folder: Path, client_email: str, name: str = "sa.json") -> tuple[Path, RSAPublicKey, str]:
    """A Google service account JSON key file: (path, public key, private key PEM)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    path = folder / name
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "postroom-tests",
                "private_key_id": uuid.uuid4().hex,
                "private_key": pem,
                "client_email": client_email,
                "client_id": "1234567890",
                "token_uri": "https://oauth2.googleapis.com/token",
            }
        )
    )
    return path, key.public_key(), pem
