"""Every import is declared (pyproject.toml): worker/'s as runtime dependencies, tests/' and
bench/'s as runtime or dev ones. A package that only arrives with another (idna with httpx,
hypothesis with schemathesis) goes the day that other drops it; deptry finds such imports."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPTRY = str(Path(sys.executable).with_name("deptry"))


def deptry(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DEPTRY, *args, "--config", str(ROOT / "pyproject.toml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )


@pytest.mark.parametrize(
    ("roots", "ignored"),
    [
        (["worker"], []),  # missing, transitive, a dev extra imported by the code: all refused
        (["tests", "bench"], ["--ignore", "DEP002,DEP004"]),  # tests may use the dev extras
    ],
)
def test_every_import_is_a_declared_dependency(roots: list[str], ignored: list[str]) -> None:
    done = deptry(*roots, *ignored)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_check_fails_on_an_undeclared_import(tmp_path: Path) -> None:
    """The checker is not a no-op: an import of something only another package brings fails it."""
    (tmp_path / "sneaky.py").write_text("import certifi\nimport worker\n")
    done = deptry(str(tmp_path), "--known-first-party", "worker", "--ignore", "DEP002")
    said = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout + done.stderr)
    assert done.returncode == 1 and "DEP003 'certifi' imported but it is a transitive dependency" in said
