"""Reading a JSON file the user (or a checkpoint) supplied, with an error that names it and the line."""

from __future__ import annotations

import json
from typing import Any

from megalm.errors import MegalmError


def read_json(path: str, error: type = MegalmError, missing: str = "") -> Any:
    """``json.load(path)``; a missing file or bad JSON raises ``error`` naming the path (and ``missing``)."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise error(f"{path} not found{': ' + missing if missing else ''}") from None
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON: line {e.lineno}: {e.msg}") from None
