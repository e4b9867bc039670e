"""The docs hold together: every relative link and image in README.md, CHANGELOG.md and docs/**/*.md
names a file or folder of the repository (and, for a Markdown file, a heading that exists there); the
README stays short; no page points at material outside the repository. External http(s) links are not
fetched."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").rglob("*.md")])
README_MAX_LINES = 200

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
# [text](target "title") and ![alt](target); the text may hold code spans (already blanked) and brackets
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
HTML_TARGET = re.compile(r"<(?:a|img)\b[^>]*\b(?:href|src)=\"([^\"]+)\"", re.I)


def _prose(text: str) -> str:
    """The page without fenced blocks, code spans and comments (their brackets are not links)."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    text = HTML_COMMENT.sub("", text)
    return CODE_SPAN.sub(lambda m: " " * len(m.group(0)), text)


def links(page: Path) -> list[str]:
    text = _prose(page.read_text(encoding="utf-8"))
    return LINK.findall(text) + REFERENCE_DEF.findall(text) + HTML_TARGET.findall(text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: Markdown marks and punctuation dropped, lower case, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a Markdown page, duplicates numbered as GitHub numbers them."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def problems_of(page: Path, root: Path = ROOT) -> list[str]:
    found = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...: not fetched
            continue
        path_part, _, fragment = target.partition("#")
        path_part = unquote(path_part)
        if path_part.startswith("/"):
            found.append(f"{target}: absolute path (write it relative to the page)")
            continue
        dest = (page.parent / path_part).resolve() if path_part else page
        try:
            rel = dest.relative_to(root)
        except ValueError:
            found.append(f"{target}: outside the repository")
            continue
        if not dest.exists():
            found.append(f"{target}: no such file or folder ({rel.as_posix()})")
            continue
        if fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            found.append(f"{target}: no heading '#{fragment}' in {rel.as_posix()}")
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    found = problems_of(page)
    assert not found, f"{page.relative_to(ROOT)}: broken links:\n  " + "\n  ".join(found)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(ROOT / "README.md")}
    unlinked = [p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*.md") if p.resolve() not in linked]
    assert not unlinked, f"README.md's 'Where to read on' does not link: {unlinked}"


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; the rest belongs under docs/ (at most {README_MAX_LINES})"


def test_no_design_section_references():
    """Code and docs point at docs/architecture.md, not at a design document outside the repository."""
    files = [ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").rglob("*.md"),
             *(ROOT / "vlpgraph").rglob("*.py"), *(ROOT / "app").rglob("*.py")]
    hits = [f"{f.relative_to(ROOT)}:{n}" for f in files
            for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1) if "DESIGN §" in line]
    assert not hits, f"'DESIGN §' references: {hits}"


def test_pages_name_nothing_outside_the_repository():
    """No page sends the reader to files they do not have (a parent folder, the project's own notes)."""
    outside = re.compile(r"\.\./shared|\bDESIGN\.md\b|\bMETHODS\.md\b|/work/")
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()[:80]}" for p in PAGES
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if outside.search(line)]
    assert not hits, "pages that name material outside the repository:\n  " + "\n  ".join(hits)


def test_the_checker_finds_what_it_should(tmp_path):
    """The checker itself: links in code are ignored, broken files and anchors are found."""
    docs = tmp_path / "docs"
    (docs / "app").mkdir(parents=True)
    (docs / "app" / "runs.png").write_bytes(b"")
    (docs / "architecture.md").write_text("# Architecture\n\n## Identity\n")
    page = docs / "probe.md"
    page.write_text("# Title\n\n## A `code` heading (here)\n\n[ok](#a-code-heading-here) [bad](#nope) "
                    "[gone](missing.md) [arch](architecture.md#identity) ![img](app/runs.png) `[not](a-link.md)`\n"
                    "```\n[not](either.md)\n```\n[web](https://example.com/x) [up](../../x.md)\n")
    assert slug("A `code` heading (here)") == "a-code-heading-here"
    assert "a-code-heading-here" in anchors(page)
    assert links(page) == ["#a-code-heading-here", "#nope", "missing.md", "architecture.md#identity",
                           "app/runs.png", "https://example.com/x", "../../x.md"]
    assert problems_of(page, root=tmp_path) == ["#nope: no heading '#nope' in docs/probe.md",
                                                "missing.md: no such file or folder (docs/missing.md)",
                                                "../../x.md: outside the repository"]
