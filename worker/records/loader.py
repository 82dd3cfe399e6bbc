"""The record registry: every account, auth profile and keystore, loaded and checked.

One bad record never stops the others: loading collects problems per record
and keeps going. ``check()`` goes further than loading (references resolve,
secrets are present, keystores open) and is what ``postroom accounts check``
prints.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Generic, TypeVar

from pydantic import ValidationError

from worker import settings
from worker.errors import ConfigurationError, RecordError, RecordProblem
from worker.records.account.account import EmailAccount, resolve_account
from worker.records.account.providers import basic_auth_warning
from worker.records.account.record import AccountRecord
from worker.records.auth_profiles import (
    AuthProfile,
    ClientCredentialsProfile,
    JwtBearerProfile,
    load_service_account,
    profile_model,
)
from worker.records.keystores import Keystore, KeystoreRecord
from worker.records.secrets import Secret
from worker.records.signing_material import (
    dkim_key,
    dkim_key_findings,
    dkim_settings_findings,
    smime_findings,
)
from worker.records.webhooks import Webhook, WebhookRecord
from worker.records.yamlsrc import YamlDocument, display_path, load_yaml

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
T = TypeVar("T")


def valid_record_name(name: str) -> bool:
    """A name a record file may have (an account's, a profile's, a keystore's)."""
    return _NAME.fullmatch(name) is not None


# which auth profile types an account may use where
_GRAPH_PROFILE_TYPES = ("client_credentials", "password")
_SMTP_OAUTH_TYPES = {
    "gmail": ("jwt_bearer",),
    "office365": ("client_credentials", "password"),
    "outlook": ("client_credentials", "password"),
}


def records_stamp(folders: Iterable[Path]) -> tuple[tuple[str, float], ...]:
    """Every record file in ``folders`` with its mtime: compared with an earlier stamp, it says
    whether a file was added, removed or changed (the caches re-read their records then)."""
    stamp = []
    for path in sorted(p for folder in folders for p in _record_files(folder)):
        try:
            stamp.append((str(path), path.stat().st_mtime))
        except OSError:
            continue
    return tuple(stamp)


RECORDS_RECHECK_SECONDS = 2.0  # how often a cache looks whether its record files changed


class RecordCache(Generic[T]):
    """Records read from folders and kept: the one reload rule of every cache of them (accounts
    and their profiles and keystores, API keys, webhooks). The files' stamp (:func:`records_stamp`)
    is looked at no more than every :data:`RECORDS_RECHECK_SECONDS` (at once when asked
    ``fresh``: a name the cache lacks may have just been added); the records are read again when it
    changed. Thread-safe; a load that fails keeps nothing and raises."""

    def __init__(
        self,
        folders: Callable[[], Iterable[Path]],
        load: Callable[[], T],
        recheck: float = RECORDS_RECHECK_SECONDS,
    ) -> None:
        self._folders, self._load, self._recheck = folders, load, recheck
        self._value: T | None = None
        self._stamp: tuple[tuple[str, float], ...] = ()
        self._checked = 0.0
        self._lock = threading.Lock()

    def get(self, *, fresh: bool = False) -> T:
        with self._lock:
            now = time.monotonic()
            if self._value is not None and not fresh and now - self._checked < self._recheck:
                return self._value
            self._checked = now
            stamp = records_stamp(self._folders())
            if self._value is None or stamp != self._stamp:
                self._value, self._stamp = self._load(), stamp
            return self._value

    def peek(self) -> T | None:
        """What the cache holds (None before the first read), without looking at the files."""
        with self._lock:
            return self._value


def _record_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def _load_all(
    directory: Path, build: Callable[[YamlDocument], T]
) -> tuple[dict[str, T], dict[str, list[RecordProblem]]]:
    items: dict[str, T] = {}
    problems: dict[str, list[RecordProblem]] = {}
    for path in _record_files(directory):
        name = path.stem
        if not _NAME.match(name):
            problems[name] = [
                RecordProblem(
                    display_path(path),
                    None,
                    "",
                    "file name is not a valid record name (letters, digits, '.', '_', '-')",
                )
            ]
            continue
        if name in items or name in problems:
            problems.setdefault(name, []).append(
                RecordProblem(display_path(path), None, "", f"a record named {name} already exists")
            )
            continue
        try:
            items[name] = build(load_yaml(path))
        except RecordError as exc:
            problems[name] = exc.problems
    return items, problems


def _validate(doc: YamlDocument, model: type[T]) -> T:
    try:
        return model.model_validate(doc.data, context={"base_dir": doc.path.parent})  # type: ignore[attr-defined, no-any-return]
    except ValidationError as exc:
        raise RecordError(doc.problems_from(exc)) from None


def _build_account(doc: YamlDocument) -> EmailAccount:
    account, problems = resolve_account(doc, _validate(doc, AccountRecord))
    if problems or account is None:
        raise RecordError(problems)
    return account


def _build_profile(doc: YamlDocument) -> AuthProfile:
    model = profile_model(doc.data)
    if isinstance(model, str):
        raise RecordError([doc.problem(("type",), model)])
    return AuthProfile(doc.name, doc.path, _validate(doc, model))


def _build_keystore(doc: YamlDocument) -> Keystore:
    return Keystore(doc.name, doc.path, _validate(doc, KeystoreRecord))


def _build_webhook(doc: YamlDocument) -> Webhook:
    return Webhook(doc.name, doc.path, _validate(doc, WebhookRecord))


def load_webhooks(config_dir: Path) -> tuple[dict[str, Webhook], dict[str, list[RecordProblem]]]:
    """``config/webhooks/*.yaml`` alone (the webhook sender re-reads them without the accounts)."""
    return _load_all(settings.webhooks_dir(config_dir), _build_webhook)


@dataclass
class Records:
    accounts_dir: Path
    config_dir: Path
    accounts: dict[str, EmailAccount] = field(default_factory=dict)
    profiles: dict[str, AuthProfile] = field(default_factory=dict)
    keystores: dict[str, Keystore] = field(default_factory=dict)
    account_problems: dict[str, list[RecordProblem]] = field(default_factory=dict)
    profile_problems: dict[str, list[RecordProblem]] = field(default_factory=dict)
    keystore_problems: dict[str, list[RecordProblem]] = field(default_factory=dict)
    webhooks: dict[str, Webhook] = field(default_factory=dict)
    webhook_problems: dict[str, list[RecordProblem]] = field(default_factory=dict)

    @classmethod
    def load(cls, accounts_dir: Path | None = None, config_dir: Path | None = None) -> Records:
        acc_dir = accounts_dir or settings.accounts_dir()
        cfg_dir = config_dir or settings.config_dir()
        self = cls(acc_dir, cfg_dir)
        self.accounts, self.account_problems = _load_all(acc_dir, _build_account)
        self.profiles, self.profile_problems = _load_all(cfg_dir / "auth-profiles", _build_profile)
        self.keystores, self.keystore_problems = _load_all(cfg_dir / "keystores", _build_keystore)
        self.webhooks, self.webhook_problems = load_webhooks(cfg_dir)
        return self

    @classmethod
    def cache(cls, accounts_dir: Path | None = None, config_dir: Path | None = None) -> RecordCache[Records]:
        """The records, kept and read again when an account, auth profile or keystore file changed."""

        def folders() -> tuple[Path, ...]:
            config = config_dir or settings.config_dir()
            return (accounts_dir or settings.accounts_dir(), config / "auth-profiles", config / "keystores")

        return RecordCache(folders, lambda: cls.load(accounts_dir, config_dir))

    @property
    def account_names(self) -> list[str]:
        return sorted({*self.accounts, *self.account_problems})

    def account(self, name: str) -> EmailAccount:
        """The named account, or a ConfigurationError saying why it cannot be used."""
        if name in self.accounts:
            return self.accounts[name]
        if name in self.account_problems:
            raise RecordError(self.account_problems[name])
        known = ", ".join(self.account_names) or "none"
        raise ConfigurationError(f"unknown account {name!r} (known accounts: {known})")

    def keystore(self, name: str) -> Keystore:
        return _named(self.keystores, self.keystore_problems, name, f"unknown keystore {name!r}")

    def profile(self, name: str) -> AuthProfile:
        return _named(self.profiles, self.profile_problems, name, f"unknown auth profile {name!r}")

    def check(self, names: Iterable[str] | None = None) -> dict[str, list[RecordProblem]]:
        """Every problem that would stop each account from sending, by account name."""
        wanted = list(names) if names is not None else self.account_names
        return {name: self._check_account(name) for name in wanted}

    def check_webhooks(
        self, resolved: Mapping[str, Sequence[str]] | None = None
    ) -> dict[str, list[RecordProblem]]:
        """Every webhook record's problems (and warnings), by name: loading, its secret, the
        accounts it names, a private target without ``allow_private`` (``resolved``: host name →
        the addresses DNS gave, when the caller asked)."""
        out = {name: list(problems) for name, problems in self.webhook_problems.items()}
        for name, hook in self.webhooks.items():
            doc = load_yaml(hook.source)
            out[name] = [
                replace(doc.problem(loc, reason), severity=severity)
                for loc, severity, reason in hook.findings(self.account_names, resolved)
            ]
        return dict(sorted(out.items()))

    def _check_account(self, name: str) -> list[RecordProblem]:
        if name in self.account_problems:
            return list(self.account_problems[name])
        if name not in self.accounts:
            return [
                RecordProblem(display_path(self.accounts_dir / f"{name}.yaml"), None, "", "no such account")
            ]
        account = self.accounts[name]
        doc = load_yaml(account.source)  # for line numbers of reference fields
        found: list[RecordProblem] = []
        if account.smtp and account.smtp.password:
            found += _secret_problems(doc, ("smtp", "password"), account.smtp.password)
        for field_path, kind, ref in account.references:
            loc = tuple(field_path.split("."))
            if kind == "keystore":
                key_use = field_path.endswith("signing.keystore") or field_path == "dkim.keystore"
                ref_problems = self._check_keystore_ref(doc, loc, ref, truststore=not key_use)
                found += ref_problems
                if ref_problems or not key_use:
                    continue
                if field_path == "dkim.keystore":
                    found += self._check_dkim(doc, account)
                else:
                    found += self._check_signing(doc, loc[:-1], account)
            else:
                found += self._check_profile_ref(doc, loc, ref, account)
        if account.dkim is not None and account.dkim.private_key is not None:
            found += self._check_dkim(doc, account)
        auth = account.smtp.auth if account.smtp else None
        if warning := basic_auth_warning(account.provider, account.send_using, auth):
            where = ("smtp", "auth") if doc.line_of(("smtp", "auth")) is not None else ("smtp",)
            found.append(replace(doc.problem(where, warning), severity="warning"))
        return _dedupe(found)

    def _keystore_problem(
        self, doc: YamlDocument, loc: tuple[str, ...], exc: ConfigurationError
    ) -> RecordProblem:
        """A keystore error where it belongs: a missing alias at the account's alias field,
        anything else (wrong password, unreadable file, bad key) at the keystore record's field."""
        text = str(exc)
        for name, keystore in self.keystores.items():
            prefix = f"keystore {name}: "
            if not text.startswith(prefix):
                continue
            field_name, _, reason = text.removeprefix(prefix).partition(": ")
            if field_name == "alias" and reason:
                return doc.problem((*loc, "alias"), f"keystore {name}: {reason}")
            ks_doc = load_yaml(keystore.source)
            if reason and field_name.isidentifier():
                return ks_doc.problem((field_name,), reason)
            return ks_doc.problem((), text.removeprefix(prefix))
        return doc.problem((*loc, "keystore"), text)

    def _check_signing(
        self, doc: YamlDocument, loc: tuple[str, ...], account: EmailAccount
    ) -> list[RecordProblem]:
        """S/MIME material: the key entry opens, and its certificate fits the account."""
        assert account.signing is not None
        keystore = self.keystores[account.signing.keystore]
        try:
            entry = keystore.key_entry(account.signing.alias)
        except ConfigurationError as exc:
            return [self._keystore_problem(doc, loc, exc)]
        where = f"keystore {keystore.name}" + (f" alias {entry.alias!r}" if entry.alias else "")
        return [
            replace(doc.problem((*loc, "keystore"), f"{where}: {f.reason}"), severity=f.severity)
            for f in smime_findings(entry, account.from_address)
        ]

    def _check_dkim(self, doc: YamlDocument, account: EmailAccount) -> list[RecordProblem]:
        """DKIM: the key loads and is usable; the domain aligns with the From address."""
        settings = account.dkim
        assert settings is not None
        found = [
            replace(doc.problem(("dkim", field_name), f.reason), severity=f.severity)
            for field_name, f in dkim_settings_findings(settings, account.from_address)
        ]
        key_field = "keystore" if settings.keystore else "private_key"
        if settings.private_key is not None:
            secret_problems = _secret_problems(doc, ("dkim", "private_key"), settings.private_key)
            if secret_problems:
                return found + secret_problems
        try:
            key, _files = dkim_key(settings, self)
        except ConfigurationError as exc:
            if settings.keystore:
                return [*found, self._keystore_problem(doc, ("dkim",), exc)]
            return [*found, doc.problem(("dkim", key_field), str(exc))]
        return found + [
            replace(doc.problem(("dkim", key_field), f.reason), severity=f.severity)
            for f in dkim_key_findings(key)
        ]

    def _unknown_ref(
        self, doc: YamlDocument, loc: tuple[str, ...], what: str, folder: str, known: Iterable[str]
    ) -> RecordProblem:
        """A reference to a record that is not there, naming the folder looked in and what it holds."""
        names = ", ".join(sorted(known)) or "none"
        return doc.problem(loc, f"no {what} in {display_path(self.config_dir / folder)} (known: {names})")

    def _check_keystore_ref(
        self, doc: YamlDocument, loc: tuple[str, ...], ref: str, *, truststore: bool = True
    ) -> list[RecordProblem]:
        if ref in self.keystore_problems:
            return list(self.keystore_problems[ref])
        if ref not in self.keystores:
            return [self._unknown_ref(doc, loc, f"keystore record {ref!r}", "keystores", self.keystores)]
        keystore = self.keystores[ref]
        ks_doc = load_yaml(keystore.source)
        found: list[RecordProblem] = []
        for secret_field in ("password", "key_password"):
            secret = getattr(keystore.record, secret_field)
            if secret is not None:
                found += _secret_problems(ks_doc, (secret_field,), secret)
        if found or not truststore:  # a signing keystore is opened by the signing checks
            return found
        try:
            keystore.trusted_certificates()
        except ConfigurationError as exc:
            text = str(exc).removeprefix(f"keystore {ref}: ")
            field_name, _, reason = text.partition(": ")
            if not reason:
                field_name, reason = "", text
            found.append(ks_doc.problem((field_name,) if field_name else (), reason))
        return found

    def _check_profile_ref(
        self, doc: YamlDocument, loc: tuple[str, ...], ref: str, account: EmailAccount
    ) -> list[RecordProblem]:
        if ref in self.profile_problems:
            return list(self.profile_problems[ref])
        if ref not in self.profiles:
            return [self._unknown_ref(doc, loc, f"auth profile {ref!r}", "auth-profiles", self.profiles)]
        profile = self.profiles[ref]
        allowed = _GRAPH_PROFILE_TYPES if loc[0] == "graph" else _SMTP_OAUTH_TYPES.get(account.provider)
        if allowed and profile.type not in allowed:
            return [
                doc.problem(
                    loc,
                    f"profile {ref!r} is of type {profile.type}; "
                    f"{loc[0]} with provider {account.provider} needs {' or '.join(allowed)}",
                )
            ]
        p_doc = load_yaml(profile.source)
        found: list[RecordProblem] = []
        rec = profile.record
        for secret_field in ("client_secret", "password"):
            secret = getattr(rec, secret_field, None)
            if isinstance(secret, Secret):
                found += _secret_problems(p_doc, (secret_field,), secret)
        if isinstance(rec, JwtBearerProfile):
            try:
                load_service_account(profile)
            except ConfigurationError as exc:
                reason = str(exc).removeprefix(f"auth profile {ref}: service_account_file: ")
                found.append(p_doc.problem(("service_account_file",), reason))
        for field_path, ks in profile.keystore_refs():
            ks_problems = self._check_keystore_ref(p_doc, tuple(field_path.split(".")), ks)
            found += ks_problems
            if ks_problems or not isinstance(rec, ClientCredentialsProfile) or rec.certificate is None:
                continue
            if field_path == "certificate.keystore":
                try:
                    self.keystores[ks].private_key(rec.certificate.alias)
                except ConfigurationError as exc:
                    reason = str(exc).removeprefix(f"keystore {ks}: ")
                    found.append(p_doc.problem(("certificate", "keystore"), reason))
        return found


def _named(items: dict[str, T], problems: dict[str, list[RecordProblem]], name: str, unknown: str) -> T:
    """A loaded record by name; a record that failed to load raises its own problems, so the
    caller sees the file:line reasons and not just "unknown"."""
    if name in items:
        return items[name]
    if name in problems:
        raise RecordError(problems[name])
    raise ConfigurationError(unknown)


def _secret_problems(doc: YamlDocument, loc: tuple[str, ...], secret: Secret) -> list[RecordProblem]:
    problem = secret.problem()
    return [doc.problem(loc, problem)] if problem else []


def _dedupe(problems: list[RecordProblem]) -> list[RecordProblem]:
    seen: set[RecordProblem] = set()
    out = []
    for p in problems:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out
