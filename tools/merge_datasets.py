#!/usr/bin/env python
"""Thin script: same as `megalm merge-datasets` (logic in megalm.data.merge)."""
import sys

from megalm.errors import MegalmError
from megalm.data.merge import main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except MegalmError as e:
        print(f"merge-datasets: error: {e}", file=sys.stderr)
        sys.exit(2)
