"""One vocabulary: the Lua scripts spell no job state and no delivery counter themselves; they
get them from ``JobState`` and the counters' list through ``jobrecord.lua_words``. Pure code
analysis (``ast``) over worker/, plus the substitution itself."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from worker.ops.counters import WINDOW_COUNTERS
from worker.queue.store.jobrecord import JobState, lua_words

WORKER = Path(__file__).resolve().parent.parent / "worker"
WORDS = "|".join(sorted({*JobState, *WINDOW_COUNTERS}))
SPELLED = re.compile(rf"""(['"])({WORDS})\1""")
# Webhook delivery statistics (worker/queue/events/outbox.py) count their own "failed" attempts: a
# word of the webhooks' vocabulary, not a job's.
NOT_A_JOB_WORD = re.compile(r"HINCRBY', KEYS\[4\], 'failed'")


def _lua_sources() -> list[tuple[str, str]]:
    found = []
    for path in sorted(WORKER.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and "redis.call(" in node.value:
                found.append((f"{path.relative_to(WORKER.parent)}:{node.lineno}", node.value))
    return found


def test_no_lua_script_spells_a_state_or_a_counter() -> None:
    sources = _lua_sources()
    assert len(sources) > 10  # the scan sees the scripts
    spelled = [
        f"{where}: {line.strip()}"
        for where, text in sources
        for line in text.splitlines()
        if SPELLED.search(NOT_A_JOB_WORD.sub("", line))
    ]
    assert spelled == []


def test_the_scan_would_see_a_spelled_state() -> None:
    assert SPELLED.search("redis.call('HSET', KEYS[1], 'state', 'queued')")
    assert not SPELLED.search("redis.call('HSET', KEYS[1], 'state', $state.queued)")


def test_lua_words_writes_the_enum_and_refuses_what_it_does_not_know() -> None:
    assert (
        lua_words("if s == $state.cancelled then x($counter.dead) end")
        == "if s == 'cancelled' then x('dead') end"
    )
    with pytest.raises(ValueError):
        lua_words("$state.failed")  # not a job state: "failed" is a counter
    with pytest.raises(ValueError):
        lua_words("$counter.bounced")
