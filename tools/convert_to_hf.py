#!/usr/bin/env python
"""Thin script: same as `megalm convert-to-hf` (logic in megalm.hf.export)."""
import sys

from megalm.errors import MegalmError
from megalm.hf.export import main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except MegalmError as e:
        print(f"convert_to_hf: error: {e}", file=sys.stderr)
        sys.exit(2)
