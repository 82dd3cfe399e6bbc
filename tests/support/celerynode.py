"""celery-node (npm ``celery-node@0.5.9``), the Node.js Celery client, as a producer of Postroom's
jobs: what a Node.js application enqueues with it must reach Postroom's workers on every broker.

It is installed once per machine into ``~/.cache/postroom-tests/celery-node`` (npm; reused when
present) and driven by ``celerynode_publish.js``, which publishes with celery-node's own Client
(``createClient(broker, backend, queue)``, ``sendTask(name, args, kwargs, id)``) and waits for
every publish. A publish celery-node cannot make (RabbitMQ refusing its queue declaration, which
has no arguments, with a 406) raises :class:`PublishError` carrying the error.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

VERSION = "0.5.9"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "postroom-tests" / "celery-node"
SCRIPT = Path(__file__).with_name("celerynode_publish.js")


class PublishError(RuntimeError):
    """celery-node exited non-zero: its error (stderr) is the message."""


def _installed() -> bool:
    package = CACHE / "node_modules" / "celery-node" / "package.json"
    return package.is_file() and json.loads(package.read_text()).get("version") == VERSION


def install() -> Path:
    """The ``node_modules`` folder holding celery-node, installed by npm the first time."""
    if not _installed():
        npm = shutil.which("npm")
        assert npm, "npm not found: the celery-node tests need Node.js and npm (apt-get install nodejs npm)"
        CACHE.mkdir(parents=True, exist_ok=True)
        with (CACHE / ".lock").open("w") as lock:  # one install at a time on this machine
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not _installed():
                args = ["install", "--prefix", str(CACHE), "--no-audit", "--no-fund", "--no-package-lock"]
                done = subprocess.run(
                    [npm, *args, f"celery-node@{VERSION}"],
                    capture_output=True,
                    text=True,
                    timeout=600,
                    check=False,
                )
                failed = f"npm install celery-node@{VERSION} failed ({done.returncode})"
                assert done.returncode == 0 and _installed(), f"{failed}:\n{done.stdout}\n{done.stderr}"
    return CACHE / "node_modules"


def publish(broker_url: str, tasks: list[dict[str, Any]], queue: str = "postroom") -> None:
    """Publish ``tasks`` (``{"name": "postroom.send", "id": ..., "kwargs": {...}}``, ``args``
    optional) to ``queue`` on ``broker_url`` (``redis://…/N`` or ``amqp://…/VHOST``) with
    celery-node; returns once every publish completed, raises :class:`PublishError` otherwise."""
    node = shutil.which("node")
    assert node, "node not found: the celery-node tests need Node.js (apt-get install nodejs)"
    modules = install()
    done = subprocess.run(
        [node, str(SCRIPT)],
        input=json.dumps({"broker": broker_url, "queue": queue, "tasks": tasks}),
        env={**os.environ, "NODE_PATH": str(modules)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise PublishError(done.stderr.strip() or f"celery-node exited {done.returncode}")
