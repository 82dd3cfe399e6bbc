"""The ``postroom`` command as a user types it (a real subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from support.pki import Pki
from support.smtpd import SmtpServer

REPO = Path(__file__).resolve().parent.parent
POSTROOM = str(Path(sys.executable).with_name("postroom"))


def postroom(
    *args: str, cwd: Path = REPO, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [POSTROOM, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=60, check=False
    )


def test_accounts_check_passes_on_the_shipped_records() -> None:
    done = postroom("accounts", "check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "dev: ok" in done.stdout


def test_accounts_check_prints_file_line_field_reason_and_exits_1(tmp_path: Path) -> None:
    (tmp_path / "accounts").mkdir()
    (tmp_path / "accounts" / "orders.yaml").write_text(
        "description: Orders\nprovider: office365\nsmtp:\n  address: orders@example.com\n"
        "  password: ${X}\n  host: smtp.example.com\n  port: 99999\n"
    )
    (tmp_path / "accounts" / "good.yaml").write_text(
        "smtp: {address: g@example.com, host: h.example, auth: none}\n"
    )
    done = postroom("accounts", "check", cwd=tmp_path)
    assert done.returncode == 1
    assert "accounts/orders.yaml:7: smtp.port: Input should be less than or equal to 65535" in done.stdout
    assert "good: ok" in done.stdout
    as_json = json.loads(postroom("accounts", "check", "--json", cwd=tmp_path).stdout)
    assert as_json["ok"] is False
    assert as_json["accounts"]["good"] == {"ok": True, "problems": []}
    (problem,) = as_json["accounts"]["orders"]["problems"]
    assert problem["line"] == 7 and problem["field"] == "smtp.port"
    one = postroom("accounts", "check", "good", cwd=tmp_path)
    assert one.returncode == 0


def test_accounts_check_survives_a_20000_deep_record_and_a_billion_laughs(tmp_path: Path) -> None:
    accounts = tmp_path / "accounts"
    accounts.mkdir()
    (accounts / "good.yaml").write_text("smtp: {address: g@example.com, host: h.example, auth: none}\n")
    (accounts / "deep.yaml").write_text("description: " + "[" * 20_000 + "]" * 20_000 + "\n")
    laughs = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    laughs += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    (accounts / "laughs.yaml").write_text("\n".join(laughs) + "\n")
    done = postroom("accounts", "check", cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "accounts/deep.yaml:1: description: nested deeper than 64 levels" in done.stdout
    assert (
        "accounts/laughs.yaml:" in done.stdout and "more than 100000 values (aliases expanded)" in done.stdout
    )
    assert "good: ok" in done.stdout
    assert "Traceback" not in done.stderr


def test_accounts_list_json_never_shows_secrets(tmp_path: Path) -> None:
    (tmp_path / "accounts").mkdir()
    (tmp_path / "accounts" / "a.yaml").write_text(
        "smtp: {address: a@gmail.com, password: '${LIST_TEST_PW}'}\n"
    )
    done = postroom("accounts", "list", "--json", cwd=tmp_path, env={"LIST_TEST_PW": "do-not-print-me"})
    assert done.returncode == 0
    (row,) = json.loads(done.stdout)
    assert row["name"] == "a" and row["provider"] == "gmail" and row["host"] == "smtp.gmail.com"
    assert row["security"] == "SMTP (Connect using STARTTLS)"
    assert "do-not-print-me" not in done.stdout + done.stderr


def test_test_connectivity_reports_what_was_negotiated(
    tmp_path: Path, pki: Pki, smtp_server: Callable[..., SmtpServer]
) -> None:
    server = smtp_server(mode="starttls", auth_required=True)
    (tmp_path / "accounts").mkdir()
    (tmp_path / "config" / "keystores").mkdir(parents=True)
    (tmp_path / "config" / "keystores" / "ca.yaml").write_text(f"type: pem\ncertificates: {pki.ca_cert}\n")
    (tmp_path / "accounts" / "a.yaml").write_text(
        f"smtp:\n  address: user@example.com\n  host: 127.0.0.1\n  port: {server.port}\n"
        "  password: ${CONN_PW}\n  truststore: ca\n"
    )
    env = {"CONN_PW": "s3cret-pass"}
    done = postroom("test-connectivity", "a", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "SMTP (Connect using STARTTLS)"
    assert any(line.startswith("  TLS version: TLSv1.") for line in lines)
    assert any(line.startswith("  cipher: ") for line in lines)
    assert "  server certificate: commonName=localhost" in lines
    assert "  AUTH mechanisms offered: PLAIN LOGIN" in lines
    assert "  login: succeeded" in lines
    assert lines[-1] == "OK"
    assert server.received == [] and "MAIL" not in server.commands
    assert server.commands[-2:] == ["NOOP", "QUIT"]

    report = json.loads(postroom("test-connectivity", "a", "--json", cwd=tmp_path, env=env).stdout)
    assert report["ok"] is True and report["result"] == "SMTP (Connect using STARTTLS)"
    assert report["detail"]["auth_mechanism"] == "PLAIN"
    assert report["detail"]["certificate_expires"]
    assert "s3cret-pass" not in json.dumps(report)

    bad = postroom("test-connectivity", "a", cwd=tmp_path, env={"CONN_PW": "wrong"})
    assert bad.returncode == 1
    assert bad.stdout.splitlines()[0] == "SMTP (Connect using STARTTLS)"
    assert "FAILED: [a] AUTH PLAIN refused (server said: 535 5.7.8" in bad.stdout
    assert "wrong" not in bad.stdout.replace("FAILED", "")


@pytest.mark.parametrize(
    ("mode", "fields", "line"),
    [
        ("plain", "  secure: false\n  auth: none\n", "SMTP (Connect using default)"),
        ("smtps", "  protocol: smtps\n  auth: none\n  truststore: ca\n", "SMTP (Connect using SMTPS)"),
    ],
)
def test_test_connectivity_result_lines(
    tmp_path: Path, pki: Pki, smtp_server: Callable[..., SmtpServer], mode: str, fields: str, line: str
) -> None:
    server = smtp_server(mode=mode)
    (tmp_path / "accounts").mkdir()
    (tmp_path / "config" / "keystores").mkdir(parents=True)
    (tmp_path / "config" / "keystores" / "ca.yaml").write_text(f"type: pem\ncertificates: {pki.ca_cert}\n")
    (tmp_path / "accounts" / "a.yaml").write_text(
        f"smtp:\n  address: user@example.com\n  host: 127.0.0.1\n  port: {server.port}\n{fields}"
    )
    done = postroom("test-connectivity", "a", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[0] == line
    assert "  login: not configured" in done.stdout.splitlines()


def test_test_connectivity_on_an_unknown_account_fails_clearly(tmp_path: Path) -> None:
    done = postroom("test-connectivity", "nope", cwd=tmp_path)
    assert done.returncode == 1
    assert "unknown account 'nope'" in done.stdout
