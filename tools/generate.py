#!/usr/bin/env python
"""Thin script: same as `megalm generate` (logic in megalm.generate)."""
import sys

from megalm.distributed import exit_without_teardown
from megalm.errors import MegalmError
from megalm.generate import main

if __name__ == "__main__":
    try:
        code = main()
    except MegalmError as e:
        print(f"generate: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    exit_without_teardown(code)  # a finished multi-rank run exits with its own code (see there)
