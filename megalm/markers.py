"""Generated sections of docs: replace the text between two HTML-comment markers.

The README's config reference and docs/migrating.md's flag map are written from code this way, and
their tests check the files are fresh.
"""

from __future__ import annotations


def replace_between(text: str, start: str, end: str, body: str) -> str:
    """``text`` with what lies between ``start`` and ``end`` replaced by ``body`` (markers kept)."""
    if start not in text or end not in text:
        raise ValueError(f"markers {start} / {end} not found")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"
