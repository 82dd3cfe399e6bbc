"""The API key records as the HTTP app holds them: shared by the /v1 API and the dashboard,
so that neither has to import the other for it."""

from __future__ import annotations

import logging
from pathlib import Path

from worker.records.loader import RecordCache
from worker.settings import api_keys_dir
from worker.settings import config_dir as default_config_dir
from worker.web import apikeys
from worker.web.apikeys import ApiKey

log = logging.getLogger("postroom.http")


class KeyRing:
    """The API key records, read again from disk when one changed (worker/records/loader.py,
    RecordCache)."""

    def __init__(self, config_dir: Path | None, fixed: dict[str, ApiKey] | None = None) -> None:
        self.config_dir = config_dir
        self._fixed = fixed
        self._cache = RecordCache(lambda: [self._folder()], self._load)

    def _folder(self) -> Path:
        return api_keys_dir(self.config_dir or default_config_dir())

    def _load(self) -> dict[str, ApiKey]:
        keys, problems = apikeys.load_api_keys(self.config_dir or default_config_dir())
        for name, found in problems.items():
            for problem in found:
                log.warning("api key %s not loaded: %s", name, problem)
        return keys

    def keys(self, wanted: str = "") -> dict[str, ApiKey]:
        """Every loaded key; read again when a file changed, or at once when ``wanted`` has a
        record not loaded yet."""
        if self._fixed is not None:
            return self._fixed
        keys = self._cache.get()
        if (
            wanted not in keys
            and apikeys.valid_name(wanted)
            and (self._folder() / f"{wanted}.yaml").is_file()
        ):
            keys = self._cache.get(fresh=True)
        return keys
