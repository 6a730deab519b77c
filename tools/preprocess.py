#!/usr/bin/env python
"""Thin script: same as `megalm preprocess` (logic in megalm.data.preprocess)."""
import sys

from megalm.errors import MegalmError
from megalm.data.preprocess import main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except MegalmError as e:
        print(f"preprocess: error: {e}", file=sys.stderr)
        sys.exit(2)
