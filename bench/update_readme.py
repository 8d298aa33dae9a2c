"""Fills the generated sections of README.md and of the top-level docs pages (docs/*.md) from the result files
they name, so no number there is typed by hand:

    <!-- BEGIN GENERATED: path/to/file.md -->
    ...replaced by the file's content...
    <!-- END GENERATED -->

The path is relative to the repository root on every page (README.md and docs/*.md alike). The result files
under docs/demo/ and bench/results/ are sources, never filled.

    python bench/update_readme.py [--check]      (--check: exit 1 if any page is out of date, naming it)
"""
import argparse
import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATTERN = re.compile(r"(<!-- BEGIN GENERATED: (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- END GENERATED -->)", re.S)


def pages() -> list[str]:
    """The pages with generated sections may live in, relative to ROOT: README.md and docs/*.md (not below)."""
    docs = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
    return ["README.md"] + docs


def render(text: str) -> str:
    def fill(m):
        with open(os.path.join(ROOT, m.group("path"))) as f:
            content = f.read()
        return m.group(1) + content.rstrip("\n") + "\n" + m.group(4)

    return PATTERN.sub(fill, text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    stale = []
    for name in pages():
        path = os.path.join(ROOT, name)
        with open(path) as f:
            text = f.read()
        new = render(text)
        if new != text:
            stale.append(name)
            if not args.check:
                with open(path, "w") as f:
                    f.write(new)
        if not args.check and PATTERN.search(text):
            print(f"updated {len(PATTERN.findall(text))} generated sections of {name}")
    if args.check:
        if stale:
            print("out of date (run python bench/update_readme.py): " + ", ".join(stale), file=sys.stderr)
        return 1 if stale else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
