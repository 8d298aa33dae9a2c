"""The README's generated tables match the committed result files, and what it references exists."""
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme():
    with open(os.path.join(REPO, "README.md")) as f:
        return f.read()


def test_generated_sections_are_up_to_date():
    r = subprocess.run([sys.executable, os.path.join(REPO, "bench", "update_readme.py"), "--check"])
    assert r.returncode == 0, "run python bench/update_readme.py"


def test_referenced_files_and_make_targets_exist():
    text = readme()
    for path in re.findall(r"\]\(([^)]+\.png)\)", text) + re.findall(r"BEGIN GENERATED: (\S+) ", text):
        assert os.path.exists(os.path.join(REPO, path)), path
    with open(os.path.join(REPO, "Makefile")) as f:
        targets = set(re.findall(r"^([\w-]+):", f.read(), re.M))
    for target in re.findall(r"`make ([\w-]+)", text) + re.findall(r"^    make ([\w-]+)", text, re.M):
        assert target in targets, target
    for script in re.findall(r"`(examples/\w+\.py|bench/\w+\.py)`", text):
        assert os.path.exists(os.path.join(REPO, script)), script


def snippets():
    """The README's code blocks marked <!-- snippet: NAME -->, by name."""
    return dict(re.findall(r"<!-- snippet: (\w+) -->\n```python\n(.*?)```", readme(), re.S))


def test_integration_snippets_run(tmp_path):
    found = snippets()
    assert set(found) >= {"hf", "lightning"}
    for name, code in found.items():
        # run where a user would (a fresh folder), importing this checkout's stabkernels (built in place or not)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, f"README snippet {name!r} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
