"""One vocabulary (worker/db/vocabulary.py): the Lua scripts spell no job state and no delivery
counter themselves, they get them through ``vocabulary.lua_words``; no other module defines a
state, an event type or a counter. Pure code analysis (``ast``) over worker/, plus the
substitution itself."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from worker.db.vocabulary import EVENT_TYPES, WINDOW_COUNTERS, JobState, lua_words

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
        lua_words("$counter.nonsense")


VOCABULARY = WORKER / "db" / "vocabulary.py"
OWNED_NAMES = {"JobState", "RecipientState", "EVENT_OF_STATE", "EVENT_OF_REPORT", "EVENT_TYPES",
               "WINDOW_COUNTERS", "SUPPRESSED_FOR", "OPEN_STATES", "FINAL_STATES"}  # fmt: skip


def _code_strings(tree: ast.AST) -> list[ast.Constant]:
    """The string constants of a module that are code, not docstrings."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def _defined(node: ast.AST) -> list[str]:
    if isinstance(node, ast.ClassDef):
        return [node.name]
    targets = (
        node.targets
        if isinstance(node, ast.Assign)
        else [node.target]
        if isinstance(node, ast.AnnAssign)
        else []
    )
    return [t.id for t in targets if isinstance(t, ast.Name)]


def _spellings(text: str, where: str) -> list[str]:
    """Where ``text`` defines a word list the vocabulary owns, or spells an event type in code."""
    tree = ast.parse(text)
    found = [f"{where}:{getattr(node, 'lineno', 0)} defines {name}" for node in ast.walk(tree)
             for name in _defined(node) if name in OWNED_NAMES]  # fmt: skip
    found += [f"{where}:{node.lineno} spells {node.value!r}" for node in _code_strings(tree)
              if node.value in EVENT_TYPES]  # fmt: skip
    return found


def test_only_the_vocabulary_defines_states_events_and_counters() -> None:
    assert len(_spellings(VOCABULARY.read_text(encoding="utf-8"), "vocabulary")) >= len(OWNED_NAMES)
    spelled = [
        line
        for path in sorted(WORKER.rglob("*.py"))
        if path != VOCABULARY
        for line in _spellings(path.read_text(encoding="utf-8"), str(path.relative_to(WORKER.parent)))
    ]
    assert spelled == []


def test_the_vocabulary_scan_sees_a_second_definition() -> None:
    text = (
        'class JobState:\n    """Says job.sent in its docstring: not code."""\n\nEVENTS = ("job.failed",)\n'
    )
    assert _spellings(text, "probe") == ["probe:1 defines JobState", "probe:4 spells 'job.failed'"]
