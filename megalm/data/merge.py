"""``megalm merge-datasets``: concatenate ``.bin/.idx`` shards into one dataset, streaming.

Shards produced in parallel (one preprocess per input partition) merge into
the file a single run over the concatenated input would have written.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
from typing import Optional, Sequence

from megalm.data.indexed import IndexedDataset, IndexedDatasetWriter, dataset_exists
from megalm.errors import DataError

log = logging.getLogger(__name__)


def resolve_prefixes(items: Sequence[str]) -> list[str]:
    """Prefixes from explicit prefixes, ``.idx``/``.bin`` paths, globs or directories (sorted within each)."""
    out: list[str] = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(p[:-4] for p in glob.glob(os.path.join(item, "*.idx")))
        elif any(c in item for c in "*?["):
            found = sorted({p[:-4] for p in glob.glob(item) if p.endswith((".idx", ".bin"))})
        else:
            found = [item[:-4] if item.endswith((".idx", ".bin")) else item]
        if not found:
            raise DataError(f"no .bin/.idx datasets match {item}")
        for p in found:
            if not dataset_exists(p):
                raise DataError(f"dataset {p}.bin/.idx not found")
        out.extend(found)
    return out


def merge(prefixes: Sequence[str], output_prefix: str) -> IndexedDataset:
    """Write ``output_prefix.bin/.idx`` = the shards in order; atomic like every writer."""
    if not prefixes:
        raise DataError("nothing to merge: no input datasets")
    first = IndexedDataset(prefixes[0])
    with IndexedDatasetWriter(output_prefix, first.dtype) as w:
        for p in prefixes:
            w.add_index(p)
            log.info("merged %s", p)
    return IndexedDataset(output_prefix)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="megalm merge-datasets", description=__doc__)
    p.add_argument("--input", nargs="+", required=True, help="dataset prefixes, .idx files, globs or directories, in order")
    p.add_argument("--output-prefix", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    prefixes = resolve_prefixes(args.input)
    if os.path.abspath(args.output_prefix) in {os.path.abspath(x) for x in prefixes}:
        raise DataError(f"--output-prefix {args.output_prefix} is also an input")
    ds = merge(prefixes, args.output_prefix)
    print(f"wrote {args.output_prefix}.bin/.idx: {len(prefixes)} shards, {ds.num_documents:,} documents, "
          f"{len(ds):,} sequences, {ds.num_tokens:,} tokens", file=sys.stderr)
    return 0
