"""The contract lives in the project (docs/contract.md): every "contract §n" the code, the tests
and the pages cite names a section it has, and nothing points at a document outside the
repository. Pure text checks."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONTRACT = ROOT / "docs" / "contract.md"
CITED = re.compile(r"contract §(\d+)((?:, §\d+)*)")


def _sources() -> list[Path]:
    """Every file of the project's own (what git tracks, less the lock and data files)."""
    import subprocess

    tracked = (
        subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
        .stdout.decode()
        .split("\0")
    )
    text = {".py", ".md", ".yaml", ".yml", ".toml", ".html", ".js", ".css", ".sh", ".txt", ".cfg", ""}
    files = [ROOT / name for name in tracked if name and Path(name).suffix in text]
    return [f for f in files if f.is_file() and f.name != "constraints.txt"]


def _sections() -> set[int]:
    return {int(m) for m in re.findall(r"^## (\d+)\. ", CONTRACT.read_text(encoding="utf-8"), re.M)}


def test_every_cited_section_exists() -> None:
    sections = _sections()
    assert sections == set(range(1, max(sections) + 1)), "the contract's sections are numbered 1..n"
    missing = []
    for path in _sources():
        if path == Path(__file__):
            continue
        for match in CITED.finditer(path.read_text(encoding="utf-8")):
            numbers = [int(match.group(1)), *(int(n) for n in re.findall(r"\d+", match.group(2)))]
            missing += [f"{path.relative_to(ROOT)}: §{n}" for n in numbers if n not in sections]
    assert missing == []


def test_nothing_points_outside_the_repository() -> None:
    outside = re.compile(r"DESIGN\.md|DESIGN §|\.\./shared/")
    hits = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in _sources()
        if path != Path(__file__)
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if outside.search(line)
    ]
    assert hits == []


def test_the_checks_would_see_a_bad_citation() -> None:
    text = "see contract §2, §99"
    match = CITED.search(text)
    assert match is not None and re.findall(r"\d+", match.group(2)) == ["99"]
