"""OAuth 2.0 access tokens for Graph and SMTP XOAUTH2, cached in the worker process.

One :class:`TokenSource` per auth profile per process (:func:`token_source`),
shared by every account that names the profile:

- ``client_credentials`` / ``password`` (Microsoft identity platform) go through
  MSAL. MSAL is synchronous and uses its own HTTP client, so its calls run in
  the loop's thread executor, and MSAL is given an :class:`MsalHttpClient` on
  ``httpx`` that verifies against the profile's truststore (or the system CAs)
  and ignores ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE``/proxy variables.
- ``jwt_bearer`` (Google service account) signs an RS256 JWT with PyJWT and
  exchanges it at the profile's ``token_url`` (RFC 7523).

Tokens are refreshed :data:`REFRESH_MARGIN` seconds before they expire, and
only one token request per profile runs at a time. A refresh forced by a
refused token is skipped when another caller already replaced that token.

No token, secret, assertion or private key is ever put into an exception, a
log line or a repr: errors carry the endpoint's error code and description
only (and even those are scrubbed of any secret value, in case an endpoint
echoes one).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import jwt
import msal
from cryptography.hazmat.primitives.serialization import Encoding

from worker.errors import (
    AuthenticationFailed,
    ConfigurationError,
    ConnectionFailed,
    DeliveryError,
    SecurityPolicyError,
    TransientError,
)
from worker.records.auth_profiles import (
    AuthProfile,
    ClientCredentialsProfile,
    JwtBearerProfile,
    PasswordProfile,
    ServiceAccount,
    load_service_account,
)
from worker.records.loader import Records
from worker.records.secrets import redact
from worker.transports.tls import client_context, failure_reason, ssl_cause

log = logging.getLogger("postroom.oauth")

REFRESH_MARGIN = 300.0  # seconds: a token this close to its expiry is replaced before use
TOKEN_TIMEOUT = 30.0  # seconds for one request to a token endpoint
JWT_LIFETIME = 3600  # seconds: Google accepts assertions valid for at most an hour
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
_TRANSIENT_OAUTH_ERRORS = frozenset({"temporarily_unavailable", "server_error", "slow_down"})


def _first_line(text: object, limit: int = 300) -> str:
    line = str(text or "").strip().splitlines()[0] if str(text or "").strip() else ""
    return line[:limit]


@dataclass(frozen=True)
class AccessToken:
    """A bearer token, when it expires and when to replace it (epoch seconds). Its repr hides the value."""

    value: str = field(repr=False)
    expires_at: float
    refresh_at: float

    @classmethod
    def issued(cls, value: str, expires_in: float, now: float | None = None) -> AccessToken:
        """A token just issued for ``expires_in`` seconds: replaced :data:`REFRESH_MARGIN` early
        (or half-way through, for tokens that live less than twice the margin)."""
        now = time.time() if now is None else now
        early = min(REFRESH_MARGIN, expires_in / 2)
        return cls(value, now + expires_in, now + expires_in - early)

    def __repr__(self) -> str:
        return f"AccessToken(expires_at={self.expires_at:.0f})"

    @property
    def expires_iso(self) -> str:
        return datetime.fromtimestamp(self.expires_at, UTC).isoformat(timespec="seconds")


def http_error(exc: httpx.HTTPError, what: str) -> DeliveryError:
    """An httpx failure as a delivery error: TLS policy problems are permanent."""
    if ssl_cause(exc) is None and isinstance(exc, httpx.TimeoutException):
        return ConnectionFailed(f"{what}: timed out")
    reason, policy = failure_reason(exc)
    return SecurityPolicyError(f"{what}: {reason}") if policy else ConnectionFailed(f"{what}: {reason}")


class TokenSource(ABC):
    """Access tokens for one auth profile: cached, refreshed early, one request at a time."""

    kind = "oauth"

    def __init__(self, profile: AuthProfile, cadata: str | None) -> None:
        self.profile = profile
        self.cadata = cadata
        self._token: AccessToken | None = None
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )
        self.requests = 0  # token requests that went to the endpoint (for tests and health)

    def __repr__(self) -> str:
        expires = f"{self._token.expires_at:.0f}" if self._token else None
        return f"{type(self).__name__}(profile={self.profile.name!r}, expires_at={expires})"

    def _lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        lock = self._locks.get(loop)
        if lock is None:
            lock = self._locks[loop] = asyncio.Lock()
        return lock

    async def token(self, *, force: bool = False, stale: str | None = None) -> AccessToken:
        """A token valid for at least :data:`REFRESH_MARGIN` more seconds.

        ``force`` asks for a new one (the server refused ``stale``); when another
        caller has already replaced ``stale``, that replacement is returned.
        """
        async with self._lock():
            current = self._token
            if current is not None:
                if force and stale is not None and current.value != stale:
                    return current
                if not force and current.refresh_at > time.time():
                    return current
            self._token = None
            self.requests += 1
            token = await self._acquire()
            self._token = token
            log.info("auth profile %s: token acquired (expires %s)", self.profile.name, token.expires_iso)
            return token

    async def access_token(self, force_refresh: bool = False) -> str:
        """The bare token, the shape the SMTP transport's XOAUTH2 asks for."""
        current = self._token
        token = await self.token(force=force_refresh, stale=current.value if current else None)
        return token.value

    @property
    def current(self) -> AccessToken | None:
        return self._token

    @abstractmethod
    async def _acquire(self) -> AccessToken: ...

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What connectivity reports show: never the token or a secret."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the source holds (HTTP clients)."""


# ---- Microsoft identity platform (MSAL) ------------------------------------------------


class _MsalResponse:
    """The response shape MSAL's HTTP client interface expects."""

    def __init__(self, response: httpx.Response) -> None:
        self.status_code = response.status_code
        self.text = response.text
        self.headers = dict(response.headers)

    def raise_for_status(self) -> None:
        if self.status_code >= 400:
            raise msal.exceptions.MsalServiceError(
                f"HTTP Error: {self.status_code}", error=None, error_description=None
            )


class MsalHttpClient:
    """MSAL's HTTP client on httpx, with our TLS settings and no environment overrides.

    ``requests`` (MSAL's default) lets ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE``
    replace a session's ``verify``; this client trusts exactly the truststore
    (or the system CAs). MSAL's username/password flow looks the user realm up
    on the authority's host *without its port*; when the configured authority
    has an explicit port, that lookup is sent to the authority's port instead.
    """

    def __init__(self, authority: str, cadata: str | None, timeout: float = TOKEN_TIMEOUT) -> None:
        parts = urlsplit(authority)
        self._host = (parts.hostname or "").lower()
        self._netloc = parts.netloc if parts.port else None
        self._context = client_context(cadata=cadata)
        self._timeout = timeout

    def _send(self, method: str, url: str, **kwargs: Any) -> _MsalResponse:
        # a client per call: token requests are rare, and nothing is left open between them
        with httpx.Client(verify=self._context, trust_env=False, timeout=self._timeout) as client:
            return _MsalResponse(client.request(method, self._url(url), **kwargs))

    def _url(self, url: str) -> str:
        if self._netloc is None:
            return url
        parts = urlsplit(url)
        if parts.netloc.lower() == self._host and parts.path.startswith("/common/userrealm/"):
            return urlunsplit(parts._replace(netloc=self._netloc))
        return url

    def post(
        self,
        url: str,
        params: dict[str, Any] | None = None,
        data: Any = None,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> _MsalResponse:
        content = None
        if isinstance(data, str | bytes):
            content, data = data, None
        elif isinstance(data, dict):  # requests form-encodes bytes values as text; so do we
            data = {k: v.decode() if isinstance(v, bytes) else v for k, v in data.items()}
        return self._send("POST", url, params=params, data=data, content=content, headers=headers)

    def get(
        self,
        url: str,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> _MsalResponse:
        return self._send("GET", url, params=params, headers=headers)


class MsalTokenSource(TokenSource):
    """client_credentials (secret or certificate) and password grants through MSAL."""

    def __init__(self, profile: AuthProfile, cadata: str | None, records: Records) -> None:
        super().__init__(profile, cadata)
        record = profile.record
        assert isinstance(record, ClientCredentialsProfile | PasswordProfile)
        self.record: ClientCredentialsProfile | PasswordProfile = record
        self.kind = record.type
        self._records = records
        self._app: msal.ClientApplication | None = None
        self._http: MsalHttpClient | None = None
        self._sync_lock = threading.Lock()  # MSAL calls of this profile never overlap
        self._secrets: list[str] = []

    @property
    def tenant(self) -> str:
        path = urlsplit(self.record.authority).path.strip("/")
        return path.split("/")[0] if path else "common"

    def describe(self) -> dict[str, Any]:
        token = self.current
        return {
            "auth_profile": self.profile.name,
            "grant": self.record.type,
            "authority": self.record.authority,
            "tenant": self.tenant,
            "client_id": self.record.client_id,
            "credential": self._credential_kind(),
            "scopes": list(self.record.scopes),
            "token_expires": token.expires_iso if token else None,
        }

    def _credential_kind(self) -> str:
        rec = self.record
        if isinstance(rec, ClientCredentialsProfile) and rec.certificate is not None:
            return "certificate"
        return "client secret" if rec.client_secret is not None else "none (public client)"

    def _build(self) -> msal.ClientApplication:
        """The MSAL application (runs in the executor: MSAL fetches the OpenID configuration)."""
        rec = self.record
        credential: str | dict[str, str] | None = None
        self._secrets = []
        if rec.client_secret is not None:
            credential = rec.client_secret.reveal()
            self._secrets.append(credential)
        elif isinstance(rec, ClientCredentialsProfile) and rec.certificate is not None:
            keystore = self._records.keystore(rec.certificate.keystore)
            key_pem, cert = keystore.private_key(rec.certificate.alias)
            credential = {
                "private_key": key_pem,
                "public_certificate": cert.public_bytes(Encoding.PEM).decode("ascii"),
            }
        if isinstance(rec, PasswordProfile):
            self._secrets.append(rec.password.reveal())
        if self._http is None:
            self._http = MsalHttpClient(rec.authority, self.cadata)
        common: dict[str, Any] = {
            "authority": rec.authority,
            "http_client": self._http,
            "instance_discovery": False,
            "token_cache": msal.TokenCache(),
        }
        if credential is None:
            return msal.PublicClientApplication(rec.client_id, **common)
        return msal.ConfidentialClientApplication(rec.client_id, client_credential=credential, **common)

    def _request(self) -> dict[str, Any]:
        with self._sync_lock:
            if self._app is None:
                self._app = self._build()
            app = self._app
            cache = app.token_cache
            for item in list(cache.search(msal.TokenCache.CredentialType.ACCESS_TOKEN)):
                cache.remove_at(item)  # this is a refresh: never hand back MSAL's cached token
            rec = self.record
            if isinstance(rec, PasswordProfile):
                result = app.acquire_token_by_username_password(
                    rec.username, rec.password.reveal(), scopes=list(rec.scopes)
                )
            else:
                assert isinstance(app, msal.ConfidentialClientApplication)
                result = app.acquire_token_for_client(scopes=list(rec.scopes))
            return dict(result or {})

    async def _acquire(self) -> AccessToken:
        where = f"token request to {self.record.authority}"
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(None, self._request)
        except httpx.HTTPError as exc:
            raise http_error(exc, where) from None
        except msal.exceptions.MsalServiceError:
            self._app = None
            raise TransientError(f"{where}: the identity platform answered with a server error") from None
        except ValueError as exc:  # MSAL: the authority's OpenID configuration could not be read
            self._app = None
            raise ConfigurationError(
                f"auth profile {self.profile.name}: authority: {redact(_first_line(exc), self._secrets)}"
            ) from None
        if "access_token" in result:
            return AccessToken.issued(str(result["access_token"]), float(result.get("expires_in") or 3600))
        error = str(result.get("error") or "unknown_error")
        description = redact(_first_line(result.get("error_description")), self._secrets)
        reason = f"{where} refused: {error}" + (f": {description}" if description else "")
        # A new application next time: secrets are re-read (the operator may be fixing them),
        # and MSAL's per-application replay of failed answers (400s for 60 s, 5xx for their
        # Retry-After) does not outlive this attempt: Postroom's retry policy paces retries.
        self._app = None
        if error in _TRANSIENT_OAUTH_ERRORS:
            raise TransientError(reason)
        raise AuthenticationFailed(reason)

    def close(self) -> None:
        self._app = None


# ---- Google service account (RFC 7523 JWT bearer) ------------------------------------------


class JwtBearerTokenSource(TokenSource):
    """A Google service account impersonating ``subject`` (domain-wide delegation)."""

    kind = "jwt_bearer"

    def __init__(self, profile: AuthProfile, cadata: str | None) -> None:
        super().__init__(profile, cadata)
        record = profile.record
        assert isinstance(record, JwtBearerProfile)
        self.record = record
        self._context = client_context(cadata=cadata)
        self._client_email: str | None = None

    def describe(self) -> dict[str, Any]:
        token = self.current
        return {
            "auth_profile": self.profile.name,
            "grant": "jwt_bearer",
            "token_url": self.record.token_url,
            "service_account": self._client_email,
            "subject": self.record.subject,
            "scope": self.record.scope,
            "token_expires": token.expires_iso if token else None,
        }

    def assertion(self, account: ServiceAccount, now: float | None = None) -> str:
        issued = int(now if now is not None else time.time())
        claims = {
            "iss": account.client_email,
            "sub": self.record.subject,
            "scope": self.record.scope,
            "aud": self.record.token_url,
            "iat": issued,
            "exp": issued + JWT_LIFETIME,
        }
        headers = {"kid": account.private_key_id} if account.private_key_id else None
        return jwt.encode(claims, account.private_key, algorithm="RS256", headers=headers)

    async def _acquire(self) -> AccessToken:
        account = load_service_account(self.profile)
        self._client_email = account.client_email
        where = f"token request to {self.record.token_url}"
        assertion = self.assertion(account)
        try:
            async with httpx.AsyncClient(
                verify=self._context, trust_env=False, timeout=TOKEN_TIMEOUT
            ) as client:
                response = await client.post(
                    self.record.token_url,
                    data={"grant_type": JWT_BEARER_GRANT, "assertion": assertion},
                    headers={"Accept": "application/json"},
                )
        except httpx.HTTPError as exc:
            raise http_error(exc, where) from None
        try:
            body = response.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        if response.status_code == 200 and isinstance(body.get("access_token"), str):
            return AccessToken.issued(body["access_token"], float(body.get("expires_in") or 3600))
        error = str(body.get("error") or f"HTTP {response.status_code}")
        description = redact(_first_line(body.get("error_description")), [assertion])
        reason = f"{where} refused: {error}" + (f": {description}" if description else "")
        if response.status_code == 429 or response.status_code >= 500 or error in _TRANSIENT_OAUTH_ERRORS:
            raise TransientError(reason, code=response.status_code)
        raise AuthenticationFailed(reason, code=response.status_code)


# ---- the per-process registry ---------------------------------------------------------------

_sources: dict[str, tuple[tuple[Any, ...], TokenSource]] = {}
_sources_lock = threading.Lock()


def _identity(profile: AuthProfile, records: Records) -> tuple[Any, ...]:
    """What a cached source depends on: the profile record and the keystore records it names."""
    keystores = []
    for _, name in profile.keystore_refs():
        keystores.append(records.keystores[name].record if name in records.keystores else None)
    return (profile.source, profile.record, tuple(keystores))


def token_source(profile_name: str, records: Records) -> TokenSource:
    """The process's token source for ``profile_name`` (replaced when its records change)."""
    profile = records.profile(profile_name)
    identity = _identity(profile, records)
    with _sources_lock:
        cached = _sources.get(profile_name)
        if cached is not None and cached[0] == identity:
            return cached[1]
        cadata = records.keystore(profile.record.truststore).cadata() if profile.record.truststore else None
        source: TokenSource
        if isinstance(profile.record, JwtBearerProfile):
            source = JwtBearerTokenSource(profile, cadata)
        else:
            source = MsalTokenSource(profile, cadata, records)
        _sources[profile_name] = (identity, source)
    if cached is not None:
        cached[1].close()
    return source


def forget_sources() -> None:
    """Drop every cached source (tests; a worker keeps them for its lifetime)."""
    with _sources_lock:
        sources = [s for _, s in _sources.values()]
        _sources.clear()
    for source in sources:
        source.close()
