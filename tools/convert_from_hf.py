#!/usr/bin/env python
"""Thin script: same as `megalm convert-from-hf` (logic in megalm.hf.import_hf)."""
import sys

from megalm.errors import MegalmError
from megalm.hf.import_hf import main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except MegalmError as e:
        print(f"convert_from_hf: error: {e}", file=sys.stderr)
        sys.exit(2)
