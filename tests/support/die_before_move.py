"""The bounce reader killed in its worst moment, from the test side only:
``celery worker -I support.die_before_move``.

The process is SIGKILLed (as the OOM killer would) right after it wrote a report to its job and
before it moved the report out of the folder: the window in which a crash could apply a bounce
twice. Each kill is first appended to the file named by ``POSTROOM_TEST_KILL_LOG``.
"""

from __future__ import annotations

import os
import signal

from worker.transports.mailbox import ImapMailbox


def _move(self: ImapMailbox, uid: str, folder: str) -> None:
    with open(os.environ["POSTROOM_TEST_KILL_LOG"], "a") as out:
        out.write(f"{os.getpid()} {uid}\n")
    os.kill(os.getpid(), signal.SIGKILL)


ImapMailbox.move = _move  # type: ignore[method-assign]
