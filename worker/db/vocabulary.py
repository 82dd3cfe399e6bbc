"""Postroom's one vocabulary: the words a job record, its history, its recipients' results, the
delivery counters and the webhook events use, and how each follows from a job's state
(contract §2, §8, §10). Every other module, and every Lua script (through :func:`lua_words`),
takes its words from here; none spells them itself.

"failed" means one thing: *did not go, and will not by itself*. A job that ended so is ``dead``;
its webhook event is ``job.failed`` and it counts under ``failed`` (the contract's name for the
count of dead jobs in ``postroom status``, beside ``dead``); a recipient the server refused for
good is ``failed``. What may still go is ``retrying`` (history ``retry``, event
``job.deferred``) and, for a recipient, ``deferred``.

Pure code: no import from the rest of the package, so every room may use it.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Final, Literal


class JobState(StrEnum):
    """A job's state as its record, ``postroom job --json``, the HTTP API and the dashboard spell
    it (contract §2). A StrEnum: each member is its string, in Redis and in JSON alike."""

    QUEUED = "queued"
    SCHEDULED = "scheduled"  # waiting for its send_at in Postroom's delay queue
    SENDING = "sending"
    RETRYING = "retrying"
    HELD = "held"  # its account's circuit breaker is open; released when it closes
    SENT = "sent"
    DEAD = "dead"
    SUPPRESSED = "suppressed"
    CANCELLED = "cancelled"  # postroom cancel / DELETE /v1/jobs/{id} before it was sent


OPEN_STATES = frozenset(
    {JobState.QUEUED, JobState.SCHEDULED, JobState.SENDING, JobState.RETRYING, JobState.HELD}
)
FINAL_STATES = frozenset(JobState) - OPEN_STATES

# What an attempt at a job that had already ended (cancelled, sent by another) did: nothing.
Skipped = Literal["skipped"]
SKIPPED: Final[Skipped] = "skipped"


def history_word(state: JobState) -> str:
    """An attempt's end as its history entry and the delivery log line spell it: the state it
    left the job in, ``retrying`` written ``retry`` (as every release has written it)."""
    return "retry" if state == JobState.RETRYING else str(state)


class RecipientState(StrEnum):
    """One recipient's result in a job's record (``recipients {address: {status, …}}``)."""

    SENT = "sent"  # the server accepted it
    DEFERRED = "deferred"  # refused for now: the job retries it
    FAILED = "failed"  # refused for good
    SUPPRESSED = "suppressed"  # on the account's suppression list: never offered
    # after the server took it, a delivery report in the account's mailbox said (contract §11):
    BOUNCED = "bounced"  # it could not be delivered (a 5.x.x DSN, or a bounce in another format)
    COMPLAINED = "complained"  # its reader marked it as spam (an ARF complaint)


# The webhook event a state change files, by the state the job is left in (others file none).
EVENT_OF_STATE: dict[str, str] = {  # JobState keys: a StrEnum member is its string
    JobState.SENT: "job.sent",
    JobState.RETRYING: "job.deferred",
    JobState.DEAD: "job.failed",
    JobState.SUPPRESSED: "job.suppressed",
    JobState.CANCELLED: "job.cancelled",
}
# The webhook event a delivery report files, by what it says of a recipient; the job's state
# stays as it was (it was sent: what happened after the 250 is the recipient's).
EVENT_OF_REPORT: dict[str, str] = {
    RecipientState.BOUNCED: "job.bounced",
    RecipientState.COMPLAINED: "job.complained",
}
EVENT_TYPES = (*EVENT_OF_STATE.values(), *EVENT_OF_REPORT.values())  # what a webhook may ask for
# Why a delivery report put an address on the account's suppression list.
SUPPRESSED_FOR: dict[str, str] = {
    RecipientState.BOUNCED: "hard_bounce",
    RecipientState.COMPLAINED: "complaint",
}

# An account's delivery counters (per minute and per hour; `postroom status`, the dashboard).
WINDOW_COUNTERS = ("sent", "failed", "retried", "dead", "suppressed", "bounced", "complained")


def counted_as(counter: str | None) -> list[str]:
    """The window counters an attempt's end adds one to: a dead job counts ``dead`` and
    ``failed`` (the same jobs, under the contract's two names)."""
    if not counter:
        return []
    return ["dead", "failed"] if counter == JobState.DEAD else [counter]


_LUA_WORD = re.compile(r"\$(state|counter)\.([a-z_]+)")


def lua_words(script: str) -> str:
    """``script`` with each ``$state.<name>`` (a :class:`JobState`) and ``$counter.<name>`` (one
    of :data:`WINDOW_COUNTERS`) written as that word, quoted: the Lua scripts spell no state or
    counter themselves. A name neither knows fails at import."""

    def word(match: re.Match[str]) -> str:
        kind, name = match.groups()
        if kind == "state":
            return f"'{JobState(name).value}'"
        if name not in WINDOW_COUNTERS:
            raise ValueError(f"no delivery counter named {name!r}")
        return f"'{name}'"

    return _LUA_WORD.sub(word, script)
