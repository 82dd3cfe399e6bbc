"""``postroom accounts …``, ``test-connectivity`` and ``api-keys``: the records' commands."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import click

from worker.cli.common import emit_json, health_of, open_producer, problem_dict, resolve_hosts
from worker.errors import RecordProblem
from worker.ops.connectivity import check_connectivity
from worker.records.loader import Records


@click.group()
def accounts() -> None:
    """List and validate email account records."""


@accounts.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def accounts_list(as_json: bool) -> None:
    """Every account record, with its provider, transport and security."""
    records = Records.load()
    rows: list[dict[str, Any]] = []
    for name in records.account_names:
        if name in records.accounts:
            rows.append({**records.accounts[name].summary(), "valid": True, "problems": []})
        else:
            problems = records.account_problems[name]
            rows.append({"name": name, "valid": False, "problems": [str(p) for p in problems]})
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo(f"no account records in {records.accounts_dir}/")
        return
    for row in rows:
        if not row["valid"]:
            count = len(row["problems"])
            click.echo(f"{row['name']:<16} INVALID ({count} problem(s); run `postroom accounts check`)")
            continue
        where = f"{row.get('host')}:{row.get('port')}" if row["send_using"] == "smtp" else row.get("base_url")
        security = row.get("security", "Microsoft Graph")
        click.echo(f"{row['name']:<16} {row['provider']:<10} {row['address']:<32} {where}  {security}")


@accounts.command("check")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def accounts_check(name: str | None, as_json: bool) -> None:
    """Validate records and everything they reference; exit 1 on any problem (warnings, such as
    a signing certificate that expires within 30 days, are printed but do not fail)."""
    records = Records.load()
    if name is not None and name not in records.account_names:
        known = ", ".join(records.account_names) or "none"
        click.echo(f"unknown account {name!r} (known accounts: {known})", err=True)
        sys.exit(1)
    results = records.check([name] if name else None)
    hooks = (
        records.check_webhooks(
            resolve_hosts(h for hook in records.webhooks.values() if (h := hook.host_name()))
        )
        if name is None
        else {}
    )
    others: list[RecordProblem] = []
    if name is None:  # unreferenced broken profiles/keystores are problems too
        for problems in (*records.profile_problems.values(), *records.keystore_problems.values()):
            others += problems
        referenced = {str(p) for ps in results.values() for p in ps}
        others = [p for p in others if str(p) not in referenced]

    def errors(problems: list[RecordProblem]) -> list[RecordProblem]:  # warnings do not fail the check
        return [p for p in problems if p.severity == "error"]

    ok = not errors(others) and all(not errors(ps) for ps in (*results.values(), *hooks.values()))
    if as_json:
        emit_json(
            {
                "ok": ok,
                "accounts": {
                    n: {"ok": not errors(ps), "problems": [problem_dict(p) for p in ps]}
                    for n, ps in results.items()
                },
                "other_records": [problem_dict(p) for p in others],
                "webhooks": {
                    n: {"ok": not errors(ps), "problems": [problem_dict(p) for p in ps]}
                    for n, ps in hooks.items()
                },
            }
        )
    else:
        for account_name, problems in results.items():
            if not errors(problems):
                click.echo(f"{account_name}: ok")
            for problem in problems:
                click.echo(str(problem))
        for problem in others:
            click.echo(str(problem))
        for hook_name, problems in hooks.items():
            if not errors(problems):
                click.echo(f"webhook {hook_name}: ok")
            for problem in problems:
                click.echo(str(problem))
        if not results and not others:
            click.echo(f"no account records in {records.accounts_dir}/")
    sys.exit(0 if ok else 1)


@click.command("test-connectivity")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def test_connectivity(name: str, as_json: bool) -> None:
    """Connect, secure and log in as account NAME (nothing is sent); exit 1 on failure. The
    sender domain's DNS (MX, SPF, DKIM, DMARC) is shown too, as advice: it never fails the check."""
    from worker.ops.preflight import Preflight
    from worker.settings import load_settings

    records = Records.load()
    preflight = Preflight(load_settings().dns_resolver)
    report = asyncio.run(check_connectivity(records, name, preflight=preflight))
    if name in records.account_names:
        _store_check(report)
    if as_json:
        emit_json(report.as_dict())
    else:
        click.echo(report.result)
        labels = {
            "host": "host",
            "port": "port",
            "tls_version": "TLS version",
            "cipher": "cipher",
            "certificate_subject": "server certificate",
            "certificate_expires": "certificate expires",
            "auth_mechanisms_offered": "AUTH mechanisms offered",
            "auth_mechanism": "AUTH mechanism used",
            "login": "login",
            # Graph (and the OAuth part of SMTP XOAUTH2 accounts, under "oauth")
            "base_url": "Graph",
            "mailbox": "mailbox",
            "auth_profile": "auth profile",
            "grant": "grant",
            "tenant": "tenant",
            "client_id": "client id",
            "credential": "credential",
            "service_account": "service account",
            "subject": "subject",
            "token": "token",
            "token_expires": "token expires",
            "send_endpoint": "send endpoint",
            "security": "security",
            "duration_ms": "duration (ms)",
        }
        detail = {**report.detail.get("oauth", {}), **report.detail}
        for key, label in labels.items():
            value = detail.get(key)
            if value is None or value == []:
                continue
            if isinstance(value, list):
                value = " ".join(value)
            click.echo(f"  {label}: {value}")
        smime, dkim = report.detail.get("signing"), report.detail.get("dkim")
        if smime and "subject" in smime:
            click.echo(
                f"  signing certificate: {smime['subject']} "
                f"(expires {smime['expires'][:10]}, {smime['days_left']} days left)"
            )
        if dkim and "selector" in dkim:
            click.echo(f"  dkim: d={dkim['domain']} s={dkim['selector']} ({dkim['algorithm']})")
        for warning in report.detail.get("warnings", []):
            click.echo(f"  warning: {warning}")
        _print_deliverability(report.detail.get("deliverability"))
        click.echo("OK" if report.ok else f"FAILED: {report.error}")
    sys.exit(0 if report.ok else 1)


def _print_deliverability(found: dict[str, Any] | None) -> None:
    """The preflight's four lines under a heading naming the domain and the resolver."""
    from worker.ops.preflight import text_lines

    if not found:
        return
    if "error" in found:
        click.echo(f"  deliverability: {found['error']}")
        return
    click.echo(
        f"  deliverability of {found['domain']} (DNS via {found['resolver']}; advice, never a failure):"
    )
    for line in text_lines(found):
        click.echo(f"  {line}")


def _store_check(report: Any) -> None:
    """The result is stored like a scheduled check's (shown by `postroom health`); no Redis, no store."""
    import redis as redis_lib

    try:
        producer = open_producer()
    except Exception:
        return
    try:
        health_of(producer).record_check(report.as_dict())
    except redis_lib.RedisError:
        pass
    finally:
        producer.close()


@click.group("api-keys")
def api_keys() -> None:
    """Producer keys of the HTTP submission API (config/api-keys/NAME.yaml, or in
    POSTROOM_API_KEYS_DIR)."""


@api_keys.command("new")
@click.argument("name")
@click.option("--account", "accounts", multiple=True, help="An account it may send from ('*': all).")
@click.option("--operator", is_flag=True, help="An operator key: it logs in to the dashboard (/dashboard).")
@click.option("--rate", default="60/minute", show_default=True, help="Requests per second, minute or hour.")
def api_keys_new(name: str, accounts: tuple[str, ...], operator: bool, rate: str) -> None:
    """Write a key record (hash only) and print the key, once. A producer key needs --account;
    an --operator key opens the operator dashboard (and sends from the --account given, if any)."""
    from worker.settings import api_keys_dir, config_dir
    from worker.web import apikeys

    if not accounts and not operator:
        raise click.UsageError("give --account (a producer key) or --operator (an operator key)")
    folder = api_keys_dir()
    path = folder / f"{name}.yaml"
    if path.exists():
        raise click.ClickException(f"{path} exists; remove it first to replace the key")
    token = apikeys.new_token(name)
    folder.mkdir(parents=True, exist_ok=True)
    listed = ", ".join(json.dumps(a) for a in accounts)
    record = f"hash: {apikeys.hash_token(token)}\naccounts: [{listed}]\nrate: {json.dumps(rate)}\n"
    path.write_text(record + ("operator: true\n" if operator else ""))
    _, problems = apikeys.load_api_keys(config_dir())
    if name in problems:
        path.unlink()
        raise click.ClickException("\n".join(str(p) for p in problems[name]))
    click.echo(f"wrote {path}; the key (shown only now):", err=True)
    click.echo(token)


@accounts.command("pause")
@click.argument("name")
@click.option("--reason", default="paused by an operator", show_default=True)
def accounts_pause(name: str, reason: str) -> None:
    """Hold NAME's jobs (nothing is sent, nothing is dead-lettered) until `accounts resume`."""
    producer = open_producer()
    try:
        if name not in producer.records(fresh=True).account_names:
            click.echo(f"no account {name}", err=True)
            sys.exit(1)
        health_of(producer).pause(name, reason, by="operator")
        click.echo(f"{name}: paused")
    finally:
        producer.close()


@accounts.command("resume")
@click.argument("name")
def accounts_resume(name: str) -> None:
    """Lift a pause and put NAME's held jobs back on the queue."""
    producer = open_producer()
    try:
        released = health_of(producer).resume(name, by="operator")
        click.echo(f"{name}: resumed, {released} held job(s) back on the queue")
    finally:
        producer.close()
