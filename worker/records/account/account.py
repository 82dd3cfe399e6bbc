"""Email account records (outbound part) and their resolution into ready settings.

``AccountRecord`` is the YAML as written (field names are the contract in
contract §1). :func:`resolve_account` applies provider presets and the
``advanced`` overrides and checks cross-field rules, producing an immutable
:class:`EmailAccount` that the transports use without further parsing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from worker.errors import RecordProblem
from worker.records.account.advanced import (
    AUTH_MECHANISMS,
    TLS_VERSIONS,
    AdvancedSettings,
    TlsName,
    parse_advanced,
)
from worker.records.account.bounces import Mailbox, SendingIdentity, resolve_mailbox
from worker.records.account.providers import (
    DEFAULT_PORTS,
    GRAPH_LIMITS,
    PRESETS,
    Protocol,
    Provider,
    infer_provider,
)
from worker.records.account.record import (
    AccountRecord,
    AuthMode,
    DkimSettings,
    GraphSettings,
    LimitsSettings,
    SigningSettings,
    SmtpSettings,
    parse_rate,
)
from worker.records.addresses import check_address
from worker.records.secrets import Secret
from worker.records.yamlsrc import YamlDocument

DEFAULT_MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")


@dataclass(frozen=True)
class Limits:
    rate: tuple[int, float] | None  # (messages, per seconds)
    max_connections: int
    daily_recipients: int | None
    max_recipients_per_message: int | None


@dataclass(frozen=True)
class SmtpEndpoint:
    """Everything the SMTP transport needs, already resolved; holds no secret values."""

    host: str
    port: int
    protocol: Protocol
    min_tls_version: TlsName
    max_tls_version: TlsName | None
    check_hostname: bool
    truststore: str | None
    auth: AuthMode
    username: str | None
    password: Secret | None
    oauth_profile: str | None
    mechanisms: tuple[str, ...]
    ehlo_name: str | None
    envelope_from: str | None
    connect_timeout: float
    command_timeout: float
    data_timeout: float
    dsn_notify: str | None = None
    dsn_ret: str | None = None

    @property
    def security_label(self) -> str:
        """The contract §6 result line for this endpoint."""
        return {
            "none": "SMTP (Connect using default)",
            "smtps": "SMTP (Connect using SMTPS)",
            "starttls": "SMTP (Connect using STARTTLS)",
        }[self.protocol]


@dataclass(frozen=True)
class EmailAccount:
    name: str
    source: Path
    description: str | None
    provider: Provider
    send_using: Literal["smtp", "graph"]
    from_address: str
    display_name: str | None
    reply_to: str | None
    limits: Limits
    smtp: SmtpEndpoint | None = None
    graph: GraphSettings | None = None
    signing: SigningSettings | None = None
    dkim: DkimSettings | None = None
    bounces: Mailbox | None = None  # where its delivery reports are read (contract §11), when opted in
    # names of other records this account depends on: (field path, kind, name)
    references: tuple[tuple[str, str, str], ...] = field(default=())

    def summary(self) -> dict[str, Any]:
        """A secret-free description for ``accounts list`` and the API."""
        out: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "provider": self.provider,
            "send_using": self.send_using,
            "address": self.from_address,
        }
        if self.smtp:
            out.update(
                host=self.smtp.host,
                port=self.smtp.port,
                security=self.smtp.security_label,
                auth=self.smtp.auth,
            )
        if self.graph:
            out.update(base_url=self.graph.base_url, auth_profile=self.graph.auth_profile)
        if self.signing:
            out["signing"] = {"keystore": self.signing.keystore, "alias": self.signing.alias}
        if self.dkim:
            out["dkim"] = {"domain": self.dkim.domain, "selector": self.dkim.selector}
        if self.bounces:
            out["bounces"] = self.bounces.summary()
        return out


def resolve_account(
    doc: YamlDocument, record: AccountRecord
) -> tuple[EmailAccount | None, list[RecordProblem]]:
    """Apply presets and advanced keys, check cross-field rules."""
    problems: list[RecordProblem] = []

    def bad(loc: tuple[str | int, ...], reason: str) -> None:
        problems.append(doc.problem(loc, reason))

    smtp, graph = record.smtp, record.graph
    identity = smtp.address if smtp else (graph.address or graph.user_principal_name if graph else None)
    provider: Provider = record.provider or infer_provider(identity)
    endpoint = _resolve_transport(record, provider, bad)
    limits = _resolve_limits(record, provider)
    refs = _references(record)
    mailbox = _mailbox(record, provider, endpoint, bad) if record.bounces else None
    if problems or identity is None:
        return None, problems
    from_address, display_name, reply_to, signing = _sender(record)
    account = EmailAccount(
        name=doc.name,
        source=doc.path,
        description=record.description,
        provider=provider,
        send_using=record.send_using,
        from_address=from_address,
        display_name=display_name,
        reply_to=reply_to,
        limits=limits,
        smtp=endpoint,
        graph=graph if record.send_using == "graph" else None,
        signing=signing,
        dkim=record.dkim,
        bounces=mailbox,
        references=refs,
    )
    return account, problems


# Reports one problem at a field path (``doc.problem`` appended to the caller's list), so the
# steps below keep resolve_account's file:line:field reporting and its order.
Report = Callable[[tuple[str | int, ...], str], None]


def _resolve_transport(record: AccountRecord, provider: Provider, bad: Report) -> SmtpEndpoint | None:
    """The SMTP endpoint when sending by SMTP; the rules on which section send_using needs."""
    smtp, graph = record.smtp, record.graph
    endpoint: SmtpEndpoint | None = None
    if record.send_using == "smtp":
        if smtp is None:
            bad(("smtp",), "required when send_using is smtp")
        else:
            endpoint = _resolve_smtp(smtp, provider, bad)
    else:
        if provider != "office365":
            bad(
                ("send_using",),
                f"graph can only be used with provider office365 (provider is {provider})",
            )
        if graph is None:
            bad(("graph",), "required when send_using is graph")
    if smtp and smtp.signing and graph and graph.signing:
        bad(("graph", "signing"), "signing is set under both smtp and graph; keep one")
    return endpoint


def _mailbox(
    record: AccountRecord, provider: Provider, smtp: SmtpEndpoint | None, bad: Report
) -> Mailbox | None:
    """The bounce reader's mailbox, read as the account sends unless the record says otherwise."""
    assert record.bounces is not None
    graph = record.graph if record.send_using == "graph" else None
    sending = SendingIdentity(
        provider, record.send_using, smtp.host if smtp else None,
        smtp.username if smtp else (graph.user_principal_name if graph else None),
        smtp.password if smtp else None, smtp.oauth_profile if smtp else None,
        smtp.truststore if smtp else None,
    )  # fmt: skip
    return resolve_mailbox(record.bounces, sending, bad)


def _resolve_limits(record: AccountRecord, provider: Provider) -> Limits:
    """The record's limits, each one not given taken from the provider preset."""
    preset = PRESETS[provider]
    limits_rec = record.limits or LimitsSettings()
    # Graph has limits of its own (contract §5): 4 concurrent requests and 10,000 requests per
    # 10 minutes per mailbox, instead of SMTP AUTH's 3 connections and 30 messages a minute
    preset_limits = GRAPH_LIMITS if record.send_using == "graph" else preset.limits
    return Limits(
        rate=parse_rate(limits_rec.rate)
        if limits_rec.rate
        else (parse_rate(preset_limits.rate) if preset_limits.rate else None),
        max_connections=limits_rec.max_connections or preset_limits.max_connections,
        daily_recipients=limits_rec.daily_recipients or preset.limits.daily_recipients,
        max_recipients_per_message=limits_rec.max_recipients_per_message
        or preset.limits.max_recipients_per_message,
    )


def _references(record: AccountRecord) -> tuple[tuple[str, str, str], ...]:
    """(field path, kind, name) of every other record the account uses, for ``accounts check``."""
    smtp, graph = record.smtp, record.graph
    refs: list[tuple[str, str, str]] = []
    if smtp:
        if smtp.truststore:
            refs.append(("smtp.truststore", "keystore", smtp.truststore))
        if smtp.signing:
            refs.append(("smtp.signing.keystore", "keystore", smtp.signing.keystore))
        if smtp.oauth_profile and record.send_using == "smtp":
            refs.append(("smtp.oauth_profile", "auth-profile", smtp.oauth_profile))
    if graph and record.send_using == "graph":
        refs.append(("graph.auth_profile", "auth-profile", graph.auth_profile))
        if graph.truststore:
            refs.append(("graph.truststore", "keystore", graph.truststore))
        if graph.signing:
            refs.append(("graph.signing.keystore", "keystore", graph.signing.keystore))
    if record.dkim and record.dkim.keystore:
        refs.append(("dkim.keystore", "keystore", record.dkim.keystore))
    if record.bounces and record.bounces.truststore:
        refs.append(("bounces.truststore", "keystore", record.bounces.truststore))
    return tuple(refs)


def _sender(record: AccountRecord) -> tuple[str, str | None, str | None, SigningSettings | None]:
    """(From address, display name, Reply-To, S/MIME signing) from the section that sends;
    a Graph account falls back on its smtp section. Only called on a record without problems."""
    smtp, graph = record.smtp, record.graph
    if record.send_using == "graph":
        assert graph is not None
        from_address = graph.address or (smtp.address if smtp else graph.user_principal_name)
        return (
            from_address,
            graph.display_name,
            graph.reply_to,
            graph.signing or (smtp.signing if smtp else None),
        )
    assert smtp is not None
    return smtp.address, smtp.display_name, smtp.reply_to, smtp.signing


def _resolve_smtp(smtp: SmtpSettings, provider: Provider, bad: Report) -> SmtpEndpoint | None:
    """The endpoint an SMTP section describes, or None when it has no host to connect to."""
    preset = PRESETS[provider]
    adv, adv_problems = parse_advanced(smtp.advanced)
    for key, reason in adv_problems:
        bad(("smtp", "advanced", key), reason)
    protocol = _protocol(smtp, adv, preset.protocol, bad)
    host = smtp.host or preset.host
    if not host:
        bad(("smtp", "host"), f"required (provider {provider} has no preset host)")
    if adv.envelope_from:
        try:
            check_address(adv.envelope_from)
        except ValueError as exc:
            bad(("smtp", "advanced", adv.sources.get("from", "mail.smtp.from")), str(exc))
    auth = _auth_mode(smtp, bad)
    min_tls, max_tls = _tls_range(smtp.min_tls_version, adv, bad)
    mechanisms = _mechanisms(auth, adv, bad)
    if not host:
        return None
    command_timeout = adv.command_timeout or 30.0
    return SmtpEndpoint(
        host=host,
        port=smtp.port or DEFAULT_PORTS[protocol],
        protocol=protocol,
        min_tls_version=min_tls,
        max_tls_version=max_tls,
        check_hostname=adv.check_server_identity,
        truststore=smtp.truststore,
        auth=auth,
        username=(smtp.user_id or smtp.address) if auth != "none" else None,
        password=smtp.password if auth == "password" else None,
        oauth_profile=smtp.oauth_profile if auth == "oauth" else None,
        mechanisms=mechanisms,
        ehlo_name=adv.ehlo_name,
        envelope_from=adv.envelope_from,
        connect_timeout=adv.connect_timeout or 15.0,
        command_timeout=command_timeout,
        data_timeout=adv.write_timeout or max(command_timeout, 120.0),
        dsn_notify=adv.dsn_notify,
        dsn_ret=adv.dsn_ret,
    )


def _protocol(smtp: SmtpSettings, adv: AdvancedSettings, preset: Protocol, bad: Report) -> Protocol:
    """How to secure the connection: ``secure``, then ``protocol``, the JavaMail TLS keys, the
    port and last the provider preset; every contradiction among them is reported."""
    if not smtp.secure:
        if smtp.protocol is not None:
            bad(("smtp", "protocol"), "only applies when secure: true")
        if adv.ssl_enable or adv.starttls_enable or adv.starttls_required:
            bad(("smtp", "advanced"), "TLS keys conflict with secure: false")
        return "none"
    _check_secure_keys(smtp, adv, bad)
    if smtp.protocol is not None:
        if adv.ssl_enable and smtp.protocol == "starttls":
            bad(("smtp", "protocol"), "conflicts with mail.smtp.ssl.enable: true")
        return smtp.protocol
    if adv.ssl_enable:
        return "smtps"
    if adv.starttls_enable:
        return "starttls"
    if smtp.port is not None:
        return "smtps" if smtp.port == 465 else "starttls"
    return preset


def _check_secure_keys(smtp: SmtpSettings, adv: AdvancedSettings, bad: Report) -> None:
    """With ``secure: true``, the advanced keys that would send in the clear or ask for both TLS kinds."""
    if adv.starttls_required is False:
        key = adv.sources.get("starttls.required", "mail.smtp.starttls.required")
        bad(
            ("smtp", "advanced", key),
            'secure: true never sends in the clear; it cannot be "false"',
        )
    if adv.starttls_enable is False and adv.ssl_enable is not True and smtp.protocol != "smtps":
        key = adv.sources.get("starttls.enable", "mail.smtp.starttls.enable")
        bad(
            ("smtp", "advanced", key),
            "secure: true needs STARTTLS or SMTPS; use secure: false for a clear connection",
        )
    if adv.ssl_enable and adv.starttls_enable:
        bad(
            ("smtp", "advanced"),
            "mail.smtp.ssl.enable and mail.smtp.starttls.enable are both true; pick one",
        )


def _auth_mode(smtp: SmtpSettings, bad: Report) -> AuthMode:
    """``auth`` as given, or implied by which credential the section holds; checks that it is there."""
    auth: AuthMode = smtp.auth or ("oauth" if smtp.oauth_profile else "password" if smtp.password else "none")
    if auth == "password" and smtp.password is None:
        bad(("smtp", "password"), "required when auth is password (or set auth: none)")
    if auth == "oauth" and not smtp.oauth_profile:
        bad(("smtp", "oauth_profile"), "required when auth is oauth")
    if auth != "oauth" and smtp.oauth_profile:
        bad(("smtp", "oauth_profile"), f"only used with auth: oauth (auth is {auth})")
    return auth


def _tls_range(min_tls: TlsName, adv: AdvancedSettings, bad: Report) -> tuple[TlsName, TlsName | None]:
    """(lowest, highest) TLS version: ``mail.smtp.ssl.protocols`` narrows min_tls_version, never
    widens it; the highest is None (the library's) unless those keys name one."""
    if not adv.tls_versions:
        return min_tls, None
    allowed = [v for v in adv.tls_versions if TLS_VERSIONS.index(v) >= TLS_VERSIONS.index(min_tls)]
    if not allowed:
        key = adv.sources.get("ssl.protocols", "mail.smtp.ssl.protocols")
        bad(
            ("smtp", "advanced", key),
            f"allows no TLS version at or above min_tls_version {min_tls}",
        )
        return min_tls, None
    return allowed[0], allowed[-1]


def _mechanisms(auth: AuthMode, adv: AdvancedSettings, bad: Report) -> tuple[str, ...]:
    """AUTH mechanisms to try, in order: the advanced list (or the default for the auth mode)
    less the disabled ones."""
    default_order = ("XOAUTH2",) if auth == "oauth" else DEFAULT_MECHANISMS
    order = adv.mechanisms or default_order
    mechanisms = tuple(m for m in order if m not in adv.disabled_mechanisms and m in AUTH_MECHANISMS)
    if auth != "none" and not mechanisms:
        bad(("smtp", "advanced"), "every AUTH mechanism is disabled")
    return mechanisms
