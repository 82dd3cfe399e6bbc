"""The deliverability preflight (contract §11): what the sender's DNS tells receivers, as four
lines — ``MX``, ``SPF``, ``DKIM``, ``DMARC`` — each ``pass``, ``warn`` or ``fail`` with the record
seen and one reason. ``postroom test-connectivity`` prints them and the periodic health check
stores them under ``detail.deliverability``.

They are advice: a domain whose DMARC record is missing still has an account that can log in
and send, so nothing here changes a connectivity check's ``ok``. A resolver that does not
answer gives ``warn`` lines saying so, within :data:`BUDGET` seconds, never an error.

The checks are functions of a :class:`Sender` (what the account record says the DNS must
match) over the resolver seam (worker/ops/resolver.py); :class:`Preflight` is the entry point
the two callers use, the health check's with a cache in Redis (:data:`CACHE_SECONDS` per
domain and account shape) so that checking every account every five minutes does not ask DNS
every five minutes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import ipaddress
import json
import re
import time
from dataclasses import asdict, dataclass
from typing import Any

import redis
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key

from worker.db.keys import redis_key
from worker.errors import ConfigurationError
from worker.mail.signing import signers
from worker.ops.resolver import QUERY_TIMEOUT, DnspythonResolver, DnsTrouble, Resolver
from worker.ops.spf import MAX_LOOKUPS, WALK_CAP, SpfError, check_host, spf_records, walk
from worker.records.account.account import EmailAccount
from worker.records.account.providers import GRAPH_SPF_INCLUDES, PRESETS
from worker.records.loader import Records
from worker.settings import resolver_address

CHECKS = ("mx", "spf", "dkim", "dmarc")
BUDGET = 5.0  # seconds for all four lines, whatever the resolver does
CACHE_SECONDS = 3600.0  # how long the health check reuses a domain's lines
NO_RECORD = "(none)"  # a line's record, shown, when there was none to see
BULK_RULES = "Gmail, Yahoo and Microsoft require DMARC of bulk senders"
# Addresses no receiver sees mail come from: a relay there hands mail on from another address
INTERNAL_NETWORKS = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)


@dataclass(frozen=True)
class Line:
    """One check's verdict. ``unknown``: the resolver could not say (a ``warn`` that is no
    verdict on the domain: never cached, and DMARC does not count it against the sender)."""

    result: str  # pass | warn | fail
    record: str | None
    reason: str
    unknown: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"result": self.result, "record": self.record, "reason": self.reason}


def _trouble(exc: Exception) -> Line:
    return Line("warn", None, f"no verdict: {exc}", unknown=True)


@dataclass(frozen=True)
class DkimKey:
    domain: str
    selector: str
    public_key: str  # base64 SubjectPublicKeyInfo, as p= publishes it


@dataclass(frozen=True)
class Sender:
    """What the DNS must agree with, read from the account record (holds no secret)."""

    domain: str  # of the From address: MX, DKIM alignment, DMARC
    envelope: str  # the envelope sender (MAIL FROM): SPF is checked for its domain
    relay: str | None  # the SMTP host mail leaves through (None: Graph)
    includes: tuple[str, ...]  # the provider's SPF includes; () = judge the relay's addresses
    provider: str
    dkim: DkimKey | None = None
    dkim_error: str | None = None  # the account names a DKIM key that cannot be loaded

    @property
    def envelope_domain(self) -> str:
        return self.envelope.rpartition("@")[2].lower()


def sender_of(account: EmailAccount, records: Records) -> Sender:
    """The :class:`Sender` of an account: a preset's relay (or Graph) is judged by the provider's
    documented SPF include (worker/records/account/providers.py), any other relay by its addresses."""
    dkim: DkimKey | None = None
    dkim_error: str | None = None
    if account.dkim is not None:
        try:
            signer = signers().dkim(account, records)
            assert signer is not None
            dkim = DkimKey(signer.domain, signer.selector, signer.public_key)
        except ConfigurationError as exc:
            dkim_error = str(exc)
    domain = account.from_address.rpartition("@")[2].lower()
    if account.smtp is None:
        return Sender(domain, account.from_address, None, GRAPH_SPF_INCLUDES, "graph", dkim, dkim_error)
    preset = PRESETS[account.provider]
    own = preset.host is not None and account.smtp.host.lower() == preset.host
    envelope = account.smtp.envelope_from or account.from_address
    includes = preset.spf_includes if own else ()
    return Sender(domain, envelope, account.smtp.host, includes, account.provider, dkim, dkim_error)


# ---- MX --------------------------------------------------------------------------------


async def mx_line(sender: Sender, dns: Resolver) -> Line:
    """Bounces and replies come back only to a domain that takes mail."""
    domain = sender.domain
    try:
        found = await dns.answers(domain, "MX")
        if found:
            ordered = sorted(found, key=lambda mx: int(mx.split()[0]))
            if [mx.split()[-1] for mx in found] == ["."]:
                reason = (
                    f"null MX (RFC 7505): {domain} takes no mail, so bounces and replies cannot come back"
                )
                return Line("fail", found[0], reason)
            return Line("pass", ", ".join(ordered), f"{domain} takes mail: bounces and replies come back")
        addresses = await dns.answers(domain, "A") + await dns.answers(domain, "AAAA")
    except DnsTrouble as exc:
        return _trouble(exc)
    if addresses:
        reason = f"no MX record: mail to {domain} falls back to its address record"
        return Line("warn", ", ".join(addresses), reason)
    reason = f"no MX and no A/AAAA record: bounces and replies to {domain} cannot come back"
    return Line("fail", None, reason)


# ---- SPF -------------------------------------------------------------------------------


async def spf_line(sender: Sender, dns: Resolver) -> Line:
    """Is the relay authorised by the envelope domain's one ``v=spf1`` record?"""
    domain = sender.envelope_domain
    try:
        found = spf_records(await dns.answers(domain, "TXT"))
    except DnsTrouble as exc:
        return _trouble(exc)
    if not found:
        return Line("fail", None, f"{domain} has no v=spf1 TXT record: no server is authorised to send")
    if len(found) > 1:
        reason = f"permerror: {domain} has {len(found)} v=spf1 records (RFC 7208 allows exactly one)"
        return Line("fail", " | ".join(found), reason)
    record = found[0]
    try:
        walked = await walk(dns, domain, sender.envelope)
    except SpfError as exc:
        return _spf_error(exc, exc.record or record)
    if walked.lookups > MAX_LOOKUPS:
        many = f"more than {WALK_CAP}" if walked.lookups > WALK_CAP else str(walked.lookups)
        reason = (
            f"permerror: {many} DNS lookups (include, a, mx, ptr, exists, redirect); "
            f"RFC 7208 allows {MAX_LOOKUPS}"
        )
        return Line("fail", record, reason)
    lookups = f"{walked.lookups} of {MAX_LOOKUPS} DNS lookups"
    if sender.includes:
        for include in sender.includes:
            if include in walked.reached:
                return Line("pass", record, f"reaches {walked.reached[include]} ({lookups})")
        wanted = " or ".join(f"include:{i}" for i in sender.includes)
        who = "Microsoft 365 (Graph)" if sender.provider == "graph" else sender.provider
        reason = (
            f"does not reach {wanted}: {who}'s servers are not authorised; {_unmatched(walked.otherwise)}"
        )
        return Line(_severity(walked.otherwise), record, reason)
    return await _relay_line(sender, dns, record, lookups)


def _spf_error(exc: SpfError, record: str | None) -> Line:
    if exc.kind == "temperror":
        return Line("warn", record, f"no verdict: {exc.reason}", unknown=True)
    return Line("fail", record, f"permerror: {exc.reason}")


def _severity(result: str) -> str:
    """``-all`` (fail) is refused by many receivers: fail; ``~all``, ``?all`` or no ``all``
    (softfail, neutral) is usually taken, but SPF did not pass, so it cannot align for DMARC: warn."""
    return "fail" if result in ("fail", "permerror") else "warn"


def _unmatched(result: str) -> str:
    return {
        "fail": "-all: receivers may refuse the mail",
        "softfail": "~all: softfail, and SPF cannot align for DMARC",
        "neutral": "neutral (?all or no all): SPF cannot align for DMARC",
    }.get(result, result)


async def _relay_line(sender: Sender, dns: Resolver, record: str, lookups: str) -> Line:
    relay = sender.relay or "?"
    try:
        addresses = [ipaddress.ip_address(relay)]
    except ValueError:
        try:
            found = await dns.answers(relay, "A") + await dns.answers(relay, "AAAA")
        except DnsTrouble as exc:
            return Line("warn", record, f"no verdict: the relay's addresses: {exc}", unknown=True)
        if not found:
            return Line("warn", record, f"the relay {relay} has no A/AAAA record: cannot tell who sends")
        addresses = [ipaddress.ip_address(a) for a in found]
    for address in addresses:
        try:
            result = await check_host(dns, address, sender.envelope_domain, sender.envelope)
        except SpfError as exc:
            return _spf_error(exc, record)
        if result != "pass":
            shown = relay if str(address) == relay else f"{relay} ({address})"
            reason = f"the relay {shown} is not authorised: {_unmatched(result)}"
            if address.is_loopback or any(address in net for net in INTERNAL_NETWORKS):
                reason += "; a relay on a private address is judged by it: list the address it sends out from"
            return Line(_severity(result), record, reason)
    shown = ", ".join(str(a) for a in addresses)
    return Line(
        "pass", record, f"authorises the relay {relay}{'' if shown == relay else f' ({shown})'} ({lookups})"
    )


# ---- DKIM ------------------------------------------------------------------------------


def _tags(text: str) -> dict[str, str]:
    """``k=v; k=v`` tag lists (DKIM keys, DMARC records); names in lower case."""
    pairs = (part.partition("=") for part in text.split(";") if "=" in part)
    return {k.strip().lower(): v.strip() for k, _, v in pairs}


def same_key(published: str, configured: str) -> bool:
    """Does the published ``p=`` (SubjectPublicKeyInfo or a bare RSAPublicKey) hold the
    configured public key?"""
    try:
        theirs = load_der_public_key(base64.b64decode("".join(published.split()), validate=True))
        ours = load_der_public_key(base64.b64decode(configured))
    except (ValueError, binascii.Error):
        return False
    if not isinstance(theirs, rsa.RSAPublicKey) or not isinstance(ours, rsa.RSAPublicKey):
        return False
    return theirs.public_numbers() == ours.public_numbers()


async def dkim_line(sender: Sender, dns: Resolver) -> Line:
    """Receivers verify the signature with the key at ``<selector>._domainkey.<domain>``."""
    if sender.dkim_error is not None:
        return Line("fail", None, f"the configured DKIM key cannot be used: {sender.dkim_error}")
    if sender.dkim is None:
        reason = (
            "no DKIM key in the account record: the provider may sign with its own domain, "
            f"which does not align with {sender.domain} for DMARC"
        )
        return Line("warn", None, reason)
    name = f"{sender.dkim.selector}._domainkey.{sender.dkim.domain}"
    try:
        found = [t for t in await dns.answers(name, "TXT") if "p" in _tags(t)]
    except DnsTrouble as exc:
        return _trouble(exc)
    if not found:
        return Line("fail", None, f"no DKIM key record at {name}: receivers cannot verify the signature")
    if len(found) > 1:
        return Line(
            "fail", " | ".join(found), f"{len(found)} DKIM key records at {name}: verifiers may pick either"
        )
    published = _tags(found[0])["p"]
    if not published:
        return Line("fail", found[0], f"the key at {name} is revoked (empty p=)")
    if not same_key(published, sender.dkim.public_key):
        return Line("fail", found[0], f"p= at {name} is not the public key of the configured DKIM key")
    return Line("pass", found[0], f"{name} publishes the configured key (d={sender.dkim.domain})")


# ---- DMARC -----------------------------------------------------------------------------


def organisational(domain: str) -> str:
    """The last two labels: a simple stand-in for the Public Suffix List (wrong for
    ``example.co.uk``, whose organisational domain is three labels)."""
    return ".".join(domain.split(".")[-2:])


def aligned(identifier: str, domain: str, mode: str) -> bool:
    """DMARC identifier alignment: strict (``s``) the same domain, relaxed the same organisational one."""
    identifier, domain = identifier.lower().rstrip("."), domain.lower().rstrip(".")
    return identifier == domain if mode == "s" else organisational(identifier) == organisational(domain)


async def dmarc_records(sender: Sender, dns: Resolver) -> tuple[list[str], str]:
    """The ``v=DMARC1`` records at ``_dmarc.<domain>`` or, without one, at the organisational
    domain's (RFC 7489 §6.6.3), and the domain they were found at."""
    domain = sender.domain
    for where in dict.fromkeys((domain, organisational(domain))):
        texts = await dns.answers(f"_dmarc.{where}", "TXT")
        found = [t for t in texts if re.match(r"v\s*=\s*DMARC1\s*(;|$)", t, re.IGNORECASE)]
        if found:
            return found, where
    return [], domain


def dmarc_line(sender: Sender, found: list[str], where: str, spf: Line, dkim: Line) -> Line:
    """A record, and SPF or DKIM passing aligned with the From domain: what receivers enforce."""
    domain = sender.domain
    if not found:
        elsewhere = "" if organisational(domain) == domain else f" nor at _dmarc.{organisational(domain)}"
        return Line("fail", None, f"no DMARC record at _dmarc.{domain}{elsewhere}: {BULK_RULES}")
    if len(found) > 1:
        return Line(
            "fail", " | ".join(found), f"{len(found)} DMARC records at _dmarc.{where}: receivers ignore both"
        )
    tags = _tags(found[0])
    policy = (tags.get("sp") if where != domain else None) or tags.get("p", "")
    if policy not in ("none", "quarantine", "reject"):
        return Line("fail", found[0], f"p= is missing or not none/quarantine/reject: {BULK_RULES}")
    ways = []
    if spf.result == "pass" and aligned(sender.envelope_domain, domain, tags.get("aspf", "r")):
        ways.append("SPF")
    if dkim.result == "pass" and sender.dkim and aligned(sender.dkim.domain, domain, tags.get("adkim", "r")):
        ways.append("DKIM")
    found_at = (
        "" if where == domain else f" (the organisational domain's, {where}, by the last-two-labels rule)"
    )
    if ways:
        note = (
            "; p=none only asks for reports: move to quarantine or reject once they look clean"
            if policy == "none"
            else ""
        )
        return Line("pass", found[0], f"p={policy}{found_at}; aligned through {' and '.join(ways)}{note}")
    if spf.unknown or dkim.unknown:
        return Line(
            "warn",
            found[0],
            f"p={policy}{found_at}; no verdict on alignment: SPF or DKIM could not be looked up",
            unknown=True,
        )
    return Line("fail", found[0], f"p={policy}{found_at}; neither SPF nor DKIM passes aligned with {domain}")


# ---- the run -----------------------------------------------------------------------------


async def run_checks(sender: Sender, dns: Resolver) -> dict[str, Line]:
    """The four lines; the first three side by side, DMARC from their verdicts."""

    async def records() -> tuple[list[str], str] | DnsTrouble:
        try:
            return await dmarc_records(sender, dns)
        except DnsTrouble as exc:
            return exc

    mx, spf, dkim, dmarc = await asyncio.gather(
        mx_line(sender, dns), spf_line(sender, dns), dkim_line(sender, dns), records()
    )
    verdict = _trouble(dmarc) if isinstance(dmarc, DnsTrouble) else dmarc_line(sender, *dmarc, spf, dkim)
    return {"mx": mx, "spf": spf, "dkim": dkim, "dmarc": verdict}


async def deliverability(
    sender: Sender, dns: Resolver, budget: float = BUDGET
) -> tuple[dict[str, Any], bool]:
    """``detail.deliverability`` for ``sender`` and whether every line is a verdict (cacheable)."""
    try:
        lines = await asyncio.wait_for(run_checks(sender, dns), budget)
    except TimeoutError:
        late = Line(
            "warn", None, f"no verdict: {dns.name} gave no full answer within {budget:g}s", unknown=True
        )
        lines = dict.fromkeys(CHECKS, late)
    report: dict[str, Any] = {"domain": sender.domain, "resolver": dns.name, "checked_at": time.time()}
    report.update({name: line.as_dict() for name, line in lines.items()})
    return report, not any(line.unknown for line in lines.values())


class Preflight:
    """How a caller runs the preflight: the resolver (the ``dns_resolver`` setting, "" for the
    system's) and, for the health check, the Redis its results are kept in."""

    def __init__(
        self,
        resolver: str = "",
        *,
        cache: redis.Redis | None = None,
        timeout: float = QUERY_TIMEOUT,
        budget: float = BUDGET,
    ) -> None:
        self.address = resolver_address(resolver) if resolver else None
        self.cache, self.timeout, self.budget = cache, timeout, budget

    async def report(self, account: EmailAccount, records: Records) -> dict[str, Any]:
        sender = sender_of(account, records)
        shape = json.dumps([asdict(sender), self.address], sort_keys=True)
        key = redis_key("preflight", sender.domain, hashlib.sha256(shape.encode()).hexdigest()[:16])
        if (kept := await self._kept(key)) is not None:
            return kept
        report, settled = await deliverability(
            sender, DnspythonResolver(self.address, timeout=self.timeout), self.budget
        )
        if settled and self.cache is not None:
            await asyncio.to_thread(self._keep, key, report)
        return report

    async def _kept(self, key: str) -> dict[str, Any] | None:
        if self.cache is None:
            return None
        try:
            raw = await asyncio.to_thread(self.cache.get, key)
        except redis.RedisError:
            return None  # no cache today: ask DNS
        return dict(json.loads(raw)) if raw else None

    def _keep(self, key: str, report: dict[str, Any]) -> None:
        assert self.cache is not None
        with contextlib.suppress(redis.RedisError):  # not kept: asked again next time
            self.cache.set(key, json.dumps(report), ex=int(CACHE_SECONDS))


# ---- how it is shown ---------------------------------------------------------------------


def _shown(record: str | None) -> str:
    """A record as a text line shows it: a DKIM key's p= cut to its start."""
    if not record:
        return NO_RECORD
    return re.sub(r"(p=[A-Za-z0-9+/]{12})[A-Za-z0-9+/=\s]{8,}", r"\1…", record)


def text_lines(report: dict[str, Any]) -> list[str]:
    """``MX: pass  <record>  <reason>`` and the other three, in order."""
    out = []
    for name in CHECKS:
        line = report.get(name) or {}
        result, record = line.get("result", "?"), _shown(line.get("record"))
        out.append(f"{name.upper()}: {result}  {record}  {line.get('reason', '')}")
    return out


def rows(report: dict[str, Any] | None) -> list[dict[str, str]]:
    """The four lines as table rows (the dashboard's account page): check, result, record, reason."""
    if not report or "error" in report:
        return []
    return [
        {**line, "check": name.upper(), "record": _shown(line.get("record"))}
        for name in CHECKS
        if (line := report.get(name))
    ]


def summary(report: dict[str, Any] | None) -> str | None:
    """The lines that are not ``pass``, for one-line views: ``DNS: SPF warn, DMARC fail``."""
    if not report:
        return None
    if "error" in report:
        return "DNS: not checked (the preflight failed)"
    off = [
        f"{name.upper()} {report[name]['result']}"
        for name in CHECKS
        if (report.get(name) or {}).get("result", "pass") != "pass"
    ]
    return f"DNS: {', '.join(off)}" if off else None
