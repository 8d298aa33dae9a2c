"""The scenarios' CSV output (a leaf module: every scenario imports it, it imports none of them)."""
import csv


def write_rows(path: str, rows: list[dict], fieldnames: list[str] | None = None) -> None:
    """One CSV line per dict (columns: ``fieldnames``, default the first row's keys; a missing key is empty): the
    scenarios' summary.csv files."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fieldnames or list(rows[0]))
        w.writeheader()
        w.writerows(rows)
