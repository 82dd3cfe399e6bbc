"""Account, keystore and auth-profile records: presets, validation, file:line errors."""

from __future__ import annotations

import os
import shutil
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support.pki import Pki
from worker.errors import ConfigurationError, RecordError
from worker.records.account.account import EmailAccount
from worker.records.loader import Records
from worker.records.secrets import Secret

REPO = Path(__file__).resolve().parent.parent


class RecordTree:
    """accounts/ and config/ folders in a temporary working directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.accounts = root / "accounts"
        self.config = root / "config"
        for d in (self.accounts, self.config / "auth-profiles", self.config / "keystores"):
            d.mkdir(parents=True, exist_ok=True)

    def write(self, relative: str, text: str) -> Path:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return path

    def account(self, name: str, text: str) -> Path:
        return self.write(f"accounts/{name}.yaml", text)

    def load(self) -> Records:
        return Records.load(Path("accounts"), Path("config"))


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RecordTree]:
    monkeypatch.chdir(tmp_path)
    yield RecordTree(tmp_path)


def advanced_account(tree: RecordTree, login: str, advanced: str) -> Records:
    """``accounts/a.yaml``: an SMTP account (``login``: its auth or password line) whose
    ``advanced:`` is the given YAML (inline, or block lines at line 6 on), and the records loaded."""
    block = (
        advanced
        if advanced.startswith(" {")
        else "\n" + textwrap.indent(textwrap.dedent(advanced).strip(), "    ")
    )
    tree.account(
        "a", f"smtp:\n  address: a@example.com\n  host: h.example.com\n  {login}\n  advanced:{block}\n"
    )
    return tree.load()


def test_office365_preset_fills_host_port_protocol_and_limits(tree: RecordTree) -> None:
    tree.account(
        "orders",
        """
        provider: office365
        smtp:
          address: orders@example.com
          password: ${ORDERS_PW}
        """,
    )
    account = tree.load().account("orders")
    assert endpoint(account) == ("smtp.office365.com", 587, "starttls")
    assert account.smtp is not None and account.smtp.auth == "password"
    assert account.smtp.username == "orders@example.com"
    assert account.limits.rate == (30, 60.0)
    assert account.limits.max_connections == 3
    assert account.limits.daily_recipients == 10000
    assert account.smtp.security_label == "SMTP (Connect using STARTTLS)"


def endpoint(account: EmailAccount) -> tuple[str, int, str]:
    """Where an SMTP account connects: host, port and protocol."""
    assert account.smtp is not None
    return account.smtp.host, account.smtp.port, account.smtp.protocol


@pytest.mark.parametrize(
    ("address", "provider", "host"),
    [
        ("someone@gmail.com", "gmail", "smtp.gmail.com"),
        ("someone@hotmail.com", "outlook", "smtp-mail.outlook.com"),
        ("someone@outlook.com", "outlook", "smtp-mail.outlook.com"),
        ("someone@yahoo.co.uk", "yahoo", "smtp.mail.yahoo.com"),
        ("someone@icloud.com", "icloud", "smtp.mail.me.com"),
        ("someone@zoho.com", "zoho", "smtp.zoho.com"),
    ],
)
def test_provider_is_inferred_from_the_address_domain(
    tree: RecordTree, address: str, provider: str, host: str
) -> None:
    tree.account("a", f"smtp: {{address: {address}, password: '${{PW}}'}}\n")
    account = tree.load().account("a")
    assert account.provider == provider
    assert account.smtp is not None and account.smtp.host == host


def test_explicit_fields_win_over_the_preset(tree: RecordTree) -> None:
    tree.account(
        "a",
        """
        provider: gmail
        smtp:
          address: a@gmail.com
          password: ${PW}
          host: smtp-relay.gmail.com
          port: 465
        limits: {max_connections: 1, rate: 5/second}
        """,
    )
    account = tree.load().account("a")
    assert endpoint(account) == ("smtp-relay.gmail.com", 465, "smtps")
    assert account.limits.max_connections == 1
    assert account.limits.rate == (5, 1.0)
    assert account.limits.max_recipients_per_message == 100  # preset still fills the rest


@pytest.mark.parametrize(
    ("fields", "port", "protocol"),
    [
        ("secure: false", 25, "none"),
        ("port: 465", 465, "smtps"),
        ("port: 587", 587, "starttls"),
        ("port: 2525", 2525, "starttls"),
        ("protocol: smtps", 465, "smtps"),
        ("protocol: starttls", 587, "starttls"),
        ("{advanced: {mail.smtp.ssl.enable: 'true'}}", 465, "smtps"),
    ],
)
def test_port_and_protocol_defaults(tree: RecordTree, fields: str, port: int, protocol: str) -> None:
    extra = fields if not fields.startswith("{") else "advanced: " + fields.split("advanced: ", 1)[1][:-1]
    tree.account(
        "a",
        f"""
        provider: other
        smtp:
          address: a@example.com
          host: mail.example.com
          auth: none
          {extra}
        """,
    )
    account = tree.load().account("a")
    assert account.smtp is not None
    assert (account.smtp.port, account.smtp.protocol) == (port, protocol)


def test_min_tls_version_accepts_unquoted_numbers(tree: RecordTree) -> None:
    tree.account("a", "smtp: {address: a@example.com, host: h.example.com, auth: none, min_tls_version: 1.3}")
    account = tree.load().account("a")
    assert account.smtp is not None and account.smtp.min_tls_version == "1.3"


def test_errors_name_file_line_and_field(tree: RecordTree) -> None:
    tree.account(
        "orders",
        """
        # order notifications
        description: Orders
        provider: office365
        smtp:
          address: orders@example.com
          password: ${PW}
          port: not-a-port
        """,
    )
    records = tree.load()
    assert "orders" not in records.accounts
    problems = records.account_problems["orders"]
    assert [str(p) for p in problems] == [
        "accounts/orders.yaml:7: smtp.port: "
        "Input should be a valid integer, unable to parse string as an integer"
    ]


def test_every_problem_in_a_record_is_reported_with_its_line(tree: RecordTree) -> None:
    tree.account(
        "a",
        """
        provider: hotmail
        smtp:
          address: not-an-address
          secure: maybe
          colour: blue
        """,
    )
    text = [str(p) for p in tree.load().account_problems["a"]]
    assert any(t.startswith("accounts/a.yaml:1: provider: Input should be 'gmail'") for t in text), text
    assert "accounts/a.yaml:3: smtp.address: 'not-an-address' is not a valid email address" in text
    assert any(t.startswith("accounts/a.yaml:4: smtp.secure: Input should be a valid boolean") for t in text)
    assert "accounts/a.yaml:5: smtp.colour: unknown field" in text


def test_yaml_syntax_error_names_the_line(tree: RecordTree) -> None:
    tree.account("a", "smtp:\n  address: a@example.com\n  host: [unclosed\n")
    (problem,) = tree.load().account_problems["a"]
    assert problem.file == "accounts/a.yaml"
    assert problem.line is not None and problem.line >= 3
    assert "invalid YAML" in problem.reason


def test_one_bad_record_does_not_stop_the_others(tree: RecordTree) -> None:
    tree.account("good", "smtp: {address: good@example.com, host: h.example.com, auth: none}")
    tree.account("bad", "smtp: {address: bad@example.com, port: 99999}")
    tree.write("accounts/broken.yaml", ": : :\n")
    records = tree.load()
    assert list(records.accounts) == ["good"]
    assert sorted(records.account_problems) == ["bad", "broken"]
    with pytest.raises(RecordError, match=r"accounts/bad\.yaml:1: smtp\.port"):
        records.account("bad")
    known = r"unknown account 'nope'.*known accounts: bad, broken, good"
    with pytest.raises(ConfigurationError, match=known):
        records.account("nope")


GOOD = "smtp: {address: good@example.com, host: h.example.com, auth: none}\n"
DEEP = (
    "smtp: {address: d@example.com, host: h.example.com, auth: none}\ndescription: "
    + "[" * 20_000
    + "]" * 20_000
)
LAUGHS = "\n".join(
    [
        "smtp: {address: l@example.com, host: h.example.com, auth: none}",
        'a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
        *(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)),
        "description: *a9",
    ]
)


def test_a_record_nested_20000_deep_is_its_own_error(tree: RecordTree) -> None:
    tree.account("deep", DEEP)
    tree.account("good", GOOD)
    records = tree.load()
    assert list(records.accounts) == ["good"]
    (problem,) = records.account_problems["deep"]
    assert (problem.file, problem.line, problem.field) == ("accounts/deep.yaml", 2, "description")
    assert problem.reason == "nested deeper than 64 levels"
    assert records.check() == {"deep": [problem], "good": []}


def test_a_billion_laughs_record_is_its_own_error(tree: RecordTree) -> None:
    tree.account("laughs", LAUGHS)
    tree.account("good", GOOD)
    records = tree.load()
    assert list(records.accounts) == ["good"]
    (problem,) = records.account_problems["laughs"]
    assert problem.file == "accounts/laughs.yaml" and problem.line is not None
    assert "more than 100000 values (aliases expanded)" in problem.reason
    assert str(problem).startswith(f"accounts/laughs.yaml:{problem.line}: {problem.field}: ")


def test_a_cyclic_alias_is_its_own_error(tree: RecordTree) -> None:
    tree.account(
        "cycle", "smtp: {address: c@example.com, host: h.example.com, auth: none}\nadvanced: &x [*x]\n"
    )
    (problem,) = tree.load().account_problems["cycle"]
    assert (problem.line, problem.field) == (2, "advanced") and "aliases expanded" in problem.reason


def test_oversized_and_undecodable_records_are_their_own_errors(tree: RecordTree) -> None:
    tree.account("big", GOOD + "description: " + "x" * (1024 * 1024) + "\n")
    (tree.accounts / "latin1.yaml").write_bytes(GOOD.encode() + b"description: caf\xe9\n")
    tree.account("good", GOOD)
    records = tree.load()
    assert list(records.accounts) == ["good"]
    (big,) = records.account_problems["big"]
    assert big.reason == "the file is larger than 1048576 bytes"
    (latin1,) = records.account_problems["latin1"]
    assert (latin1.line, latin1.reason) == (2, "not UTF-8 text")


def test_control_characters_in_header_bound_record_fields_are_refused(tree: RecordTree) -> None:
    tree.account("del", GOOD.replace("good@", "d@") + 'description: "a\\x7fb"\n')
    tree.write("accounts/c1.yaml", 'smtp:\n  address: c@example.com\n  display_name: "Ex\\x85ample"\n')
    problems = tree.load().account_problems
    (deleted,) = problems["del"]
    assert (deleted.line, deleted.field) == (2, "description")
    assert deleted.reason == "control character U+007F is not allowed"
    (c1,) = problems["c1"]
    assert (c1.line, c1.field) == (3, "smtp.display_name")
    assert c1.reason == "control character U+0085 is not allowed"


def test_anchors_and_merge_keys_within_the_bounds_still_work(tree: RecordTree) -> None:
    tree.account(
        "merged",
        """
        description: &d Orders
        smtp:
          <<: {address: m@example.com, host: h.example.com}
          auth: none
          display_name: *d
        """,
    )
    account = tree.load().account("merged")
    assert account.smtp is not None and account.smtp.host == "h.example.com"
    assert (account.from_address, account.display_name, account.description) == (
        "m@example.com",
        "Orders",
        "Orders",
    )


def test_cross_field_rules(tree: RecordTree) -> None:
    tree.account(
        "a",
        """
        provider: other
        smtp:
          address: a@example.com
          secure: false
          protocol: starttls
        """,
    )
    tree.account("b", "smtp: {address: b@example.com, auth: password}\n")
    tree.account("c", "send_using: graph\nsmtp: {address: c@gmail.com, password: '${X}'}\n")
    records = tree.load()
    assert [str(p) for p in records.account_problems["a"]] == [
        "accounts/a.yaml:5: smtp.protocol: only applies when secure: true",
        "accounts/a.yaml:2: smtp.host: required (provider other has no preset host)",
    ]
    b = [str(p) for p in records.account_problems["b"]]
    assert "accounts/b.yaml:1: smtp.host: required (provider other has no preset host)" in b
    assert "accounts/b.yaml:1: smtp.password: required when auth is password (or set auth: none)" in b
    c = [str(p) for p in records.account_problems["c"]]
    assert (
        "accounts/c.yaml:1: send_using: graph can only be used with provider office365 (provider is gmail)"
        in c
    )
    assert "accounts/c.yaml:1: graph: required when send_using is graph" in c


# ---- advanced (JavaMail) keys ------------------------------------------------


def test_advanced_keys_map_onto_real_settings(tree: RecordTree) -> None:
    smtp = (
        advanced_account(
            tree,
            "password: ${PW}",
            """
        mail.smtp.auth.plain.disable: "true"
        mail.smtp.timeout: 12000
        mail.smtp.connectiontimeout: "3000"
        mail.smtp.writetimeout: 60000
        mail.smtp.localhost: mailer.example.com
        mail.smtp.from: bounces@example.com
        mail.smtps.ssl.protocols: TLSv1.2 TLSv1.3
        mail.smtp.ssl.checkserveridentity: false
        mail.smtp.starttls.required: "true"
        mail.smtp.dsn.notify: FAILURE,DELAY
        """,
        )
        .account("a")
        .smtp
    )
    assert smtp is not None
    assert smtp.mechanisms == ("LOGIN", "CRAM-MD5")
    assert (smtp.command_timeout, smtp.connect_timeout, smtp.data_timeout) == (12.0, 3.0, 60.0)
    assert smtp.ehlo_name == "mailer.example.com"
    assert smtp.envelope_from == "bounces@example.com"
    assert (smtp.min_tls_version, smtp.max_tls_version) == ("1.2", "1.3")
    assert smtp.check_hostname is False
    assert smtp.dsn_notify == "FAILURE,DELAY"


def test_auth_mechanisms_key_sets_order(tree: RecordTree) -> None:
    smtp = (
        advanced_account(
            tree,
            "password: ${PW}",
            ' {mail.smtp.auth.mechanisms: LOGIN PLAIN, mail.smtp.auth.login.disable: "false"}',
        )
        .account("a")
        .smtp
    )
    assert smtp is not None and smtp.mechanisms == ("LOGIN", "PLAIN")


def test_unknown_advanced_key_lists_the_known_ones(tree: RecordTree) -> None:
    problems = [
        str(p)
        for p in advanced_account(
            tree,
            "auth: none",
            """
        mail.smtp.auth.plian.disable: "true"
        mail.imaps.timeout: 1000
        mail.smtp.timeout: soon
        """,
        ).account_problems["a"]
    ]
    assert problems[0].startswith(
        "accounts/a.yaml:6: smtp.advanced.mail.smtp.auth.plian.disable: unknown key; "
        'did you mean "mail.smtp.auth.plain.disable"? known keys: mail.smtp.auth.plain.disable, '
    )
    assert "mail.smtp.localhost" in problems[0] and "mail.smtp.ssl.checkserveridentity" in problems[0]
    assert problems[1] == (
        "accounts/a.yaml:7: smtp.advanced.mail.imaps.timeout: mail.imaps.* keys configure reading "
        'mail, not sending; did you mean "mail.smtp.timeout"?'
    )
    assert problems[2] == (
        "accounts/a.yaml:8: smtp.advanced.mail.smtp.timeout: expected a number of milliseconds, got 'soon'"
    )


def test_secure_account_refuses_optional_starttls(tree: RecordTree) -> None:
    (problem,) = advanced_account(
        tree,
        "auth: none",
        """
        mail.smtp.starttls.required: "false"
        """,
    ).account_problems["a"]
    assert str(problem) == (
        "accounts/a.yaml:6: smtp.advanced.mail.smtp.starttls.required: "
        'secure: true never sends in the clear; it cannot be "false"'
    )


def test_every_mechanism_disabled_is_an_error(tree: RecordTree) -> None:
    (problem,) = advanced_account(
        tree, "password: ${PW}", ' {mail.smtp.auth.mechanisms: PLAIN, mail.smtp.auth.plain.disable: "true"}'
    ).account_problems["a"]
    assert str(problem) == "accounts/a.yaml:5: smtp.advanced: every AUTH mechanism is disabled"


# ---- secrets -----------------------------------------------------------------


def test_literal_secrets_are_refused(tree: RecordTree) -> None:
    tree.account("a", "smtp: {address: a@example.com, host: h.example.com, password: hunter2}\n")
    (problem,) = tree.load().account_problems["a"]
    assert problem.field == "smtp.password"
    assert "${ENV_VAR} or {file: path}" in problem.reason
    assert "hunter2" not in str(problem)


def test_secrets_resolve_from_env_and_file_and_never_print(
    tree: RecordTree, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("A_PW", "env-secret-value")
    tree.write("secrets/b.txt", "file-secret-value\n")
    tree.account("a", "smtp: {address: a@example.com, host: h.example.com, password: '${A_PW}'}\n")
    tree.account(
        "b", "smtp: {address: b@example.com, host: h.example.com, password: {file: ../secrets/b.txt}}\n"
    )
    records = tree.load()
    a, b = records.account("a"), records.account("b")
    assert a.smtp is not None and a.smtp.password is not None
    assert b.smtp is not None and b.smtp.password is not None
    assert a.smtp.password.reveal() == "env-secret-value"
    assert b.smtp.password.reveal() == "file-secret-value"
    for shown in (repr(a), str(a), repr(b), repr(a.smtp), str(records.accounts), repr(records)):
        assert "env-secret-value" not in shown and "file-secret-value" not in shown
    assert repr(a.smtp.password) == "Secret(${A_PW})"
    assert records.check() == {"a": [], "b": []}


def test_missing_secret_is_reported_by_check_with_its_line(tree: RecordTree) -> None:
    tree.account("a", "smtp:\n  address: a@example.com\n  host: h.example.com\n  password: ${NOT_SET_XYZ}\n")
    records = tree.load()
    assert "a" in records.accounts  # loads; the secret is resolved at use
    (problem,) = records.check()["a"]
    assert str(problem) == "accounts/a.yaml:4: smtp.password: environment variable NOT_SET_XYZ is not set"
    assert records.account("a").smtp is not None
    with pytest.raises(ConfigurationError, match=r"secret \$\{NOT_SET_XYZ\}: environment variable"):
        Secret.parse("${NOT_SET_XYZ}").reveal()


# ---- keystores and auth profiles -----------------------------------------------


def test_pem_and_pkcs12_truststores_load(tree: RecordTree, pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("P12_PW", pki.ca_p12_password)
    tree.write("config/keystores/ca-pem.yaml", f"type: pem\ncertificates: {pki.ca_cert}\n")
    tree.write("config/keystores/ca-p12.yaml", f"type: pkcs12\npath: {pki.ca_p12}\npassword: ${{P12_PW}}\n")
    records = tree.load()
    for name in ("ca-pem", "ca-p12"):
        (cert,) = records.keystore(name).trusted_certificates()
        assert "Postroom Test CA" in cert.subject.rfc4514_string()
        assert "BEGIN CERTIFICATE" in records.keystore(name).cadata()


def test_account_references_are_checked(tree: RecordTree, pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("P12_PW", "wrong-password")
    monkeypatch.setenv("PW", "x")
    tree.write("config/keystores/ca-p12.yaml", f"type: pkcs12\npath: {pki.ca_p12}\npassword: ${{P12_PW}}\n")
    tree.account(
        "a",
        "smtp:\n  address: a@example.com\n  host: h.example.com\n  password: ${PW}\n  truststore: ca-p12\n",
    )
    tree.account(
        "b",
        "smtp:\n  address: b@example.com\n  host: h.example.com\n  password: ${PW}\n  truststore: nope\n",
    )
    checked = tree.load().check()
    assert [str(p) for p in checked["a"]] == [
        "config/keystores/ca-p12.yaml:3: password: "
        "wrong password for the PKCS#12 file (its integrity check fails)"
    ]
    assert [str(p) for p in checked["b"]] == [
        "accounts/b.yaml:5: smtp.truststore: no keystore record 'nope' in config/keystores (known: ca-p12)"
    ]


def test_graph_accounts_check_their_auth_profile(tree: RecordTree, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPH_SECRET", "s")
    tree.write(
        "config/auth-profiles/contoso.yaml",
        """
        type: client_credentials
        authority: https://login.microsoftonline.com/tenant
        client_id: abc
        client_secret: ${GRAPH_SECRET}
        """,
    )
    tree.write(
        "config/auth-profiles/google.yaml",
        "type: jwt_bearer\nservice_account_file: /nonexistent/sa.json\nsubject: a@example.com\n",
    )
    tree.write("config/auth-profiles/broken.yaml", "type: kerberos\n")
    base = "provider: office365\nsend_using: graph\ngraph:\n  user_principal_name: n@contoso.example\n"
    tree.account("ok", base + "  auth_profile: contoso\n")
    tree.account("missing", base + "  auth_profile: nope\n")
    tree.account("wrongtype", base + "  auth_profile: google\n")
    tree.account("brokenprofile", base + "  auth_profile: broken\n")
    records = tree.load()
    checked = {k: [str(p) for p in v] for k, v in records.check().items()}
    assert checked["ok"] == []
    assert checked["missing"] == [
        "accounts/missing.yaml:5: graph.auth_profile: no auth profile 'nope' in config/auth-profiles "
        "(known: contoso, google)"
    ]
    assert checked["wrongtype"] == [
        "accounts/wrongtype.yaml:5: graph.auth_profile: profile 'google' is of type jwt_bearer; "
        "graph with provider office365 needs client_credentials or password"
    ]
    assert checked["brokenprofile"] == [
        "config/auth-profiles/broken.yaml:1: type: must be one of client_credentials, password, "
        "jwt_bearer (got 'kerberos')"
    ]
    graph = records.account("ok").graph
    assert graph is not None and graph.base_url == "https://graph.microsoft.com"


def test_auth_profile_validation(tree: RecordTree) -> None:
    tree.write(
        "config/auth-profiles/p.yaml",
        "type: client_credentials\nauthority: http://evil.example\nclient_id: x\n",
    )
    text = [str(p) for p in tree.load().profile_problems["p"]]
    assert "config/auth-profiles/p.yaml:2: authority: must be an https:// URL" in text


# ---- the shipped examples ------------------------------------------------------


def test_shipped_records_pass_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    checked = Records.load().check()
    assert checked and all(problems == [] for problems in checked.values()), checked


def test_documented_examples_pass_check_once_their_secrets_exist(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(REPO / "accounts" / "examples", tmp_path / "accounts")
    shutil.copytree(REPO / "config" / "examples", tmp_path / "config")
    shutil.copy(pki.ca_cert, tmp_path / "config" / "keystores" / "corp-ca.pem")
    secrets = tmp_path / "run-secrets"
    secrets.mkdir()
    for name in ("support-smtp-password", "google-sa.json", "orders-signer.p12"):
        (secrets / name).write_text("x")
    for path in [*(tmp_path / "accounts").iterdir(), *(tmp_path / "config").rglob("*.yaml")]:
        path.write_text(path.read_text().replace("/run/secrets/", f"{secrets}/"))
    for var in ("ORDERS_SMTP_PASSWORD", "RELAY_SMTP_PASSWORD", "GRAPH_CLIENT_SECRET", "SIGNER_P12_PASSWORD"):
        monkeypatch.setenv(var, "x")
    monkeypatch.chdir(tmp_path)
    records = Records.load()
    assert sorted(records.accounts) == ["contoso", "orders", "relay", "support"]
    checked = records.check()
    # orders is Office 365 SMTP with a password: Microsoft's Basic-auth retirement is a warning
    (warning,) = checked.pop("orders")
    assert warning.severity == "warning" and "December 2026" in warning.reason
    assert checked == {"contoso": [], "relay": [], "support": []}
    assert os.environ["ORDERS_SMTP_PASSWORD"] == "x"


RecordWriter = Callable[[str, str], Path]


def test_a_record_cache_reads_again_only_when_a_file_changed(tmp_path: Path) -> None:
    """The one reload rule (worker/records/loader.py, RecordCache): files looked at no more than
    every recheck seconds (at once when fresh), records read again only when one changed."""
    from worker.records.loader import RecordCache

    folder = tmp_path / "things"
    folder.mkdir()
    loads: list[int] = []

    def load() -> int:
        loads.append(len(list(folder.glob("*.yaml"))))
        return loads[-1]

    cache = RecordCache(lambda: [folder], load, recheck=3600)
    assert cache.peek() is None
    assert cache.get() == 0 and cache.get() == 0 and len(loads) == 1
    (folder / "a.yaml").write_text("x: 1\n")
    assert cache.get() == 0  # not looked at again before the recheck
    assert cache.get(fresh=True) == 1 and len(loads) == 2
    assert cache.get(fresh=True) == 1 and len(loads) == 2  # looked, nothing changed: not read
    (folder / "a.yaml").unlink()
    assert cache.get(fresh=True) == 0 and cache.peek() == 0 and len(loads) == 3


# ---- bounces: the bounce reader's mailbox (contract §11) -------------------------------------


def test_bounces_reads_the_mailbox_as_the_account_sends_by_default(tree: RecordTree) -> None:
    tree.account(
        "orders",
        """
        provider: office365
        smtp: {address: orders@example.com, password: '${ORDERS_PW}'}
        bounces: {}
        """,
    )
    tree.account(
        "relay",
        """
        smtp: {address: relay@example.org, host: mail.example.org, password: '${PW}', truststore: ca}
        bounces: {port: 143, folder: Bounces, move_to: Done, interval: 30}
        """,
    )
    (tree.config / "keystores" / "ca.yaml").write_text("type: pem\ncertificates: /nowhere.pem\n")
    records = tree.load()
    orders = records.account("orders").bounces
    assert orders is not None and orders.via == "imap"
    assert (orders.host, orders.port, orders.protocol) == ("outlook.office365.com", 993, "imaps")
    assert orders.user == "orders@example.com" and orders.password is not None
    assert (orders.folder, orders.move_to, orders.interval) == ("INBOX", "Postroom/Processed", 60.0)
    relay = records.account("relay").bounces
    assert relay is not None
    assert (relay.host, relay.port, relay.protocol, relay.truststore) == (
        "mail.example.org",
        143,
        "starttls",
        "ca",
    )
    assert (relay.folder, relay.move_to, relay.interval) == ("Bounces", "Done", 30.0)
    assert records.account("orders").summary()["bounces"]["host"] == "outlook.office365.com"
    assert records.account("relay").summary()["bounces"] == {
        "via": "imap", "folder": "Bounces", "move_to": "Done", "host": "mail.example.org", "port": 143,
        "protocol": "starttls", "user": "relay@example.org",
    }  # fmt: skip


def test_bounces_reuses_the_oauth_profile_and_a_graph_account_reads_through_graph(tree: RecordTree) -> None:
    tree.write(
        "config/auth-profiles/contoso.yaml",
        """
        type: microsoft
        tenant_id: 00000000-0000-0000-0000-000000000001
        client_id: 00000000-0000-0000-0000-000000000002
        client_secret: '${SECRET}'
        """,
    )
    tree.account(
        "oauth",
        """
        provider: office365
        smtp: {address: oauth@contoso.com, auth: oauth, oauth_profile: contoso}
        bounces: {}
        """,
    )
    tree.account(
        "graph",
        """
        provider: office365
        send_using: graph
        graph: {user_principal_name: graph@contoso.com, auth_profile: contoso}
        bounces: {folder: Inbox/Reports}
        """,
    )
    records = tree.load()
    oauth = records.account("oauth").bounces
    assert oauth is not None and oauth.oauth_profile == "contoso" and oauth.password is None
    graph = records.account("graph").bounces
    assert graph is not None and (graph.via, graph.folder, graph.host) == ("graph", "Inbox/Reports", None)


def test_a_broken_bounces_section_names_file_line_and_field(tree: RecordTree) -> None:
    tree.account(
        "other",
        """
        smtp: {address: a@example.org, host: mail.example.org, password: '${PW}'}
        bounces:
          user: someone-else@example.org
        """,
    )
    tree.account(
        "typo",
        """
        smtp: {address: b@example.org, host: mail.example.org, password: '${PW}'}
        bounces: {folder: INBOX, intervall: 5}
        """,
    )
    checked = {name: [str(p) for p in problems] for name, problems in tree.load().check().items()}
    (other,) = checked["other"]
    assert other.startswith("accounts/other.yaml:") and "bounces.password: required when" in other
    assert any(p.startswith("accounts/typo.yaml:2: bounces.intervall") for p in checked["typo"]), checked[
        "typo"
    ]
