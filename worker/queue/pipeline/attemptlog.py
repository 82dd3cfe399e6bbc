"""The log line of each delivery attempt: ``key=value`` text or, with ``log_format: json``, one
JSON object; never a secret (an outcome carries server replies only)."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from worker.db.vocabulary import history_word

if TYPE_CHECKING:  # delivery.py logs through this module
    from worker.queue.pipeline.delivery import Outcome

log = logging.getLogger("postroom.delivery")


def log_attempt(job_id: str, account: str, attempt: int, outcome: Outcome, seconds: float) -> None:
    """One line per delivery attempt (never a secret: outcomes carry server replies only).

    ``key=value`` text, or one JSON object with ``log_format: json``."""
    if not log.isEnabledFor(logging.INFO):
        return
    fields = {
        "job": job_id,
        "account": account,
        "attempt": attempt,
        "transport": outcome.transport or "-",
        "security": outcome.security or "-",
        "outcome": history_word(outcome.state),
        "code": outcome.code if outcome.code is not None else "-",
        "duration_ms": round(seconds * 1000),
    }
    if outcome.reason:
        fields["reason"] = outcome.reason
    if LOG_FORMAT.json:
        log.info("%s", json.dumps({"event": "delivery", **fields}))
        return
    log.info(
        "delivery job=%s account=%s attempt=%d transport=%s security=%s outcome=%s code=%s duration_ms=%d%s",
        job_id,
        account,
        attempt,
        fields["transport"],
        fields["security"],
        fields["outcome"],
        fields["code"],
        fields["duration_ms"],
        f" reason={outcome.reason!r}" if outcome.reason else "",
    )


class _LogFormat:
    """Set once from the settings by the task layer (delivery.py itself reads no settings)."""

    json = False


LOG_FORMAT = _LogFormat()
