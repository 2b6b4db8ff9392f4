"""The docs hold together: every relative link in the README, docs/ and benchmarks/ points to a file that exists
and, where it names a #anchor in a markdown file, to a heading there; the README stays short."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # https:, mailto:, ...


def doc_files() -> list[Path]:
    """The markdown files whose links are checked."""
    files = [ROOT / "README.md", ROOT / "benchmarks" / "RESULTS.md"]
    files += sorted((ROOT / "docs").glob("*.md")) + sorted((ROOT / "benchmarks" / "history").glob("*.md"))
    return [path for path in files if path.exists()]


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, inline code spans removed (links inside code are not links)."""
    lines, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            in_fence = not in_fence
            continue
        if not in_fence:
            lines.append(INLINE_CODE.sub("", line))
    return lines


def heading_anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of a markdown file: lowercased, punctuation but `-` and `_` dropped,
    spaces as hyphens; a repeated heading's anchor gets -1, -2, ..."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for line in prose_lines(path.read_text()):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def broken_links(path: Path) -> list[str]:
    """Each relative link of `path` whose file, or heading, does not exist, as 'target: why'."""
    broken = []
    for line in prose_lines(path.read_text()):
        for target in LINK.findall(line):
            if EXTERNAL.match(target):
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                broken.append(f"{target}: no such file {linked}")
            elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
                broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    return broken


@pytest.mark.parametrize("path", doc_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert broken_links(path) == []


def test_the_checked_files_include_every_docs_page():
    checked = {path.relative_to(ROOT).as_posix() for path in doc_files()}
    assert {"README.md", "benchmarks/RESULTS.md", "docs/architecture.md", "benchmarks/history/README.md"} <= checked


def test_the_checker_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "other.md").write_text("# A heading, with punctuation\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[fine](other.md#a-heading-with-punctuation) [second](other.md#twice-1) [here](#local)\n"
        "## Local\n"
        "[gone](missing.md) [no heading](other.md#nowhere) ![no image](figure.png) [web](https://example.org/x)\n"
        "```\n[in code](also-missing.md)\n```\n"
        "`[inline](code.md)`\n"
    )
    assert broken_links(page) == [
        f"missing.md: no such file {tmp_path / 'missing.md'}",
        "other.md#nowhere: no heading #nowhere in other.md",
        f"figure.png: no such file {tmp_path / 'figure.png'}",
    ]


def test_readme_is_short():
    n_lines = len((ROOT / "README.md").read_text().splitlines())
    assert n_lines <= README_MAX_LINES, f"README.md has {n_lines} lines, at most {README_MAX_LINES}: move text to docs/"
