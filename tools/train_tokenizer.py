#!/usr/bin/env python
"""Thin script: same as `megalm train-tokenizer` (logic in megalm.data.train_tokenizer)."""
import sys

from megalm.data.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
