"""Data-loader throughput of causal-LM batches with every EOD option on (loss mask, position reset,
per-document segment ids): GPTDataset reads + CausalLM.collate, single process; and the cost of the
vocabulary guard (megalm.data.vocab_guard) on the same reads, measured in alternated passes.

    python benchmarks/clm_batches.py --prefix runs/quickstart/data/corpus_text_document \\
        --tokenizer runs/quickstart/tokenizer.model --seq 2048 --samples 4000
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefix", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5, help="alternated passes with and without the vocabulary guard")
    a = p.parse_args(argv)

    from megalm import config as C
    from megalm.data.build import build_datasets
    from megalm.data.tokenizer import Tokenizer
    from megalm.data.vocab_guard import VocabGuard
    from megalm.objectives.clm import CausalLM

    cfg = C.load(None, [f"model.seq_length={a.seq}", "objective.reset_position_ids=true",
                        "objective.reset_attention_mask=true", "objective.eod_mask_loss=true",
                        f"data.prefix={a.prefix}", f"data.tokenizer={a.tokenizer}"])
    tok = Tokenizer(a.tokenizer)
    ds = build_datasets(cfg, tok, {"train": a.samples, "valid": 0, "test": 0})["train"]
    objective = CausalLM(cfg, tok)
    guard = VocabGuard(ds, tok.vocab_size)
    n = min(a.samples, len(ds)) // a.micro_batch * a.micro_batch

    def one_pass(check: bool) -> float:
        rng = np.random.default_rng(0)
        t = time.perf_counter()
        for i in range(0, n, a.micro_batch):
            samples = []
            for j in range(i, i + a.micro_batch):
                sample = ds[j]
                if check:
                    guard(j, sample)
                samples.append(sample)
            objective.collate(samples, rng)
        return time.perf_counter() - t

    one_pass(True)  # warm the page cache and the index arrays
    times: dict[bool, list] = {False: [], True: []}
    for _ in range(a.rounds):  # alternated, so a busy machine slows both sides alike
        for check in (False, True):
            times[check].append(one_pass(check))
    plain, checked = (float(np.median(times[c])) for c in (False, True))
    print(f"seq {a.seq}: {n / plain:.0f} samples/s (EOD loss mask + position reset + segment ids, "
          f"micro-batch {a.micro_batch}); with the vocabulary guard {n / checked:.0f} samples/s "
          f"({100 * (checked - plain) / plain:+.1f}%, median of {a.rounds} alternated passes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
