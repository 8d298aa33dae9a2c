"""Shared by the paper-proxy scripts: medians over seeds and the markdown table each writes."""
import os
import statistics


def med(values):
    return statistics.median(values)


def write_md(path: str, title: str, header: list, rows: list) -> str:
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    print(text)
    return text
