"""A poison message, injected from the test side only: ``celery worker -I support.poison``.

Only a test worker imports this module (importing it anywhere else would make
that process die on the marker too).

A payload whose subject contains :data:`MARKER` kills the worker process
(SIGKILL, as a segfault or the OOM killer would) the moment the worker
validates it — before Postroom has counted an attempt for it, and whether it
is the task's own message or one carried along with it (worker/queue/pipeline/dispatch.py).
Each kill is first appended to the file named by ``POSTROOM_TEST_POISON_LOG``.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from worker.mail.payload import SendPayload

MARKER = os.environ.get("POSTROOM_TEST_POISON_MARKER", "POISON-PILL")
_original = SendPayload.model_validate.__func__  # type: ignore[attr-defined]


def _model_validate(cls: type[SendPayload], obj: Any, *args: Any, **kwargs: Any) -> SendPayload:
    if isinstance(obj, dict) and MARKER in str(obj.get("subject", "")):
        log = os.environ.get("POSTROOM_TEST_POISON_LOG")
        if log:
            with open(log, "a") as out:
                out.write(f"{os.getpid()}\n")
        os.kill(os.getpid(), signal.SIGKILL)
    return _original(cls, obj, *args, **kwargs)  # type: ignore[no-any-return]


SendPayload.model_validate = classmethod(_model_validate)  # type: ignore[method-assign,assignment]
