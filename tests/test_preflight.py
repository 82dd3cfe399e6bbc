"""The deliverability preflight (worker/ops/preflight.py, contract §11) against a real
authoritative DNS server (tests/support/dnsserver.py): every answer went over UDP (or TCP,
when too long) as a resolver would get it. Unit-level checks build a Sender and ask the server;
the end-to-end ones run ``postroom test-connectivity`` on an aiosmtpd account at a served
domain, and the health check's cache in a real Redis.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from support.dnsserver import DnsServer, Record, Zones, silent_resolver
from support.queue import QueueEnv, cli, unique
from support.smtpd import SmtpServer
from worker.ops.preflight import DkimKey, Preflight, Sender, deliverability, summary, text_lines
from worker.ops.resolver import DnspythonResolver
from worker.ops.spf import SpfError, expand, parse
from worker.records.loader import Records

DOMAIN = "shop.test"
RELAY_IP = "192.0.2.10"


def public_key(key: rsa.RSAPrivateKey) -> str:
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def server() -> Iterator[DnsServer]:
    made = DnsServer()
    yield made
    made.stop()


def good_zone(key: rsa.RSAPrivateKey, **replace: list[Record]) -> list[Record]:
    """shop.test as it should be: MX, SPF naming the relay through an include, the DKIM key,
    DMARC p=reject. ``replace={"spf": [...]}`` swaps one part (``[]`` removes it)."""
    parts: dict[str, list[Record]] = {
        "mx": [("@", "MX", "10 mx.shop.test"), ("@", "MX", "20 mx2.shop.test"), ("mx", "A", "192.0.2.25")],
        "spf": [
            ("@", "TXT", "v=spf1 include:_spf.shop.test -all"),
            ("_spf", "TXT", "v=spf1 a:relay.shop.test -all"),
        ],
        "other_txt": [("@", "TXT", "site-verification=abc123")],
        "relay": [("relay", "A", RELAY_IP)],
        "dkim": [("s1._domainkey", "TXT", f"v=DKIM1; k=rsa; p={public_key(key)}")],
        "dmarc": [("_dmarc", "TXT", "v=DMARC1; p=reject; rua=mailto:d@shop.test")],
    }
    parts.update(replace)
    return [record for records in parts.values() for record in records]


def sender(key: rsa.RSAPrivateKey | None, **fields: Any) -> Sender:
    dkim = DkimKey(DOMAIN, "s1", public_key(key)) if key is not None else None
    made: dict[str, Any] = {
        "domain": DOMAIN,
        "envelope": f"orders@{DOMAIN}",
        "relay": f"relay.{DOMAIN}",
        "includes": (),
        "provider": "other",
        "dkim": dkim,
        **fields,
    }
    return Sender(**made)


def check(server: DnsServer, zones: Zones, who: Sender, timeout: float = 2.0) -> dict[str, Any]:
    server.serve(zones)
    dns = DnspythonResolver(("127.0.0.1", server.port), timeout=timeout)
    report, _ = asyncio.run(deliverability(who, dns))
    return report


def results(report: dict[str, Any]) -> dict[str, str]:
    return {name: report[name]["result"] for name in ("mx", "spf", "dkim", "dmarc")}


def test_a_good_domain_passes_all_four_and_shows_each_record(
    server: DnsServer, key: rsa.RSAPrivateKey
) -> None:
    report = check(server, {DOMAIN: good_zone(key)}, sender(key))
    assert results(report) == {"mx": "pass", "spf": "pass", "dkim": "pass", "dmarc": "pass"}
    assert report["domain"] == DOMAIN and report["resolver"] == server.address
    assert report["mx"]["record"] == "10 mx.shop.test, 20 mx2.shop.test"
    assert report["spf"]["record"] == "v=spf1 include:_spf.shop.test -all"
    assert (
        report["spf"]["reason"] == f"authorises the relay relay.shop.test ({RELAY_IP}) (2 of 10 DNS lookups)"
    )
    assert report["dkim"]["record"] == f"v=DKIM1; k=rsa; p={public_key(key)}"
    assert report["dmarc"]["record"] == "v=DMARC1; p=reject; rua=mailto:d@shop.test"
    assert report["dmarc"]["reason"] == "p=reject; aligned through SPF and DKIM"
    lines = text_lines(report)
    assert (
        lines[0]
        == "MX: pass  10 mx.shop.test, 20 mx2.shop.test  shop.test takes mail: bounces and replies come back"
    )
    assert lines[2].startswith(f"DKIM: pass  v=DKIM1; k=rsa; p={public_key(key)[:12]}…  s1._domainkey")
    assert summary(report) is None


@pytest.mark.parametrize(
    ("mx", "result", "record", "reason"),
    [
        ([("@", "A", "192.0.2.80")], "warn", "192.0.2.80", "no MX record: mail to shop.test falls back"),
        ([], "fail", None, "no MX and no A/AAAA record: bounces and replies to shop.test cannot come back"),
        ([("@", "MX", "0 .")], "fail", "0 .", "null MX (RFC 7505)"),
    ],
)
def test_mx_missing(
    server: DnsServer, key: rsa.RSAPrivateKey, mx: list[Record], result: str, record: str | None, reason: str
) -> None:
    report = check(server, {DOMAIN: good_zone(key, mx=mx)}, sender(key))
    assert report["mx"]["result"] == result and report["mx"]["record"] == record
    assert reason in report["mx"]["reason"]
    assert summary(report) == f"DNS: MX {result}"


def test_no_spf_fails_but_dkim_still_carries_dmarc(server: DnsServer, key: rsa.RSAPrivateKey) -> None:
    report = check(server, {DOMAIN: good_zone(key, spf=[])}, sender(key))
    assert report["spf"] == {
        "result": "fail",
        "record": None,
        "reason": "shop.test has no v=spf1 TXT record: no server is authorised to send",
    }
    assert report["dmarc"]["result"] == "pass" and report["dmarc"]["reason"].endswith("aligned through DKIM")
    assert text_lines(report)[1].startswith("SPF: fail  (none)  shop.test has no v=spf1")


def test_two_spf_records_are_a_permerror(server: DnsServer, key: rsa.RSAPrivateKey) -> None:
    two = [("@", "TXT", "v=spf1 a:relay.shop.test -all"), ("@", "TXT", "v=spf1 include:_spf.other.test ~all")]
    report = check(server, {DOMAIN: good_zone(key, spf=two)}, sender(key))
    assert report["spf"]["result"] == "fail"
    assert (
        report["spf"]["reason"] == "permerror: shop.test has 2 v=spf1 records (RFC 7208 allows exactly one)"
    )
    assert set(report["spf"]["record"].split(" | ")) == {two[0][2], two[1][2]}


@pytest.mark.parametrize(
    ("ending", "result", "says"),
    [("-all", "fail", "-all: receivers may refuse the mail"), ("~all", "warn", "~all: softfail")],
)
def test_spf_that_does_not_authorise_the_relay(
    server: DnsServer, key: rsa.RSAPrivateKey, ending: str, result: str, says: str
) -> None:
    record = f"v=spf1 ip4:198.51.100.0/24 {ending}"
    report = check(server, {DOMAIN: good_zone(key, spf=[("@", "TXT", record)])}, sender(None))
    assert report["spf"]["result"] == result and report["spf"]["record"] == record
    assert report["spf"]["reason"] == f"the relay relay.shop.test ({RELAY_IP}) is not authorised: {says}" + (
        ", and SPF cannot align for DMARC" if ending == "~all" else ""
    )
    assert report["dkim"]["result"] == "warn"  # no key in the record
    assert "may sign with its own domain, which does not align" in report["dkim"]["reason"]
    assert report["dmarc"]["result"] == "fail"
    assert report["dmarc"]["reason"] == "p=reject; neither SPF nor DKIM passes aligned with shop.test"


def test_the_relay_must_be_authorised_on_each_of_its_addresses(
    server: DnsServer, key: rsa.RSAPrivateKey
) -> None:
    relay = [("relay", "A", RELAY_IP), ("relay", "AAAA", "2001:db8::10")]
    zone = good_zone(key, relay=relay, spf=[("@", "TXT", f"v=spf1 ip4:{RELAY_IP} -all")])
    report = check(server, {DOMAIN: zone}, sender(key))
    assert report["spf"]["result"] == "fail"
    assert report["spf"]["reason"].startswith("the relay relay.shop.test (2001:db8::10) is not authorised")


def test_spf_through_nested_includes_redirect_and_macros(server: DnsServer, key: rsa.RSAPrivateKey) -> None:
    nested = [
        ("@", "TXT", "v=spf1 include:a.shop.test -all"),
        ("a", "TXT", "v=spf1 ip4:198.51.100.1 include:b.shop.test ?all"),
        ("b", "TXT", "v=spf1 mx:relays.other.test/24 -all"),
    ]
    other = [("relays", "MX", "5 out.other.test"), ("out", "A", "192.0.2.1")]
    report = check(server, {DOMAIN: good_zone(key, spf=nested), "other.test": other}, sender(key))
    assert report["spf"]["result"] == "pass", report["spf"]
    assert report["spf"]["reason"].endswith("(3 of 10 DNS lookups)")

    redirect = [("@", "TXT", "v=spf1 redirect=_spf.other.test")]
    macros = [
        ("_spf", "TXT", "v=spf1 exists:%{ir}.%{v}._ok.%{d} -all"),
        ("10.2.0.192.in-addr._ok._spf", "A", "127.0.0.2"),
    ]
    report = check(server, {DOMAIN: good_zone(key, spf=redirect), "other.test": macros}, sender(key))
    assert report["spf"]["result"] == "pass", report["spf"]
    assert report["spf"]["record"] == "v=spf1 redirect=_spf.other.test"


def test_more_than_ten_lookups_is_a_permerror(server: DnsServer, key: rsa.RSAPrivateKey) -> None:
    chain = [("@", "TXT", "v=spf1 " + " ".join(f"include:i{n}.shop.test" for n in range(6)) + " -all")]
    chain += [(f"i{n}", "TXT", f"v=spf1 a:relay.shop.test mx:i{n}.shop.test -all") for n in range(6)]
    report = check(server, {DOMAIN: good_zone(key, spf=chain)}, sender(key))
    assert report["spf"]["result"] == "fail" and report["spf"]["record"] == chain[0][2]
    assert report["spf"]["reason"].startswith("permerror: 18 DNS lookups")
    assert "RFC 7208 allows 10" in report["spf"]["reason"]


def test_a_broken_spf_record_is_a_permerror(server: DnsServer, key: rsa.RSAPrivateKey) -> None:
    record = "v=spf1 a:relay incude:typo.example -all"
    report = check(server, {DOMAIN: good_zone(key, spf=[("@", "TXT", record)])}, sender(key))
    assert report["spf"] == {
        "result": "fail",
        "record": record,
        "reason": "permerror: unknown mechanism 'incude:typo.example'",
    }


def provider_zones(key: rsa.RSAPrivateKey, top: str) -> Zones:
    return {
        DOMAIN: good_zone(
            key, spf=[("@", "TXT", top), ("_spf", "TXT", "v=spf1 include:spf.protection.outlook.com -all")]
        ),
        "spf.protection.outlook.com": [("@", "TXT", "v=spf1 ip4:40.92.0.0/15 -all")],
    }


def test_a_provider_relay_needs_its_include_directly_or_nested(
    server: DnsServer, key: rsa.RSAPrivateKey
) -> None:
    office = sender(
        key, relay="smtp.office365.com", includes=("spf.protection.outlook.com",), provider="office365"
    )
    report = check(server, provider_zones(key, "v=spf1 include:_spf.shop.test -all"), office)
    assert report["spf"]["result"] == "pass"
    assert report["spf"]["reason"] == (
        "reaches include:_spf.shop.test → include:spf.protection.outlook.com (2 of 10 DNS lookups)"
    )
    graph = sender(key, relay=None, includes=("spf.protection.outlook.com",), provider="graph")
    report = check(server, provider_zones(key, "v=spf1 ip4:192.0.2.0/24 ~all"), graph)
    assert report["spf"]["result"] == "warn"
    assert report["spf"]["reason"].startswith(
        "does not reach include:spf.protection.outlook.com: "
        "Microsoft 365 (Graph)'s servers are not authorised"
    )
    gmail = sender(key, relay="smtp.gmail.com", includes=("_spf.google.com",), provider="gmail")
    report = check(server, provider_zones(key, "v=spf1 include:_spf.shop.test -all"), gmail)
    assert report["spf"]["result"] == "fail" and "-all: receivers may refuse" in report["spf"]["reason"]


def test_dkim_missing_or_another_key(server: DnsServer, key: rsa.RSAPrivateKey) -> None:
    report = check(server, {DOMAIN: good_zone(key, dkim=[])}, sender(key))
    assert report["dkim"] == {
        "result": "fail",
        "record": None,
        "reason": "no DKIM key record at s1._domainkey.shop.test: receivers cannot verify the signature",
    }
    assert report["dmarc"]["reason"].endswith("aligned through SPF")  # SPF still carries DMARC

    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    mismatch = [("s1._domainkey", "TXT", f"v=DKIM1; p={public_key(other)}")]
    report = check(server, {DOMAIN: good_zone(key, dkim=mismatch)}, sender(key))
    assert report["dkim"]["result"] == "fail" and report["dkim"]["record"] == mismatch[0][2]
    assert (
        report["dkim"]["reason"]
        == "p= at s1._domainkey.shop.test is not the public key of the configured DKIM key"
    )


def test_dkim_through_a_cname_with_a_pkcs1_key(server: DnsServer, key: rsa.RSAPrivateKey) -> None:
    """Providers publish the selector as a CNAME to their own zone; some keys are bare RSAPublicKey."""
    pkcs1 = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    zones = {
        DOMAIN: good_zone(key, dkim=[("s1._domainkey", "CNAME", "s1.keys.other.test.")]),
        "other.test": [("s1.keys", "TXT", "v=DKIM1; k=rsa; p=" + base64.b64encode(pkcs1).decode())],
    }
    assert check(server, zones, sender(key))["dkim"]["result"] == "pass"


def test_dmarc_missing_unaligned_none_and_the_organisational_fallback(
    server: DnsServer, key: rsa.RSAPrivateKey
) -> None:
    report = check(server, {DOMAIN: good_zone(key, dmarc=[])}, sender(key))
    assert report["dmarc"] == {
        "result": "fail",
        "record": None,
        "reason": "no DMARC record at _dmarc.shop.test: "
        "Gmail, Yahoo and Microsoft require DMARC of bulk senders",
    }
    off_domain = sender(
        key, envelope="bounce@elsewhere.test", dkim=DkimKey("elsewhere.test", "s1", public_key(key))
    )
    zones = {
        DOMAIN: good_zone(key),
        "elsewhere.test": good_zone(key, mx=[], spf=[("@", "TXT", f"v=spf1 ip4:{RELAY_IP} -all")], dmarc=[]),
    }
    report = check(server, zones, off_domain)
    assert report["spf"]["result"] == "pass" and report["dkim"]["result"] == "pass"
    assert report["dmarc"]["result"] == "fail"
    assert report["dmarc"]["reason"] == "p=reject; neither SPF nor DKIM passes aligned with shop.test"

    none = [("_dmarc", "TXT", "v=DMARC1; p=none")]
    report = check(server, {DOMAIN: good_zone(key, dmarc=none)}, sender(key))
    assert report["dmarc"]["result"] == "pass" and "p=none only asks for reports" in report["dmarc"]["reason"]

    sub = sender(key, domain=f"mail.{DOMAIN}", envelope=f"orders@mail.{DOMAIN}")
    zone = [
        *good_zone(key),
        ("mail", "MX", "10 mx.shop.test"),
        ("mail", "TXT", f"v=spf1 ip4:{RELAY_IP} -all"),
    ]
    report = check(server, {DOMAIN: zone}, sub)
    assert report["dmarc"]["result"] == "pass", report["dmarc"]
    assert "the organisational domain's, shop.test, by the last-two-labels rule" in report["dmarc"]["reason"]


def test_a_silent_resolver_gives_warn_lines_within_a_few_seconds(key: rsa.RSAPrivateKey) -> None:
    with silent_resolver() as address:
        host, port = address.split(":")
        started = time.monotonic()
        report, settled = asyncio.run(
            deliverability(sender(key), DnspythonResolver((host, int(port)), timeout=1.0))
        )
        took = time.monotonic() - started
    assert took < 3.0
    assert not settled
    for name in ("mx", "spf", "dkim", "dmarc"):
        assert report[name] == {
            "result": "warn",
            "record": None,
            "reason": f"no verdict: {address} did not answer within 1s",
        }
    assert summary(report) == "DNS: MX warn, SPF warn, DKIM warn, DMARC warn"


def test_spf_terms_and_macros() -> None:
    terms = parse(
        "v=spf1 +a/24//64 mx:mail.example.com/28 ip6:2001:db8::/32 ~include:x.example redirect=y.example"
    )
    assert [(t.qualifier, t.name, t.value, t.cidr4, t.cidr6) for t in terms] == [
        ("+", "a", "", 24, 64),
        ("+", "mx", "mail.example.com", 28, None),
        ("+", "ip6", "2001:db8::/32", None, None),
        ("~", "include", "x.example", None, None),
        ("+", "redirect", "y.example", None, None),
    ]
    for broken in (
        "v=spf1 ip4:300.1.1.1",
        "v=spf1 a/33",
        "v=spf1 include:",
        "v=spf1 all:x",
        "v=spf1 ip4:2001:db8::/32",
    ):
        with pytest.raises(SpfError) as caught:
            parse(broken)
        assert caught.value.kind == "permerror"
    ip = ipaddress.ip_address("192.0.2.3")
    assert expand("%{ir}.%{v}.%{l1r-}.%{d2}", domain="a.b.example", sender="first-last@s.example", ip=ip) == (
        "3.2.0.192.in-addr.first.b.example"
    )
    assert expand("%{i}._spf.%{d}", domain="example.com", sender="x@example.com", ip=None) is None


# ---- through the command and the health check's cache ---------------------------------------


def shop_zone(key: rsa.RSAPrivateKey) -> Zones:
    """shop.test for an account on the tests' aiosmtpd server at 127.0.0.1."""
    return {DOMAIN: good_zone(key, spf=[("@", "TXT", "v=spf1 ip4:127.0.0.1 -all")])}


def shop_account(env: QueueEnv, server: SmtpServer, key: rsa.RSAPrivateKey, folder: Path) -> str:
    key_file = folder / unique("dkim-")
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    name = env.account(unique("shop"), server, address=f"orders@{DOMAIN}")
    with (env.accounts / f"{name}.yaml").open("a") as record:
        record.write(f"dkim:\n  domain: {DOMAIN}\n  selector: s1\n  private_key: {{file: {key_file}}}\n")
    return name


def test_test_connectivity_prints_the_four_lines_and_they_never_change_ok(
    queue_env: QueueEnv,
    smtp_server: Callable[..., SmtpServer],
    server: DnsServer,
    key: rsa.RSAPrivateKey,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("POSTROOM_DNS_RESOLVER", server.address)
    server.serve(shop_zone(key))
    name = shop_account(queue_env, smtp_server(mode="plain"), key, tmp_path)

    as_json = cli(queue_env, "test-connectivity", name, "--json")
    assert as_json.returncode == 0, as_json.stdout + as_json.stderr
    report = json.loads(as_json.stdout)
    assert report["ok"] is True
    found = report["detail"]["deliverability"]
    assert set(found) == {"domain", "resolver", "checked_at", "mx", "spf", "dkim", "dmarc"}
    assert (found["domain"], found["resolver"]) == (DOMAIN, server.address)
    assert {n: found[n]["result"] for n in ("mx", "spf", "dkim", "dmarc")} == dict.fromkeys(
        ("mx", "spf", "dkim", "dmarc"), "pass"
    )
    assert found["spf"] == {
        "result": "pass",
        "record": "v=spf1 ip4:127.0.0.1 -all",
        "reason": "authorises the relay 127.0.0.1 (0 of 10 DNS lookups)",
    }

    text = cli(queue_env, "test-connectivity", name)
    assert text.returncode == 0, text.stdout + text.stderr
    lines = text.stdout.splitlines()
    at = lines.index(f"  deliverability of {DOMAIN} (DNS via {server.address}; advice, never a failure):")
    mx = "10 mx.shop.test, 20 mx2.shop.test"
    assert lines[at + 1] == f"  MX: pass  {mx}  shop.test takes mail: bounces and replies come back"
    assert (
        lines[at + 2]
        == "  SPF: pass  v=spf1 ip4:127.0.0.1 -all  authorises the relay 127.0.0.1 (0 of 10 DNS lookups)"
    )
    assert lines[at + 3].startswith(
        "  DKIM: pass  v=DKIM1; k=rsa; p=MIIBIjANBgkq…  s1._domainkey.shop.test publishes"
    )
    assert (
        lines[at + 4]
        == "  DMARC: pass  v=DMARC1; p=reject; rua=mailto:d@shop.test  p=reject; aligned through SPF and DKIM"
    )
    assert lines[-1] == "OK"

    server.serve({})  # the domain gone from DNS: four failures, and the account is still fine
    broken = cli(queue_env, "test-connectivity", name)
    assert broken.returncode == 0 and broken.stdout.splitlines()[-1] == "OK"
    assert "  SPF: warn  (none)  no verdict: " in broken.stdout  # refused: the server serves no zone now


def test_the_health_check_keeps_a_domain_s_lines_an_hour(
    own_queue: QueueEnv, server: DnsServer, key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    server.serve(shop_zone(key))
    (own_queue.accounts / "shop.yaml").write_text(
        f"provider: other\nsmtp: {{address: orders@{DOMAIN}, host: 127.0.0.1, port: 2525, auth: none, "
        "secure: false}\n"
    )
    account = Records.load(own_queue.accounts, own_queue.config).account("shop")
    records = Records.load(own_queue.accounts, own_queue.config)
    preflight = Preflight(server.address, cache=own_queue.redis)
    first = asyncio.run(preflight.report(account, records))
    asked = len(server.queries)
    assert asked > 0 and first["dkim"]["result"] == "warn"
    again = asyncio.run(preflight.report(account, records))
    assert again == first and len(server.queries) == asked  # kept: DNS not asked again
    (key_name,) = own_queue.redis.keys("postroom:preflight:shop.test:*")
    assert 3500 < own_queue.redis.ttl(key_name) <= 3600
    fresh = asyncio.run(Preflight(server.address).report(account, records))  # test-connectivity's: no cache
    assert len(server.queries) > asked and fresh["checked_at"] > first["checked_at"]

    own_queue.redis.delete(key_name)
    with silent_resolver() as address:  # no verdict is never kept
        silent = asyncio.run(Preflight(address, cache=own_queue.redis, timeout=0.5).report(account, records))
    assert silent["mx"]["result"] == "warn" and own_queue.redis.keys("postroom:preflight:*") == []
