"""The API key records as the HTTP app holds them: shared by the /v1 API and the dashboard,
so that neither has to import the other for it."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from worker.queue.process.runtime import RECORDS_RECHECK_SECONDS
from worker.settings import config_dir as default_config_dir
from worker.web import apikeys
from worker.web.apikeys import ApiKey

log = logging.getLogger("postroom.http")


class KeyRing:
    """The API key records, read again from disk every couple of seconds."""

    def __init__(self, config_dir: Path | None, fixed: dict[str, ApiKey] | None = None) -> None:
        self.config_dir = config_dir
        self._keys = fixed
        self._fixed = fixed is not None
        self._loaded_at = 0.0
        self._lock = threading.Lock()

    def keys(self, wanted: str = "") -> dict[str, ApiKey]:
        """Every loaded key; read again when stale, or when ``wanted`` has a record not loaded yet."""
        if self._fixed and self._keys is not None:
            return self._keys
        with self._lock:
            now = time.monotonic()
            folder = (self.config_dir or default_config_dir()) / "api-keys"
            new = (
                self._keys is not None
                and wanted not in self._keys
                and apikeys.valid_name(wanted)
                and (folder / f"{wanted}.yaml").is_file()
            )
            if new or self._keys is None or now - self._loaded_at > RECORDS_RECHECK_SECONDS:
                keys, problems = apikeys.load_api_keys(self.config_dir or default_config_dir())
                for name, found in problems.items():
                    for problem in found:
                        log.warning("api key %s not loaded: %s", name, problem)
                self._keys, self._loaded_at = keys, now
            return self._keys
