#!/usr/bin/env python3
"""Memory per GPU and the parallel layouts that fit: the same as `megalm plan` (see megalm/plan.py).

    python tools/plan.py configs/gpt_1b.yaml --gpus 64 --gpu-mem 80
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megalm.errors import MegalmError
from megalm.plan import main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except MegalmError as e:
        print(f"plan: error: {e}", file=sys.stderr)
        sys.exit(2)
