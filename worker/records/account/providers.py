"""Provider presets: what a user would otherwise look up in a help page.

Explicit record fields always win over a preset; the provider itself is
inferred from the address's domain when the record does not name one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Provider = Literal["gmail", "office365", "outlook", "yahoo", "icloud", "zoho", "other"]
Protocol = Literal["none", "starttls", "smtps"]


@dataclass(frozen=True)
class ProviderLimits:
    rate: str | None = None  # "30/minute"
    max_connections: int = 4
    daily_recipients: int | None = None
    max_recipients_per_message: int | None = None


@dataclass(frozen=True)
class Preset:
    host: str | None
    port: int
    protocol: Protocol
    limits: ProviderLimits
    # The SPF include(s) the provider documents for a domain that sends through its servers: the
    # deliverability preflight (worker/ops/preflight.py) wants the sender's record to reach one.
    spf_includes: tuple[str, ...] = ()


PRESETS: dict[Provider, Preset] = {
    "gmail": Preset(
        "smtp.gmail.com",
        587,
        "starttls",
        ProviderLimits(max_connections=3, daily_recipients=2000, max_recipients_per_message=100),
        spf_includes=("_spf.google.com",),  # Google Workspace
    ),
    # Exchange Online SMTP AUTH: 30 msgs/min, 10,000 recipients/day, 3 connections (contract §5)
    "office365": Preset(
        "smtp.office365.com",
        587,
        "starttls",
        ProviderLimits(rate="30/minute", max_connections=3, daily_recipients=10000),
        spf_includes=("spf.protection.outlook.com",),  # Microsoft 365 / Exchange Online
    ),
    "outlook": Preset(
        "smtp-mail.outlook.com",
        587,
        "starttls",
        ProviderLimits(rate="30/minute", max_connections=3, daily_recipients=300),
        # Outlook.com's own domains and its personalised domains (include:outlook.com, which
        # itself reaches Exchange Online's)
        spf_includes=("outlook.com", "spf.protection.outlook.com"),
    ),
    "yahoo": Preset(
        "smtp.mail.yahoo.com", 465, "smtps", ProviderLimits(max_connections=3), ("_spf.mail.yahoo.com",)
    ),
    "icloud": Preset(  # iCloud+ custom email domains
        "smtp.mail.me.com", 587, "starttls", ProviderLimits(max_connections=3), ("icloud.com",)
    ),
    "zoho": Preset(  # zohomail.com now, zoho.com before (US data centre, the preset's host)
        "smtp.zoho.com", 465, "smtps", ProviderLimits(max_connections=3), ("zohomail.com", "zoho.com")
    ),
    "other": Preset(None, 587, "starttls", ProviderLimits()),
}

_DOMAINS: dict[str, Provider] = {
    "gmail.com": "gmail",
    "googlemail.com": "gmail",
    "outlook.com": "outlook",
    "hotmail.com": "outlook",
    "live.com": "outlook",
    "msn.com": "outlook",
    "yahoo.com": "yahoo",
    "ymail.com": "yahoo",
    "rocketmail.com": "yahoo",
    "icloud.com": "icloud",
    "me.com": "icloud",
    "mac.com": "icloud",
    "zoho.com": "zoho",
    "zohomail.com": "zoho",
}

DEFAULT_PORTS: dict[Protocol, int] = {"none": 25, "starttls": 587, "smtps": 465}

# Where each provider's mailbox is read over IMAP (the bounce reader, contract §11); "other"
# reads the host it sends through. Every one of these takes IMAPS on 993.
IMAP_HOSTS: dict[Provider, str | None] = {
    "gmail": "imap.gmail.com",
    "office365": "outlook.office365.com",
    "outlook": "outlook.office365.com",
    "yahoo": "imap.mail.yahoo.com",
    "icloud": "imap.mail.me.com",
    "zoho": "imap.zoho.com",
    "other": None,
}


def infer_provider(address: str | None) -> Provider:
    """gmail.com → gmail, outlook.com/hotmail.com → outlook, …; anything else → other."""
    if not address or "@" not in address:
        return "other"
    domain = address.rsplit("@", 1)[1].lower()
    if domain in _DOMAINS:
        return _DOMAINS[domain]
    # regional variants: yahoo.co.uk, hotmail.fr, outlook.de, …
    label = domain.split(".", 1)[0]
    return {"yahoo": "yahoo", "hotmail": "outlook", "outlook": "outlook", "live": "outlook"}.get(
        label, "other"
    )  # type: ignore[return-value]


# Microsoft Graph sendMail per mailbox (contract §5): 4 concurrent requests, 10,000 requests per
# 10 minutes (1,000 a minute, spread evenly); Exchange's 10,000 recipients a day still apply.
GRAPH_LIMITS = ProviderLimits(rate="1000/minute", max_connections=4, daily_recipients=10000)
# Graph sends from Exchange Online: Microsoft 365's SPF include
GRAPH_SPF_INCLUDES = ("spf.protection.outlook.com",)


BASIC_AUTH_RETIREMENT = (
    "Microsoft turns SMTP Basic authentication (auth: password) off by default for existing "
    "Exchange Online tenants at the end of December 2026 (final removal to be announced in the "
    "second half of 2027; tenants created after December 2026 never have it): move this account "
    "to auth: oauth with a Microsoft auth profile, or to send_using: graph"
)


def basic_auth_warning(provider: str, send_using: str, auth: str | None) -> str | None:
    """The warning for an Office 365 account still on SMTP Basic authentication (contract §5)."""
    if provider == "office365" and send_using == "smtp" and auth == "password":
        return BASIC_AUTH_RETIREMENT
    return None
