"""CSV output of the demo scenarios and the benchmarks (a leaf module: it imports nothing of the package)."""
import csv


def write_rows(path: str, rows: list[dict], fieldnames: list[str] | None = None) -> None:
    """One CSV line per dict (columns: ``fieldnames``, default the first row's keys; a missing key is empty)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fieldnames or list(rows[0]))
        w.writeheader()
        w.writerows(rows)
