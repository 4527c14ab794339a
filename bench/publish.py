"""Prints a benchmark's result table and appends it to a Markdown file when asked."""
from __future__ import annotations


def publish(lines: list[str], markdown: str | None) -> None:
    text = "\n".join(lines)
    print(text)
    if markdown:
        with open(markdown, "a", encoding="utf-8") as fh:
            fh.write("\n" + text + "\n")
