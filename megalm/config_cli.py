"""``megalm config show``: print the fully resolved config and its DeepSpeed JSON."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from megalm import config as C
from megalm.errors import ConfigError


START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def replace_reference(text: str, table: str) -> str:
    """The README with its generated config table replaced (kept in sync by a test)."""
    from megalm.markers import replace_between

    return replace_between(text, START, END, table)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="megalm config")
    sub = parser.add_subparsers(dest="action", required=True)
    show = sub.add_parser("show", help="print the resolved config and the DeepSpeed JSON")
    show.add_argument("config", nargs="?", help="YAML config (default: built-in defaults)")
    show.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    show.add_argument("--ds-config", help="a DeepSpeed JSON to fold in and check")
    show.add_argument("--world-size", type=int, default=None,
                      help="ranks to derive the DeepSpeed batch settings for (default: tensor x pipeline)")
    ref = sub.add_parser("reference", help="print the config reference as a Markdown table")
    ref.add_argument("--write", metavar="FILE", help="replace the table between the config-reference markers in FILE")
    ns = parser.parse_args(argv)
    if ns.action == "reference":
        if ns.write:
            with open(ns.write) as f:
                text = f.read()
            try:
                updated = replace_reference(text, C.reference_table())
            except ValueError as e:
                print(f"megalm config: error: {ns.write}: {e}", file=sys.stderr)
                return 2
            with open(ns.write, "w") as f:
                f.write(updated)
            return 0
        print(C.reference_table())
        return 0
    try:
        cfg, ds = C.resolve(ns.config, ns.overrides, ns.ds_config, ns.world_size)
    except ConfigError as e:
        print(f"megalm config: error: {e}", file=sys.stderr)
        return 2
    print("# megalm config")
    print(C.to_yaml(cfg))
    print("# DeepSpeed config")
    print(json.dumps(ds, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
