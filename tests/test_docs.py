"""README.md and docs/*.md hold together: every relative link reaches a file, every #anchor a heading (GitHub's
slugs), every docs page is linked from the README, and the README stays a ten-minute read."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 260
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`+[^`\n]*`+")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lowercase, punctuation (not '-' or '_') dropped,
    spaces to '-'."""
    text = LINK.sub(lambda m: m.group(0)[1:m.group(0).index("](")], heading)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def prose(text: str) -> list[str]:
    """The lines outside fenced code blocks, code spans blanked (their brackets are not links)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(CODE_SPAN.sub("code", line))
    return lines


def anchors(text: str) -> set[str]:
    """Every heading's anchor; the n-th repeat of a slug gets '-n' as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose(text):
        match = re.match(r"#{1,6} (.*)", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(page: Path) -> list[str]:
    """The links of `page` whose file or anchor does not exist."""
    broken = []
    for line in prose(page.read_text()):
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not checked offline
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(target)
            elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
                broken.append(target)
    return broken


def test_slugs_follow_githubs_rules():
    assert slug("The seed paper's variants (Pascal et al., arXiv 2109.11678)") == (
        "the-seed-papers-variants-pascal-et-al-arxiv-210911678")
    assert slug("Sweeps on a cluster, and searching the learning rate") == (
        "sweeps-on-a-cluster-and-searching-the-learning-rate")
    assert slug("Speed: mixed precision, compiled steps, data on the GPU") == (
        "speed-mixed-precision-compiled-steps-data-on-the-gpu")
    assert slug("`trainer.eval_every` and [Δm%](x.md)") == "trainereval_every-and-δm"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n### A\n") == {"a", "a-1", "a-2"}


def test_a_broken_link_or_anchor_is_found(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n## Part two\n")
    page = tmp_path / "page.md"
    page.write_text("# Title\n[ok](other.md#part-two) [ok](#title) [bad](missing.md) [bad](other.md#part-3)\n"
                    "[bad](#nowhere) `[code](missing.md)` [web](https://example.org/x)\n")
    assert broken_links(page) == ["missing.md", "other.md#part-3", "#nowhere"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_and_anchor_resolves(page):
    assert broken_links(page) == []


def test_the_readme_links_every_docs_page_and_stays_short():
    readme = (REPO / "README.md").read_text()
    linked = {target.partition("#")[0] for line in prose(readme) for target in LINK.findall(line)}
    assert {f"docs/{p.name}" for p in PAGES[1:]} <= linked
    assert {p.name for p in PAGES[1:]} >= {
        "strategies.md", "data.md", "models.md", "experiments.md", "operations.md", "performance.md"}
    assert len(readme.splitlines()) <= README_MAX_LINES
    assert "make run " in readme and "make test " in readme  # the Quick start's two commands
