"""Every reference to a section of our docs ("docs/method.md §3.3", "docs/deploy.md", a bare "§6.2" inside a doc,
`docs/reproduce.md "Title"`) names a file and a section of this repository; "spec §" (a file outside it) is refused.
Text only: no import of trip, milliseconds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCANNED = [REPO / "README.md", *(p for d in ("src", "configs", "docs", "tests", "benchmarks")
                                  for p in sorted((REPO / d).rglob("*")) if p.suffix in (".py", ".md", ".yaml"))]
SECTION = r"§\s?(\d+(?:\.\d+)*)"
DOC_REF = re.compile(r"((?:docs/)?[\w-]+\.md)`?,?\s*(?:\(?\"([^\"\n]+)\"|" + SECTION + ")?")
NEXT_SECTION = re.compile(r"\s*(?:,|-|–|and|to)\s*" + SECTION)
BARE_SECTION = re.compile(SECTION)
OUTSIDE = re.compile(r"\bspec\s*§|trip_spec\.md|shared/design")
# a section heading: "## 3. Title", "### 1.2 Title" or a paragraph that opens with "**1.6 Title.**"
HEADING_NUMBER = re.compile(r"^(?:#+\s+|\*\*)(\d+(?:\.\d+)*)\.?(?:\*\*)?\s", re.M)
HEADING_TITLE = re.compile(r"^(?:#+\s+(.+?)\s*$|\s*[*-]?\s*\*\*(.+?)\*\*)", re.M)


def sections(doc: Path) -> set[str]:
    return set(HEADING_NUMBER.findall(doc.read_text()))


def titles(doc: Path) -> set[str]:
    return {(a or b).strip("`:. ") for a, b in HEADING_TITLE.findall(doc.read_text())}


def dangling(rel: str, text: str) -> list[str]:
    """What `text` (of the file `rel`) refers to that does not exist; every "§" must belong to a reference."""
    problems = [f"{rel}: {m.group(0)!r} points outside the repository" for m in OUTSIDE.finditer(text)]
    covered: set[int] = set()

    def check(doc: Path, number: str, start: int, end: int) -> None:
        covered.update(range(start, end))
        if doc.is_file() and number not in sections(doc):
            problems.append(f"{rel}: {doc.relative_to(REPO)} has no §{number}")

    for m in DOC_REF.finditer(text):
        name = m.group(1)
        doc = REPO / (name if "/" in name else f"docs/{name}")
        if not doc.is_file() and (name.startswith("docs/") or m.group(3)):  # not another project's README.md
            problems.append(f"{rel}: {name} does not exist")
        if doc.is_file() and m.group(2) and m.group(2) not in titles(doc):
            problems.append(f"{rel}: {name} has no section titled {m.group(2)!r}")
        if m.group(3):
            check(doc, m.group(3), m.start(3) - 1, m.end())
            end = m.end()
            while n := NEXT_SECTION.match(text, end):
                check(doc, n.group(1), end, n.end())
                end = n.end()
    for m in BARE_SECTION.finditer(text):
        if m.start() in covered:
            continue
        if rel.startswith("docs/"):  # a bare "§N" in a doc is a section of that doc
            check(REPO / rel, m.group(1), m.start(), m.end())
        else:
            problems.append(f"{rel}: {m.group(0)!r} names no doc (write docs/<file>.md §N)")
    return problems


@pytest.mark.parametrize("path", [p for p in SCANNED if p.name != "test_docs.py"],
                         ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_doc_reference_resolves(path):
    assert dangling(path.relative_to(REPO).as_posix(), path.read_text()) == []


def test_dangling_references_are_found():
    text = ("# docs/method.md §1.6, §99 and §3.3-§3.4; spec §11; docs/nowhere.md §1; baselines.md §1.2;\n"
            "# docs/reproduce.md \"No such title\"; docs/deploy.md; §4\n")
    assert dangling("src/x.py", text) == [
        "src/x.py: 'spec §' points outside the repository",
        "src/x.py: docs/method.md has no §99",
        "src/x.py: docs/nowhere.md does not exist",
        "src/x.py: baselines.md does not exist",
        "src/x.py: docs/reproduce.md has no section titled 'No such title'",
        "src/x.py: '§11' names no doc (write docs/<file>.md §N)",
        "src/x.py: '§4' names no doc (write docs/<file>.md §N)",
    ]
    assert dangling("docs/method.md", "as §10.2 says; not §12") == ["docs/method.md: docs/method.md has no §12"]


def test_sections_are_read_from_headings_and_numbered_paragraphs():
    method = sections(REPO / "docs" / "method.md")
    assert {"1", "1.1", "1.6", "3.3", "6.2", "10", "10.2"} <= method and "11" not in method
    assert "What differs from the official code, and why" in titles(REPO / "docs" / "reproduce.md")
