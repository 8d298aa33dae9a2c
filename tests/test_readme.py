"""The README's and the docs pages' generated tables match the committed result files, what they reference exists,
their marked snippets run, and the README's first screen is for a newcomer."""
import glob
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL = "pip install --no-build-isolation -e ."


def pages() -> dict[str, str]:
    """README.md and the top-level docs pages (docs/*.md, not the result files below docs/), by path from REPO."""
    names = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
    out = {}
    for name in names:
        with open(os.path.join(REPO, name)) as f:
            out[name] = f.read()
    return out


def readme():
    return pages()["README.md"]


def test_generated_sections_are_up_to_date():
    r = subprocess.run([sys.executable, os.path.join(REPO, "bench", "update_readme.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"run python bench/update_readme.py: {r.stderr}"


def test_the_docs_pages_have_the_generated_sections():
    """Every docs page with generated sections is one update_readme.py fills (a stale table in one would fail)."""
    sys.path.insert(0, os.path.join(REPO, "bench"))
    try:
        import update_readme
    finally:
        sys.path.pop(0)
    with_sections = [name for name, text in pages().items() if "<!-- BEGIN GENERATED:" in text]
    assert "README.md" in with_sections and len(with_sections) >= 3, with_sections
    assert set(with_sections) <= set(update_readme.pages())


def local_links(text: str) -> list[str]:
    """The targets of the page's markdown links and images that are files of the repository (no URL, no anchor)."""
    out = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        target = target.split("#", 1)[0]
        if target and not re.match(r"[a-z]+:", target):
            out.append(target)
    return out


def test_referenced_files_and_make_targets_exist():
    with open(os.path.join(REPO, "Makefile")) as f:
        targets = set(re.findall(r"^([\w-]+):", f.read(), re.M))
    for name, text in pages().items():
        where = os.path.dirname(os.path.join(REPO, name))
        for link in local_links(text):  # links and images: relative to the page
            assert os.path.exists(os.path.join(where, link)), f"{name}: {link}"
        for path in re.findall(r"BEGIN GENERATED: (\S+) ", text):  # relative to the repository (update_readme.py)
            assert os.path.exists(os.path.join(REPO, path)), f"{name}: {path}"
        for target in re.findall(r"`make ([\w-]+)", text) + re.findall(r"^    make ([\w-]+)", text, re.M):
            assert target in targets, f"{name}: make {target}"
        for script in re.findall(r"`(examples/\w+\.py|bench/[\w/]+\.py)`", text):  # commands, run from the root
            assert os.path.exists(os.path.join(REPO, script)), f"{name}: {script}"


def test_the_link_check_sees_a_broken_link():
    assert local_links("![a](../bench/x.png) [b](gpu.md#verify) [c](https://x.org/y) [d](#here)") == \
        ["../bench/x.png", "gpu.md"]


def snippets(text: str | None = None) -> dict[str, str]:
    """The code blocks marked <!-- snippet: NAME --> in the README and the docs pages, by name."""
    texts = [text] if text is not None else list(pages().values())
    found = {}
    for t in texts:
        for name, code in re.findall(r"<!-- snippet: (\w+) -->\n```python\n(.*?)```", t, re.S):
            assert name not in found, f"two snippets named {name!r}"
            found[name] = code
    return found


def test_integration_snippets_run(tmp_path):
    found = snippets()
    assert set(found) >= {"swap_in", "hf", "lightning", "skipstep", "linear_ce", "qkclip"}
    for name, code in found.items():
        # run where a user would (a fresh folder), importing this checkout's stabkernels (built in place or not)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, f"snippet {name!r} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


def check_first_screen(text: str):
    """Within the README's first 60 lines: the install command, `make test`, `make demo` and the swap_in snippet
    (marker, fence and code all inside), a small program that swaps torch.optim.AdamW for a stabkernels optimizer."""
    top = "\n".join(text.split("\n")[:60]) + "\n"
    assert INSTALL in top, "the install command"
    assert re.search(r"^\s*make test\b", top, re.M), "make test"
    assert re.search(r"^\s*make demo\b", top, re.M), "make demo"
    code = snippets(top).get("swap_in")
    assert code is not None, "the swap_in snippet"
    assert "torch.optim.AdamW" in code and "stabkernels.optim." in code and ".step()" in code, code


def test_first_screen_is_for_a_newcomer():
    check_first_screen(readme())
    # and the suite runs it: test_integration_snippets_run executes every snippet that snippets() finds
    assert "swap_in" in snippets()


def test_first_screen_check_is_not_vacuous():
    """The top of the README before the rewrite (issue 29: the two make commands, no install command, no swap-in
    snippet in its first 60 lines) fails the check."""
    old_top = "# stabkernels\n\n## Two commands\n\n    make test      # ...\n    make demo      # ...\n\n" \
              "## What it buys: the learning-rate spike shoot-out\n"
    try:
        check_first_screen(old_top)
    except AssertionError:
        return
    raise AssertionError("the first-screen check passed a README without the install command and swap_in snippet")
