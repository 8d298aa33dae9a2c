"""Fills the README's generated sections from the result files they name, so no number there is typed by hand:

    <!-- BEGIN GENERATED: path/to/file.md -->
    ...replaced by the file's content...
    <!-- END GENERATED -->

    python bench/update_readme.py [--check]      (--check: exit 1 if the README is out of date)
"""
import argparse
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATTERN = re.compile(r"(<!-- BEGIN GENERATED: (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- END GENERATED -->)", re.S)


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
    path = os.path.join(ROOT, "README.md")
    with open(path) as f:
        text = f.read()
    new = render(text)
    if args.check:
        return 0 if new == text else 1
    with open(path, "w") as f:
        f.write(new)
    print(f"updated {len(PATTERN.findall(text))} generated sections of README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
