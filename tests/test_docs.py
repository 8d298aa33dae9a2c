"""The repository carries its own specification: every "SPEC x.y" (or "docs/spec.md x.y") cited in the code, the
tests, the benchmarks, the examples, the README and the other docs names a section that exists in docs/spec.md,
and the design documents the code points to exist."""
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parent.parent
SPEC = REPO / "docs" / "spec.md"

SOURCES = ["stabkernels", "csrc", "tests", "bench", "examples", "docs", "README.md", "CONTRIBUTING.md"]
SUFFIXES = {".py", ".cpp", ".h", ".cu", ".cuh", ".md"}
SECTION = r"\d+(?:\.\d+)?"
# "SPEC 2.4", "SPEC 2.4, 3.1", "SPEC 2.4 and 3.1", "docs/spec.md 3.4"
CITATION = re.compile(r"(?:\bSPEC\b|docs/spec\.md)(?=(?P<rest>[^\n]*))")
LIST = re.compile(rf"\s*(?P<first>{SECTION})(?P<more>(?:\s*(?:,|and)\s*{SECTION})*)")


def spec_sections(text: str | None = None) -> set[str]:
    """The numbers of docs/spec.md's headings ("## 1. ...", "### 1.1 ...")."""
    text = SPEC.read_text() if text is None else text
    return set(re.findall(r"^#{2,4}\s+(\d+(?:\.\d+)*)\.?\s", text, re.M))


def files():
    for name in SOURCES:
        path = REPO / name
        if path.is_file():
            yield path
        elif path.is_dir():
            for p in sorted(path.rglob("*")):
                if p.suffix in SUFFIXES and p.is_file() and p != SPEC and p.name != "test_docs.py" \
                        and ".venv" not in p.parts and "build" not in p.parts:
                    yield p


def citations(text: str) -> list[tuple[int, str | None]]:
    """(line, section) of every citation in ``text``; section None for a "SPEC" that names no section."""
    out = []
    for m in CITATION.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        if m.group(0).startswith("docs/spec.md") and not re.match(rf"\s*{SECTION}", m.group("rest")):
            continue  # the file named as a whole ("see docs/spec.md")
        if re.match(r"\s*x\.y\b", m.group("rest")):
            continue  # the convention itself, written out ("SPEC x.y")
        lst = LIST.match(m.group("rest"))
        if lst is None:
            out.append((line, None))
            continue
        out.append((line, lst.group("first")))
        out.extend((line, s) for s in re.findall(SECTION, lst.group("more")))
    return out


def unresolved(sections: set[str]) -> list[str]:
    bad = []
    for path in files():
        for line, section in citations(path.read_text(errors="replace")):
            if section not in sections:
                bad.append(f"{path.relative_to(REPO)}:{line}: SPEC {section or '(no section)'}")
    return bad


def test_every_spec_reference_resolves():
    found = [c for p in files() for c in citations(p.read_text(errors="replace"))]
    assert len(found) >= 60  # the code cites the spec throughout; a broken scan finds nothing
    assert not unresolved(spec_sections()), "\n".join(unresolved(spec_sections()))


def test_citation_parsing():
    text = "x (SPEC 2.4, 3.1). y (SPEC 3.3, 4): z SPEC 3.1 step 3 and SPEC 2.4 and 3.1; docs/spec.md 3.4 steps 2-3\n" \
           "see the README and SPEC): see docs/spec.md. Cite it as SPEC x.y."
    assert [s for _, s in citations(text)] == ["2.4", "3.1", "3.3", "4", "3.1", "2.4", "3.1", "3.4", None]


def test_a_removed_section_is_caught():
    """Dropping a cited heading from the spec makes the check fail, naming the citations."""
    text = SPEC.read_text()
    without = re.sub(r"^### 3\.4 .*$", "", text, flags=re.M)
    assert without != text
    bad = unresolved(spec_sections(without))
    assert any("stabkernels/triton/directional.py" in b and "3.4" in b for b in bad), bad


def test_spec_numbering_is_complete():
    sections = spec_sections()
    assert {str(i) for i in range(1, 8)} <= sections
    for s in sections:  # every subsection has its parent
        assert s.split(".")[0] in sections, s


def test_design_documents_exist():
    for doc in ("docs/spec.md", "docs/architecture.md", "docs/gpu-without-a-gpu.md", "CONTRIBUTING.md"):
        assert (REPO / doc).is_file(), doc
    for path in files():  # every docs/*.md a source names exists
        for doc in re.findall(r"\bdocs/[\w-]+\.md\b", path.read_text(errors="replace")):
            assert (REPO / doc).is_file(), f"{path.relative_to(REPO)} names {doc}"
