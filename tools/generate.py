#!/usr/bin/env python
"""Thin script: same as `megalm generate` (logic in megalm.generate)."""
import sys

from megalm.errors import MegalmError
from megalm.generate import main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except MegalmError as e:
        print(f"generate: error: {e}", file=sys.stderr)
        sys.exit(2)
