"""Printing a benchmark's result table, as aligned text or as Markdown for benchmarks/RESULTS.md."""

from __future__ import annotations


def print_table(header: list[str], rows: list[list[str]], markdown: bool, align_right: bool = True) -> None:
    """Print ``rows`` under ``header``: a Markdown table, or columns padded to their widest cell."""
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"a row has {len(row)} cells for the {len(header)} columns {header}: {row}")
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    pad = str.rjust if align_right else str.ljust
    print("  ".join(pad(h, w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(pad(c, w) for c, w in zip(row, widths, strict=True)))
