"""The ``megalm`` command: one entry point that dispatches to subcommands.

Each subcommand lives in its own module and is imported only when run, so
``megalm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from typing import Optional

import megalm
from megalm.errors import MegalmError

# name -> (module with a main(argv) function, one-line help). tools/*.py are
# thin scripts over the same modules, so installed users need no checkout.
SUBCOMMANDS = {
    "check": ("megalm.check", "preflight a config before the queue: rules, files, tokenizer, layout, memory"),
    "config": ("megalm.config_cli", "show the resolved config and the DeepSpeed JSON it derives"),
    "train": ("megalm.pretrain", "pretrain a model (same as megalm/pretrain.py)"),
    "preprocess": ("megalm.data.preprocess", "tokenize JSONL into Megatron .bin/.idx files"),
    "train-tokenizer": ("megalm.data.train_tokenizer", "train a SentencePiece or byte-level BPE tokenizer on JSONL"),
    "merge-datasets": ("megalm.data.merge", "concatenate .bin/.idx shards into one dataset"),
    "convert-to-hf": ("megalm.hf.export", "export a checkpoint to Hugging Face format"),
    "convert-from-hf": ("megalm.hf.import_hf", "import Hugging Face weights into a checkpoint"),
    "generate": ("megalm.generate", "generate text from a checkpoint"),
    "plan": ("megalm.plan", "memory per GPU and the parallel layouts that fit"),
}


def available() -> dict:
    """Only the subcommands whose module is installed in this tree."""
    out = {}
    for name, (module, help_text) in SUBCOMMANDS.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if found:
            out[name] = (module, help_text)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = available()
    parser = argparse.ArgumentParser(
        prog="megalm",
        description="megalm: tensor/pipeline-parallel LLM pretraining under DeepSpeed.",
        epilog="subcommands:\n" + "\n".join(f"  {n:<16} {h}" for n, (_, h) in commands.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"megalm {megalm.__version__}")
    parser.add_argument("command", choices=sorted(commands), metavar="command")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    if not argv:
        parser.print_help()
        return 2
    ns = parser.parse_args(argv)
    module = importlib.import_module(commands[ns.command][0])
    try:
        code = int(module.main(ns.args) or 0)
    except MegalmError as e:
        print(f"megalm {ns.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    if ns.command in ("train", "generate"):  # multi-rank: a finished job exits with its own code (see there)
        from megalm.distributed import exit_without_teardown

        exit_without_teardown(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
