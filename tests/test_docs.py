"""The docs site builds with ``mkdocs build --strict`` (``make test`` runs this file), so a
broken link, a missing anchor or a page left out of the nav fails the suite; and the README's
links lead to files that exist."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def build(root: Path, site: Path) -> subprocess.CompletedProcess[str]:
    """``mkdocs build --strict`` of the site whose mkdocs.yml is in ``root``, into ``site``."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # material's end-of-life notice, not ours
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-f",
            str(root / "mkdocs.yml"),
            "-d",
            str(site),
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_docs_site_builds_strict(tmp_path: Path) -> None:
    done = build(REPO, tmp_path / "site")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "contract" / "index.html").is_file()


def test_a_broken_link_a_missing_anchor_or_a_page_outside_the_nav_fails_the_build(tmp_path: Path) -> None:
    """The check above can fail: the same site with each kind of mistake does not build."""
    root = tmp_path / "copy"
    root.mkdir()
    shutil.copy(REPO / "mkdocs.yml", root / "mkdocs.yml")
    shutil.copytree(REPO / "docs", root / "docs")
    with (root / "docs" / "index.md").open("a") as index:
        index.write("\n[gone](no-such-page.md) and [no anchor](jobs.md#no-such-heading)\n")
    (root / "docs" / "stray.md").write_text("# A page nobody put in the nav\n")
    done = build(root, tmp_path / "site")
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "no-such-page.md" in output
    assert "#no-such-heading" in output
    assert "stray.md" in output


def test_every_relative_link_in_the_readme_and_architecture_leads_to_a_file() -> None:
    missing = []
    for name in ("README.md", "ARCHITECTURE.md"):
        for target in re.findall(r"\]\(([^)\s]+)\)", (REPO / name).read_text()):
            if "://" in target or target.startswith(("#", "mailto:")):
                continue
            if not (REPO / target.split("#")[0]).exists():
                missing.append(f"{name}: {target}")
    assert not missing, missing
