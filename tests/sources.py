"""The Python files of a source tree, for the tests that scan megalm's own code (imports, collectives,
environment reads, function lengths)."""

from __future__ import annotations

import os
from typing import Iterator


def python_files(directory: str) -> Iterator[str]:
    """Every ``.py`` under ``directory``, in a stable order."""
    for d, subdirs, names in os.walk(directory):
        subdirs.sort()
        for n in sorted(names):
            if n.endswith(".py"):
                yield os.path.join(d, n)
