#!/usr/bin/env python
"""Thin script: same as `megalm train-tokenizer` (logic in megalm.data.train_tokenizer)."""
import sys

from megalm.errors import MegalmError
from megalm.data.train_tokenizer import main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except MegalmError as e:
        print(f"train-tokenizer: error: {e}", file=sys.stderr)
        sys.exit(2)
