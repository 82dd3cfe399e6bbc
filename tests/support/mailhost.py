"""A real MTA and mailbox for the tests: Debian's Postfix and Dovecot, as instances of their own.

Postroom reads bounces (RFC 3464 DSNs) from the sending account's mailbox, so the tests need a
server that behaves like a hosted submission relay (Office 365): it takes every recipient at
RCPT and only later, when delivery fails, mails a real DSN back to the sender's mailbox.

:class:`MailHost` keeps everything in a temporary directory of its own (ROOT, removed at
:meth:`MailHost.stop`) and listens only on free 127.0.0.1 ports:

* Postfix (``postfix -c ROOT/postfix/etc start-fg``: its own main.cf and master.cf, queue and
  data directories in ROOT) takes submissions with STARTTLS required (the session's test
  certificate), AUTH checked by Dovecot (PLAIN/LOGIN, and XOAUTH2/OAUTHBEARER as below;
  optional: loopback clients may send without it) and DSN (ENVID, RET, NOTIFY). Mail for
  :attr:`MailHost.domain` goes over LMTP to Dovecot, which refuses an unknown user (550 5.1.1):
  Postfix then bounces to the envelope sender. The server of :attr:`MailHost.slow_domain`
  refuses connections: a delay DSN (4.4.1) after a second, a failed one after :data:`GIVE_UP`
  seconds. Mail for any other domain bounces at once (5.4.4): nothing leaves the machine.
* Dovecot (``dovecot -F -c ROOT/dovecot/dovecot.conf``, base_dir and state_dir in ROOT) serves
  IMAPS (and IMAP with STARTTLS), LMTP and SASL on unix sockets; users live in a passwd-file,
  mail in Maildirs, all in ROOT, stored as the system user ``mail`` (uid 8: Dovecot will not
  store mail as root).
* OAuth (XOAUTH2, OAUTHBEARER), as Office 365 and Gmail take it: Dovecot's ``oauth2`` passdb,
  for those two mechanisms only, asks the mail host's own introspection endpoint
  (tests/support/introspection.py, HTTPS with the session's certificate) about each token; it
  relays to the token issuers a test trusts (:meth:`MailHost.trusting`, a CloudServer's
  introspection route). The token must be active and issued for the user that logs in.
  PLAIN and LOGIN only ever see the passwd-files: a password never reaches the endpoint.

Both run as root (Postfix's master must) and drop to the ``postfix``, ``dovecot`` and
``dovenull`` users the packages made. Nothing is written outside ROOT: Postfix reads
/etc/postfix (postfix-files and dynamicmaps.cf: ``meta_directory``) and logs to
ROOT/postfix.log (``maillog_file``, not syslog), Dovecot to ROOT/dovecot.log. ROOT is made
under /tmp, not pytest's tmp_path, because the unprivileged daemons must reach it (pytest's
base folder is mode 0700).
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import imaplib
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path

from support.introspection import Introspection
from support.pki import Pki
from support.redisproc import free_port

HOST = "127.0.0.1"
POSTFIX = Path("/usr/sbin/postfix")
DOVECOT = Path("/usr/sbin/dovecot")
# the programs Debian's dovecot-imapd and dovecot-lmtpd add to dovecot-core
NEEDED = (POSTFIX, DOVECOT, Path("/usr/lib/dovecot/imap"), Path("/usr/lib/dovecot/lmtp"))
MAIL_USER = "mail"  # owns the Maildirs (Debian's base-passwd user for mail spools)
USER_NAME = re.compile(r"[a-z0-9][a-z0-9._+-]*")
BANNER = "Postroom test IMAP ready"  # Dovecot's greeting: MailHost._wait knows its own server
GIVE_UP = 5  # seconds a deferred message stays queued before Postfix bounces it


def missing_programs() -> list[str]:
    """What `make tools` would install before a MailHost can start."""
    return [str(path) for path in NEEDED if not os.access(path, os.X_OK)]


class MailHost:
    """One Postfix and one Dovecot on free loopback ports, in a temporary directory of their own."""

    domain = "postroom.test"
    slow_domain = "slow.postroom.test"  # deferred every time: delay DSNs
    forwarded = "forwarded@postroom.test"  # an alias of a user that does not exist: a bounce
    forwarded_to = "left-long-ago@postroom.test"  # that names another address than the one sent to
    hostname = "mx.postroom.test"

    def __init__(self, pki: Pki) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="postroom-mailhost-"))
        self.root.chmod(0o755)  # the daemons' own users walk into it
        self.ca_file = self.root / "ca.pem"  # Dovecot's auth process (user dovecot) reads it
        shutil.copyfile(pki.ca_cert, self.ca_file)
        self.cert = self.root / "server.pem"
        self.key = self.root / "server.key"
        shutil.copyfile(pki.server_cert, self.cert)
        shutil.copyfile(pki.server_key, self.key)
        self.key.chmod(0o600)
        self.smtp_port = free_port()
        self.imap_port = free_port()  # IMAPS: TLS from the first byte
        self.imap_starttls_port = free_port()
        # bound, never listening: connections to it are refused, and no one else can take it
        self._closed = socket.socket()
        self._closed.bind((HOST, 0))
        self.closed_port = int(self._closed.getsockname()[1])
        self.passwords: dict[str, str] = {}
        self.dovecot: subprocess.Popen[bytes] | None = None
        self.introspection: Introspection | None = None
        self.postfix: subprocess.Popen[bytes] | None = None

    # --- the two servers -------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> MailHost:
        """Dovecot first: Postfix's smtpd asks its SASL socket and its LMTP socket takes mail."""
        missing = missing_programs()
        if missing:
            raise RuntimeError(f"missing {', '.join(missing)}: run `make tools` as root (Debian packages)")
        if os.geteuid() != 0:
            raise RuntimeError("Postfix's master and Dovecot must be started as root")
        deadline = time.monotonic() + timeout
        try:
            self._start_dovecot(deadline)
            self._start_postfix(deadline)
        except BaseException:
            self.stop(remove=False)  # the logs stay for whoever reads the error
            raise
        return self

    def _start_dovecot(self, deadline: float) -> None:
        folder = self.root / "dovecot"
        for sub in ("run", "state"):
            (folder / sub).mkdir(parents=True)
        mail = self.root / "mail"
        mail.mkdir()
        owner = pwd.getpwnam(MAIL_USER)
        os.chown(mail, owner.pw_uid, owner.pw_gid)
        self.users_dir.mkdir()
        self.introspection = Introspection(self.cert, self.key, self.ca_file)
        (folder / "oauth2.conf.ext").write_text(self._oauth2_conf(self.introspection.url))
        config = folder / "dovecot.conf"
        config.write_text(self._dovecot_conf(owner))
        # -F: in the foreground, our child; its log goes to log_path, early errors to stderr
        self.dovecot = _spawn([str(DOVECOT), "-F", "-c", str(config)], self.root / "dovecot.stderr")
        sockets = [self.lmtp_socket, self.auth_socket]
        greeting = (self.imap_starttls_port, BANNER)  # after "* OK [CAPABILITY …]"
        self._wait("dovecot", self.dovecot, deadline, greeting, lambda: all(p.exists() for p in sockets))

    def _start_postfix(self, deadline: float) -> None:
        folder = self.root / "postfix"
        for sub in ("etc", "queue", "data"):
            (folder / sub).mkdir(parents=True)
        owner = pwd.getpwnam("postfix")  # its data_directory (the master's lock) is its own
        os.chown(folder / "data", owner.pw_uid, owner.pw_gid)
        (folder / "etc" / "main.cf").write_text(self._main_cf())
        (folder / "etc" / "master.cf").write_text(self._master_cf())
        (folder / "etc" / "bounce.cf").write_text(DELAY_TEMPLATE)
        # start-fg: postfix-script makes the queue's folders (post-install create-missing, the
        # slow part: about 2 s) and runs master in the foreground, a child of ours, not a daemon
        command = [str(POSTFIX), "-c", str(folder / "etc"), "start-fg"]
        self.postfix = _spawn(command, self.root / "postfix.stderr")
        self._wait("postfix", self.postfix, deadline, (self.smtp_port, f"220 {self.hostname} ESMTP"))

    def _wait(
        self,
        name: str,
        process: subprocess.Popen[bytes],
        deadline: float,
        greeting: tuple[int, str],
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        """Until the server is ``ready`` and greets on its port with its own banner (not merely
        "something listens": a port another process took meanwhile must fail here, with logs)."""
        while not (ready() and _greets(*greeting)):
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start\n{self.log()}")
            time.sleep(0.05)

    def stop(self, *, remove: bool = True) -> None:
        """SIGTERM to each master (which passes it on to its children), SIGKILL to whatever is
        left after 10 s; the directory goes unless ``remove`` is false."""
        if self.postfix is not None:
            _stop(self.postfix, self._master_pid())
            self.postfix = None
        if self.dovecot is not None:
            _stop(self.dovecot, self.dovecot.pid)
            self.dovecot = None
        if self.introspection is not None:
            self.introspection.stop()
            self.introspection = None
        self._closed.close()
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)

    def _master_pid(self) -> int | None:
        """Postfix's master (a child of the postfix-script shell we started), once it runs."""
        try:
            return int((self.root / "postfix" / "queue" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def log(self, lines: int = 40) -> str:
        """The tails of both servers' logs, for a failure's message."""
        out = []
        for name in ("postfix.log", "postfix.stderr", "dovecot.log", "dovecot.stderr"):
            path = self.root / name
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {name}\n" + "\n".join(tail))
        return "\n".join(out)

    # --- users and their mailboxes ---------------------------------------------------------

    @property
    def users_dir(self) -> Path:
        """One passwd-file per user: Dovecot rereads a changed passwd-file at most once a
        second, so a user added to a shared one could be unknown for that second."""
        return self.root / "dovecot" / "users"

    @property
    def lmtp_socket(self) -> Path:
        return self.root / "dovecot" / "run" / "lmtp"

    @property
    def auth_socket(self) -> Path:
        return self.root / "dovecot" / "run" / "auth-postfix"

    def add_user(self, name: str, password: str) -> str:
        """A mailbox user, known at once to IMAP, SASL and LMTP; returns its address."""
        if not USER_NAME.fullmatch(name) or ":" in password or "\n" in password:
            raise ValueError(f"bad user name {name!r} (lower case: Dovecot looks up %Ln) or password")
        if name in self.passwords:
            raise ValueError(f"{name} exists")
        self.passwords[name] = password
        entry = self.users_dir / f".{name}.new"
        entry.write_text(f"{name}:{{PLAIN}}{password}::::::\n")
        entry.chmod(0o644)  # read by Dovecot's auth process (user dovecot)
        entry.rename(self.users_dir / name)
        return f"{name}@{self.domain}"

    @contextlib.contextmanager
    def trusting(self, issuer_url: str) -> Iterator[None]:
        """XOAUTH2 and OAUTHBEARER take the tokens the issuer at ``issuer_url`` (an RFC 7662
        introspection endpoint: ``cloud.introspection_url``) calls active, within the block."""
        assert self.introspection is not None, "the mail host is not started"
        with self.introspection.trusting(issuer_url):
            yield

    def ssl_context(self) -> ssl.SSLContext:
        """A client context trusting only the session's test CA."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def imap(self, user: str) -> imaplib.IMAP4_SSL:
        """A logged-in IMAPS connection (the caller logs out)."""
        name = self._name(user)
        connection = imaplib.IMAP4_SSL(HOST, self.imap_port, ssl_context=self.ssl_context(), timeout=10)
        try:
            connection.login(name, self.passwords[name])
        except BaseException:
            connection.shutdown()
            raise
        return connection

    def deliver_raw(self, user: str, data: bytes, folder: str = "INBOX") -> None:
        """Put ``data`` as it is into the user's mailbox (IMAP APPEND): a sample ARF report, say."""
        connection = self.imap(user)
        try:
            status, reply = connection.append(folder, "", imaplib.Time2Internaldate(time.time()), data)
            if status != "OK":
                raise RuntimeError(f"APPEND refused: {reply!r}")
        finally:
            connection.logout()

    def mailbox(self, user: str, folder: str = "INBOX") -> list[bytes]:
        """Every message in the folder, oldest first, as stored (BODY.PEEK: nothing marked seen)."""
        connection = self.imap(user)
        try:
            connection.select(folder, readonly=True)
            status, found = connection.uid("SEARCH", "ALL")
            uids = found[0].split() if status == "OK" and found[0] else []
            messages: list[bytes] = []
            for uid in uids:
                status, parts = connection.uid("FETCH", uid, "(BODY.PEEK[])")
                messages.extend(part[1] for part in parts if isinstance(part, tuple))
            return messages
        finally:
            connection.logout()

    def wait_for_mail(
        self,
        user: str,
        predicate: Callable[[EmailMessage], bool] = lambda _: True,
        timeout: float = 15.0,
    ) -> EmailMessage:
        """The first message of the user's inbox ``predicate`` accepts, polled until ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            for raw in self.mailbox(user):
                message = email.message_from_bytes(raw, _class=EmailMessage, policy=email.policy.default)
                if predicate(message):
                    return message
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching mail for {user} within {timeout}s\n{self.log()}")
            time.sleep(0.2)

    def _name(self, user: str) -> str:
        name, _, domain = user.partition("@")
        if domain and domain != self.domain:
            raise ValueError(f"{user} is not a mailbox of {self.domain}")
        return name

    # --- configuration ---------------------------------------------------------------------

    def _dovecot_conf(self, owner: pwd.struct_passwd) -> str:
        folder = self.root / "dovecot"
        return f"""\
# Written by tests/support/mailhost.py: one Dovecot of the tests' own, nothing system-wide.
base_dir = {folder / "run"}
state_dir = {folder / "state"}
instance_name = {self.root.name}
log_path = {self.root / "dovecot.log"}
hostname = {self.hostname}
login_greeting = {BANNER}
protocols = imap lmtp
listen = {HOST}
ssl = yes
ssl_cert = <{self.cert}
ssl_key = <{self.key}
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = yes
auth_mechanisms = plain login xoauth2 oauthbearer
# no 2 s wait after a wrong password, no growing penalty for 127.0.0.1 after a few: the tests
# fail logins on purpose, and every client (Postfix's SASL included) comes from there
auth_failure_delay = 0
auth_username_format = %Ln
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = {owner.pw_uid}
first_valid_gid = {owner.pw_gid}
mail_location = maildir:~/Maildir
passdb {{
  driver = passwd-file
  args = {self.users_dir}/%Ln
  mechanisms = plain login
}}
# a bearer token is checked by the issuer only; a password never leaves for the endpoint
passdb {{
  driver = oauth2
  args = {folder / "oauth2.conf.ext"}
  mechanisms = xoauth2 oauthbearer
}}
userdb {{
  driver = passwd-file
  args = {self.users_dir}/%Ln
  default_fields = uid={owner.pw_uid} gid={owner.pw_gid} home={self.root / "mail"}/%n
}}
service imap-login {{
  inet_listener imap {{
    address = {HOST}
    port = {self.imap_starttls_port}
  }}
  inet_listener imaps {{
    address = {HOST}
    port = {self.imap_port}
    ssl = yes
  }}
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0666
  }}
}}
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service auth {{
  unix_listener auth-postfix {{
    mode = 0666
  }}
}}
"""

    def _oauth2_conf(self, url: str) -> str:
        """Dovecot's oauth2 passdb: RFC 7662 introspection (POST token=…) of every token, which
        must be active and name the user logging in (``email``, made %Ln like the login name)."""
        return f"""\
# Written by tests/support/mailhost.py
introspection_mode = post
introspection_url = {url}
force_introspection = yes
active_attribute = active
active_value = true
username_attribute = email
username_format = %Ln
tls_ca_cert_file = {self.ca_file}
timeout_msecs = 10000
"""

    def _main_cf(self) -> str:
        folder = self.root / "postfix"
        return f"""\
# Written by tests/support/mailhost.py: one Postfix of the tests' own, nothing system-wide.
compatibility_level = 3.6
queue_directory = {folder / "queue"}
data_directory = {folder / "data"}
maillog_file = {self.root / "postfix.log"}
maillog_file_prefixes = {self.root}
myhostname = {self.hostname}
mydomain = {self.domain}
myorigin = $mydomain
mydestination = $mydomain, $myhostname, localhost
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
virtual_alias_maps = inline:{{ {self.forwarded}={self.forwarded_to} }}
biff = no
# Office 365: every recipient is taken at RCPT (no recipient check at all, not even "the
# transport is error"); an unknown user bounces after, with Dovecot's 550 5.1.1 over LMTP
smtpd_reject_unlisted_recipient = no
local_recipient_maps =
local_transport = lmtp:unix:{self.lmtp_socket}
# the slow domain's server refuses connections (deferred, 4.4.1); nothing leaves the machine
transport_maps = inline:{{ {self.slow_domain}=smtp:[{HOST}]:{self.closed_port} }}
default_transport = error:5.4.4 the test MTA delivers nowhere outside
bounce_template_file = {folder / "etc" / "bounce.cf"}
# submission: STARTTLS required, AUTH offered (Dovecot checks it), loopback may skip AUTH
smtpd_tls_security_level = encrypt
smtpd_tls_cert_file = {self.cert}
smtpd_tls_key_file = {self.key}
smtpd_tls_auth_only = yes
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = {self.auth_socket}
smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination
# DSNs within seconds: a delay notice after 1 s, retries every 1-2 s, given up after
# {GIVE_UP} s (a failed DSN, for mail the slow domain never took)
delay_warning_time = 1s
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
maximal_queue_lifetime = {GIVE_UP}s
bounce_queue_lifetime = {GIVE_UP}s
"""

    def _master_cf(self) -> str:
        services = [
            f"{HOST}:{self.smtp_port} inet n - n - - smtpd",
            "pickup unix n - n 1 1 pickup",  # private, unpriv, chroot, wakeup, maxproc, command
            "cleanup unix n - n - 0 cleanup",
            "qmgr unix n - n 1 1 qmgr",
            "tlsmgr unix - - n 1000? 1 tlsmgr",
            "rewrite unix - - n - - trivial-rewrite",
            "bounce unix - - n - 0 bounce",
            "defer unix - - n - 0 bounce",
            "trace unix - - n - 0 bounce",
            "verify unix - - n - 1 verify",
            "flush unix n - n 1000? 0 flush",
            "proxymap unix - - n - - proxymap",
            "proxywrite unix - - n - 1 proxymap",
            "smtp unix - - n - - smtp",
            "relay unix - - n - - smtp",
            "showq unix n - n - - showq",
            "error unix - - n - - error",
            "retry unix - - n - - error",
            "discard unix - - n - - discard",
            "local unix - n n - - local",
            "lmtp unix - - n - - lmtp",
            "anvil unix - - n - 1 anvil",
            "scache unix - - n - 1 scache",
            "postlog unix-dgram n - n - 1 postlogd",
        ]
        return "# Written by tests/support/mailhost.py\n" + "\n".join(services) + "\n"


# Postfix's own delay notice counts in hours and days ("for more than 0 hour(s)", and warnings in
# the log): the same text in seconds
DELAY_TEMPLATE = """\
delay_template = <<EOF
Charset: us-ascii
From: Mail Delivery System <MAILER-DAEMON>
Subject: Delayed Mail (still being retried)
Postmaster-Subject: Postmaster Warning: Delayed Mail

This is the mail system at host $myhostname.

####################################################################
# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #
####################################################################

Your message could not be delivered for more than $delay_warning_time_seconds second(s).
It will be retried until it is $maximal_queue_lifetime_seconds second(s) old.

                   The mail system
EOF
"""


def _greets(port: int, banner: str) -> bool:
    """Whether the server on ``port`` opens with ``banner`` (SMTP and IMAP speak first)."""
    try:
        with socket.create_connection((HOST, port), timeout=1) as sock:
            return banner.encode() in sock.recv(1024)
    except OSError:
        return False


def _spawn(command: list[str], stderr: Path) -> subprocess.Popen[bytes]:
    """A server in a session of its own (a Ctrl-C in the terminal is pytest's, not its)."""
    with stderr.open("wb") as errors:
        return subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=errors, stderr=errors, start_new_session=True
        )


def _stop(process: subprocess.Popen[bytes], master: int | None, timeout: float = 10.0) -> None:
    """SIGTERM to the master (the process we started unless it is a child of it), SIGKILL to
    both process groups if the process is not gone within ``timeout``."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(master or process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)
    for group in {process.pid, master or process.pid}:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)  # anything of theirs still there
    process.wait(timeout)
