"""SPF (RFC 7208) over the preflight's DNS seam (worker/ops/resolver.py): does the envelope
domain's record authorise the relay an account sends through?

Two walks over the same parsed terms:

- :func:`walk` follows every include and redirect a receiver could reach, counts the DNS
  lookups (more than 10 is a permerror for any address not matched early, so the check fails
  it whatever the relay; the count goes on to :data:`WALK_CAP`, to say how many) and lists the
  domains reached: a provider's servers are authorised
  when the record reaches the provider's documented include (worker/records/account/providers.py).
- :func:`check_host` is RFC 7208 §4's evaluation for one address: any other relay is authorised
  when each of its addresses passes.

Not evaluated: ``ptr`` (RFC 7208 §5.5: do not use it; it never matches here) and ``exp=`` (only
the text of a rejection).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from worker.ops.resolver import DnsTrouble, Resolver

MAX_LOOKUPS = 10  # include, a, mx, ptr, exists, redirect (RFC 7208 §4.6.4)
MAX_VOID = 2  # lookups that found nothing
MAX_MX = 10  # names one mx mechanism may look up
WALK_CAP = 50  # the walk counts past MAX_LOOKUPS (to say how many), up to here (include loops)
LOOKUP_TERMS = frozenset({"include", "a", "mx", "ptr", "exists"})
MECHANISMS = frozenset({"all", "ip4", "ip6", *LOOKUP_TERMS})
RESULT_OF = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_MODIFIER = re.compile(r"^([A-Za-z][A-Za-z0-9_.-]*)=(.*)$")
_CIDR = re.compile(r"(?:/(\d{1,2}))?(?://(\d{1,3}))?")
_MACRO = re.compile(r"%\{([slodiphv])(\d*)(r?)([-.+,/_=]*)\}|%%|%_|%-", re.IGNORECASE)


class SpfError(Exception):
    """``permerror`` (the record is broken: every receiver fails it) or ``temperror`` (DNS could
    not say); ``record`` is what was seen, when there is one to show."""

    def __init__(self, kind: str, reason: str, record: str | None = None) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.record = record


@dataclass(frozen=True)
class Term:
    """One mechanism (``-all``, ``include:x``, ``a:x/24``) or modifier (``redirect=x``)."""

    qualifier: str
    name: str
    value: str = ""
    cidr4: int | None = None
    cidr6: int | None = None
    modifier: bool = False


def spf_records(texts: list[str]) -> list[str]:
    """The TXT strings that are SPF records (``v=spf1`` alone or followed by a space)."""
    return [t for t in texts if t.lower() == "v=spf1" or t.lower().startswith("v=spf1 ")]


def parse(record: str) -> list[Term]:
    """The record's terms; SpfError (permerror) on anything RFC 7208 does not allow."""
    terms = [_term(word, record) for word in record.split()[1:]]
    if sum(1 for t in terms if t.modifier and t.name == "redirect") > 1:
        raise SpfError("permerror", "more than one redirect= modifier", record)
    return terms


def _term(word: str, record: str) -> Term:
    if modifier := _MODIFIER.match(word):
        name = modifier[1].lower()
        if name in ("redirect", "exp") and not modifier[2]:
            raise SpfError("permerror", f"{word}: no domain", record)
        return Term("+", name, modifier[2], modifier=True)
    qualifier = word[0] if word[0] in RESULT_OF else "+"
    name, _, arg = word.lstrip("+-~?").partition(":")
    name, slash, cidr = name.partition("/")
    cidr = slash + cidr
    name = name.lower()
    if name not in MECHANISMS:
        raise SpfError("permerror", f"unknown mechanism {word!r}", record)
    if name in ("ip4", "ip6"):
        try:
            network = ipaddress.ip_network(arg + cidr, strict=False)
        except ValueError:
            raise SpfError("permerror", f"{word}: not an IP network", record) from None
        if network.version != int(name[2]):
            raise SpfError("permerror", f"{word}: not an IPv{name[2]} network", record)
        return Term(qualifier, name, str(network))
    if name in ("a", "mx") and "/" in arg:
        arg, slash, rest = arg.partition("/")
        cidr = slash + rest
    if (name in ("include", "exists") and not arg) or (name == "all" and (arg or cidr)):
        raise SpfError("permerror", f"{word}: malformed", record)
    found = _CIDR.fullmatch(cidr) if name in ("a", "mx") else (None if cidr else _CIDR.fullmatch(""))
    if found is None or int(found[1] or 0) > 32 or int(found[2] or 0) > 128:
        raise SpfError("permerror", f"{word}: bad prefix length", record)
    return Term(
        qualifier, name, arg, int(found[1]) if found[1] else None, int(found[2]) if found[2] else None
    )


def expand(spec: str, *, domain: str, sender: str, ip: IpAddress | None) -> str | None:
    """A domain-spec with its macros expanded (RFC 7208 §7); None when it needs the client's
    address and there is none (the lookup walk). SpfError (permerror) on a malformed macro."""
    if "%" not in spec:
        return spec.lower().rstrip(".")
    if "%" in _MACRO.sub("", spec):
        raise SpfError("permerror", f"malformed macro in {spec!r}")
    local, _, sender_domain = sender.rpartition("@")
    if ip is None and re.search(r"%\{[ivIV]", spec):
        return None

    def one(match: re.Match[str]) -> str:
        fixed = {"%%": "%", "%_": " ", "%-": "%20"}
        if match[0] in fixed:
            return fixed[match[0]]
        letter = match[1].lower()
        if letter == "i":
            value = str(ip) if ip is None or ip.version == 4 else ".".join(ip.exploded.replace(":", ""))
        else:
            values = {"s": sender, "l": local or "postmaster", "o": sender_domain, "d": domain, "h": domain}
            values.update(p="unknown", v="in-addr" if ip is not None and ip.version == 4 else "ip6")
            value = values[letter]
        parts = re.split("[" + re.escape(match[4] or ".") + "]", value)
        if match[3]:
            parts.reverse()
        if match[2]:
            if int(match[2]) == 0:
                raise SpfError("permerror", f"malformed macro {match[0]}")
            parts = parts[-int(match[2]) :]
        return ".".join(parts)

    return _MACRO.sub(one, spec).lower().rstrip(".")


async def record_of(dns: Resolver, domain: str) -> str | None:
    """The domain's one SPF record (None: it has none); SpfError for two or more (permerror) or
    when DNS could not say (temperror)."""
    try:
        found = spf_records(await dns.answers(domain, "TXT"))
    except DnsTrouble as exc:
        raise SpfError("temperror", str(exc)) from None
    if len(found) > 1:
        reason = f"{domain} has {len(found)} v=spf1 records (RFC 7208 allows exactly one)"
        raise SpfError("permerror", reason, " | ".join(found))
    return found[0] if found else None


@dataclass
class Walk:
    """What :func:`walk` found: lookups counted, include/redirect targets reached (target → the
    path to it, e.g. ``include:_spf.example.com → include:spf.protection.outlook.com``) and the
    result for an address nothing matched (the record's ``all``, or its redirect's)."""

    lookups: int = 0
    reached: dict[str, str] = field(default_factory=dict)
    otherwise: str = "neutral"


async def walk(dns: Resolver, domain: str, sender: str) -> Walk:
    found = Walk()
    found.otherwise = await _walk(dns, domain, sender, found, ())
    return found


async def _walk(dns: Resolver, domain: str, sender: str, found: Walk, trail: tuple[str, ...]) -> str:
    record = await record_of(dns, domain)
    if record is None:
        if not trail:
            return "none"
        raise SpfError("permerror", f"{trail[-1]}: {domain} has no SPF record")
    terms = parse(record)
    for term in terms:
        if term.modifier:
            continue
        if term.name == "all":
            return RESULT_OF[term.qualifier]
        if term.name in LOOKUP_TERMS:
            found.lookups += 1
        target = expand(term.value, domain=domain, sender=sender, ip=None) if term.value else None
        if term.name == "include" and target is not None:
            path = (*trail, f"include:{target}")
            if term.qualifier == "+":
                found.reached.setdefault(target, " → ".join(path))
            if found.lookups <= WALK_CAP:
                await _walk(dns, target, sender, found, path)
    redirect = next((t.value for t in terms if t.modifier and t.name == "redirect"), None)
    if redirect is None:
        return "neutral"
    found.lookups += 1
    target = expand(redirect, domain=domain, sender=sender, ip=None)
    if target is None or found.lookups > WALK_CAP:
        return "neutral"
    path = (*trail, f"redirect={target}")
    found.reached.setdefault(target, " → ".join(path))
    return await _walk(dns, target, sender, found, path)


async def check_host(dns: Resolver, ip: IpAddress, domain: str, sender: str) -> str:
    """RFC 7208's result for mail from ``ip`` with MAIL FROM ``sender`` at ``domain``: pass, fail,
    softfail, neutral or none; SpfError for permerror and temperror."""
    return await _Check(dns, ip, sender).host(domain)


class _Check:
    """One evaluation: its lookup and void-lookup counts span every include and redirect."""

    def __init__(self, dns: Resolver, ip: IpAddress, sender: str) -> None:
        self.dns, self.ip, self.sender = dns, ip, sender
        self.lookups = self.void = 0

    def count(self) -> None:
        self.lookups += 1
        if self.lookups > MAX_LOOKUPS:
            raise SpfError("permerror", f"more than {MAX_LOOKUPS} DNS lookups")

    async def ask(self, name: str, rdtype: str) -> list[str]:
        try:
            found = await self.dns.answers(name, rdtype)
        except DnsTrouble as exc:
            raise SpfError("temperror", str(exc)) from None
        if not found:
            self.void += 1
            if self.void > MAX_VOID:
                raise SpfError("permerror", f"more than {MAX_VOID} lookups found nothing")
        return found

    async def host(self, domain: str) -> str:
        record = await record_of(self.dns, domain)
        if record is None:
            return "none"
        terms = parse(record)
        for term in terms:
            if not term.modifier and await self.matches(term, domain):
                return RESULT_OF[term.qualifier]
        redirect = next((t.value for t in terms if t.modifier and t.name == "redirect"), None)
        if redirect is None:
            return "neutral"
        self.count()
        target = expand(redirect, domain=domain, sender=self.sender, ip=self.ip) or ""
        result = await self.host(target)
        if result == "none":
            raise SpfError("permerror", f"redirect={target}: no SPF record there")
        return result

    async def matches(self, term: Term, domain: str) -> bool:
        if term.name == "all":
            return True
        if term.name in ("ip4", "ip6"):
            return self.ip in ipaddress.ip_network(term.value)
        self.count()
        spec = term.value or domain
        target = expand(spec, domain=domain, sender=self.sender, ip=self.ip) or ""
        if term.name == "include":
            result = await self.host(target)
            if result == "none":
                raise SpfError("permerror", f"include:{target}: no SPF record there")
            return result == "pass"
        if term.name == "exists":
            return bool(await self.ask(target, "A"))
        if term.name == "a":
            return self.within(await self.ask(target, self.family), term)
        if term.name == "mx":
            names = [mx.split(None, 1)[-1] for mx in await self.ask(target, "MX")]
            if len(names) > MAX_MX:
                raise SpfError("permerror", f"mx:{target}: more than {MAX_MX} MX names")
            for name in names:
                if name != "." and self.within(await self.dns_addresses(name), term):
                    return True
        return False  # mx without a match; ptr is never evaluated (RFC 7208 §5.5)

    @property
    def family(self) -> str:
        return "A" if self.ip.version == 4 else "AAAA"

    async def dns_addresses(self, name: str) -> list[str]:
        try:
            return await self.dns.answers(name, self.family)
        except DnsTrouble as exc:
            raise SpfError("temperror", str(exc)) from None

    def within(self, addresses: list[str], term: Term) -> bool:
        prefix = term.cidr4 if self.ip.version == 4 else term.cidr6
        for address in addresses:
            network = ipaddress.ip_network(
                f"{address}/{prefix if prefix is not None else self.ip.max_prefixlen}", strict=False
            )
            if self.ip in network:
                return True
        return False
