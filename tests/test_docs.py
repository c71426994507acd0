"""The documentation stays inside the repository: every Markdown link points at a
file of this repository (and, with a #fragment, at a heading of that file) that a
clone has. No link leaves it, to a sibling folder or to the web."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP = {".venv", ".git", "node_modules", ".mypy_cache", ".ruff_cache", ".pytest_cache"}
LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)


def markdown_files() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.md") if not SKIP & set(p.relative_to(ROOT).parts[:-1]))


def anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces as hyphens."""
    out: set[str] = set()
    seen: dict[str, int] = {}
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    for line in text.splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).replace("`", "").lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(path: Path) -> list[str]:
    text = CODE.sub("", path.read_text(encoding="utf-8"))
    return LINK.findall(text)


def test_there_are_docs_to_check() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in markdown_files()}
    assert {"README.md", "docs/protocol.md", "docs/design.md"} <= names
    assert any(links(ROOT / "README.md"))


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_link_stays_in_the_repository(path: Path) -> None:
    for target in links(path):
        assert not re.match(r"[a-z][a-z0-9+.-]*:", target, re.I), (
            f"{path.name}: {target} leaves the repository"
        )
        file_part, _, fragment = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        assert dest.is_relative_to(ROOT), f"{path.name}: {target} leaves the repository"
        assert dest.exists(), f"{path.name}: {target} does not exist in the repository"
        if fragment and dest.suffix == ".md":
            assert fragment in anchors(dest), f"{path.name}: {target}: no such heading"
