"""The docs resolve in a clone: every "docs/spec.md §N" names a section of docs/spec.md, and every relative
link of the Markdown files names a file (and heading) that exists."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "docs" / "spec.md"
# Pages other branches are writing: a link to one is checked once the page exists.
PENDING = {"docs/gpu.md", "docs/push.md", "docs/bin-inputs.md"}
CITING = ("resta_fast", "tests", "csrc", "benchmarks", "docs")
CITATION = re.compile(r"docs/spec\.md §(\d+)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# The old citations of a contract file outside the repository (spelled in two parts so this file is not one).
OUTSIDE = ("SPEC" + " §", "shared/" + "SPEC.md")


def spec_sections() -> set[str]:
    """The numbers of docs/spec.md's "## N. Title" sections."""
    return set(re.findall(r"^## (\d+)\. ", SPEC.read_text(encoding="utf-8"), flags=re.M))


def cited_sections() -> dict[str, set[str]]:
    """Each file that cites the contract, with the section numbers it cites (``§2-3`` cites 2 and 3)."""
    files = [REPO / "README.md", REPO / "ARCHITECTURE.md", REPO / "CONTRIBUTING.md", REPO / "setup.py"]
    for top in CITING:
        files += [f for f in (REPO / top).rglob("*") if f.suffix in (".py", ".cpp", ".h", ".md", ".sh")]
    cited = {}
    for f in files:
        text = f.read_text(encoding="utf-8")
        found = set(CITATION.findall(text))
        found |= {
            str(n) for lo, hi in re.findall(r"docs/spec\.md §(\d+)-(\d+)", text) for n in range(int(lo), int(hi) + 1)
        }
        if found:
            cited[f.relative_to(REPO).as_posix()] = found
    return cited


def anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lowercase, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # no headings in code blocks
    return {anchor(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def markdown_pages() -> list[Path]:
    return [
        REPO / "README.md",
        REPO / "ARCHITECTURE.md",
        REPO / "CONTRIBUTING.md",
        *sorted((REPO / "docs").glob("*.md")),
    ]


def test_every_spec_citation_names_a_section():
    sections = spec_sections()
    wrong = {f: sorted(n - sections) for f, n in cited_sections().items() if n - sections}
    assert not wrong, f"these cite sections docs/spec.md does not have (it has {sorted(sections)}): {wrong}"


def test_nothing_cites_the_contract_outside_the_repository():
    outside = [
        f"{f.relative_to(REPO)}:{i}"
        for top in CITING
        for f in (REPO / top).rglob("*")
        if f.suffix in (".py", ".cpp", ".h", ".md", ".sh")
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1)
        if any(old in line for old in OUTSIDE)
    ]
    outside += [
        p.name
        for p in markdown_pages() + [REPO / "setup.py"]
        if any(old in p.read_text(encoding="utf-8") for old in OUTSIDE)
    ]
    assert not outside, f"cite docs/spec.md §N instead of the SPEC outside the repository: {outside}"


def test_the_citations_are_read():
    cited = cited_sections()
    assert {"1", "2", "3", "4", "5"} <= spec_sections()
    assert "3" in cited["resta_fast/rng.py"] and {"2", "3"} <= cited["csrc/patch.cpp"]


def test_every_relative_link_resolves():
    broken = []
    for page in markdown_pages():
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, fragment = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            rel = dest.relative_to(REPO).as_posix() if dest.is_relative_to(REPO) else str(dest)
            if not dest.exists():
                if rel not in PENDING:
                    broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, f"links that do not resolve: {broken}"
