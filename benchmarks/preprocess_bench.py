#!/usr/bin/env python
"""Preprocess benchmark: megalm vs the tokenizer's own batch-encode floor (and optionally Megatron-LM).

For a SentencePiece .model (floor: ``sp.encode(texts, num_threads=W)``), a
Hugging Face tokenizer.json or GPT-2 vocab.json + merges.txt (floor: bare
``tokenizers`` ``encode_batch`` over the parsed texts, in its Rust threads).
Floor and megalm runs alternate ``--repeats`` times on the same corpus, so a
loaded machine slows both alike; the median ratio is printed. Then the peak
RSS of megalm's whole process tree on a corpus ``--rss-scale`` times larger.
Megatron-LM is optional (``--megatron-dir``, a checkout; ``--megatron-pythonpath``
for import shims it needs on this machine) and never a dependency of megalm.

    python benchmarks/preprocess_bench.py --tokenizer-type huggingface --mb 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = "/work/shared/data"
MEGATRON_TYPE = {"sentencepiece": "SentencePieceTokenizer", "huggingface": "HuggingFaceTokenizer",
                 "gpt2bpe": "GPT2BPETokenizer"}


def make_corpus(path: str, target_mb: float, sources: list[str]) -> int:
    docs = []
    for s in sources:
        with open(s) as f:
            docs.extend(json.loads(line)["text"] for line in f)
    written, rep = 0, 0
    with open(path, "w") as out:
        while written < target_mb * 1e6:
            for i, t in enumerate(docs):
                line = json.dumps({"text": t, "id": f"{rep}-{i}"}) + "\n"
                out.write(line)
                written += len(line.encode())
                if written >= target_mb * 1e6:
                    break
            rep += 1
    return written


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, int]:
    """(wall seconds, peak summed RSS in MB of the process and all its children), sampled every 20 ms."""
    import psutil

    t = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
    proc, peak = psutil.Process(p.pid), 0
    while p.poll() is None:
        try:
            tree = [proc] + proc.children(recursive=True)
            peak = max(peak, sum(q.memory_info().rss for q in tree if q.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.02)
    out, err = p.communicate()
    wall = time.time() - t
    if p.returncode:
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{err.decode()[-3000:]}")
    return wall, peak // (1 << 20)


def floor_seconds(corpus: str, kind: str, tok: str, threads: int) -> float:
    if kind == "sentencepiece":
        load = f"import sentencepiece as spm\nsp=spm.SentencePieceProcessor(model_file={tok!r})\n"
        enc = f"ids=sp.encode(texts,out_type=int,num_threads={threads})\n"
    else:
        from megalm.data.tokenizer import load_tokenizer

        t = load_tokenizer(tok, kind)  # the tokenizers pipeline megalm builds (GPT-2: from the two files)
        spec = os.path.join(tempfile.mkdtemp(prefix="floor_"), "tokenizer.json")
        t.tok.save(spec)
        load = f"from tokenizers import Tokenizer\ntk=Tokenizer.from_file({spec!r})\n"
        enc = "ids=[e.ids for e in tk.encode_batch(texts)]\n"
    code = (f"import json,time\n{load}texts=[json.loads(l)['text'] for l in open({corpus!r})]\n"
            f"t=time.time()\n{enc}print(time.time()-t)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "RAYON_NUM_THREADS": str(threads)})
    return float(r.stdout.strip())


def same_bytes(a: str, b: str) -> bool:
    return all(open(a + ext, "rb").read() == open(b + ext, "rb").read() for ext in (".bin", ".idx"))


def default_tokenizer(kind: str, work: str, sources: list[str], vocab: int) -> str:
    script = os.path.join(REPO, "tools", "train_tokenizer.py")
    inputs = sum((["--input", s] for s in sources), [])
    if kind == "sentencepiece":
        subprocess.run([sys.executable, script, *inputs, "--vocab-size", str(vocab), "--output-prefix",
                        os.path.join(work, "spm")], check=True, capture_output=True)
        return os.path.join(work, "spm.model")
    d = os.path.join(work, "bytelevel")
    subprocess.run([sys.executable, script, *inputs, "--vocab-size", str(vocab), "--model-type", "bytelevel-bpe",
                    "--output-prefix", d], check=True, capture_output=True)
    return d if kind == "huggingface" else os.path.join(d, "vocab.json")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer-type", choices=list(MEGATRON_TYPE), default="sentencepiece")
    p.add_argument("--tokenizer", default=None, help="default: train an 8k tokenizer on the shared corpora")
    p.add_argument("--workers", type=int, default=None,
                   help="megalm --workers (default: all cores for SentencePiece, 1 for tokenizers, whose "
                        "batch encoding is threaded already)")
    p.add_argument("--mb", type=float, default=20.0, help="corpus size in MB")
    p.add_argument("--repeats", type=int, default=3, help="alternated floor/megalm pairs")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--megatron-dir", default=None)
    p.add_argument("--megatron-pythonpath", default="")
    p.add_argument("--rss-scale", type=int, default=4, help="peak-RSS check on a corpus this many times larger (0=skip)")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()

    kind, cores = args.tokenizer_type, os.cpu_count() or 1
    workers = args.workers if args.workers is not None else (cores if kind == "sentencepiece" else 1)
    work = args.workdir or tempfile.mkdtemp(prefix="megalm_pp_bench_")
    os.makedirs(work, exist_ok=True)
    sources = [os.path.join(SHARED, f) for f in ("kjv.jsonl", "austen.jsonl")]
    corpus = os.path.join(work, "corpus.jsonl")
    size = make_corpus(corpus, args.mb, sources)
    tok = args.tokenizer or default_tokenizer(kind, work, sources, args.vocab_size)
    print(f"corpus {size / 1e6:.1f} MB, {kind} tokenizer {tok}, megalm --workers {workers}, {cores} cores, "
          f"load average {os.getloadavg()[0]:.1f}")

    def ours_cmd(inp: str, out: str) -> list[str]:
        return [sys.executable, os.path.join(REPO, "tools", "preprocess.py"), "--input", inp, "--output-prefix",
                out, "--tokenizer-model", tok, "--tokenizer-type", MEGATRON_TYPE[kind], "--append-eod",
                "--workers", str(workers), "--no-progress"]

    ours_prefix = os.path.join(work, "ours")
    floors, ours, rss1 = [], [], 0
    for _ in range(args.repeats):
        floors.append(floor_seconds(corpus, kind, tok, cores))
        wall, rss1 = timed(ours_cmd(corpus, ours_prefix))
        ours.append(wall)
    ratios = [o / f for o, f in zip(ours, floors)]
    print(f"floor  bare batch encode ({cores} threads): " + ", ".join(f"{x:.2f}s" for x in floors))
    print("megalm tools/preprocess.py (whole run: start-up, read, parse, encode, write): "
          + ", ".join(f"{x:.2f}s" for x in ours))
    print(f"ratio megalm/floor per pair: {', '.join(f'{r:.2f}' for r in ratios)}; "
          f"median {statistics.median(ratios):.2f}x (target <= 1.2)")

    if args.megatron_dir:
        meg_prefix = os.path.join(work, "megatron")
        mcmd = [sys.executable, os.path.join(args.megatron_dir, "tools", "preprocess_data.py"), "--input", corpus,
                "--output-prefix", meg_prefix, "--tokenizer-type", MEGATRON_TYPE[kind], "--append-eod",
                "--workers", str(max(workers, 1))]
        if kind == "gpt2bpe":
            mcmd += ["--vocab-file", tok, "--merge-file", os.path.join(os.path.dirname(tok), "merges.txt")]
        else:
            mcmd += ["--tokenizer-model", tok]
        pp = ":".join(x for x in (args.megatron_pythonpath, args.megatron_dir) if x)
        meg, meg_rss = timed(mcmd, {"PYTHONPATH": pp, "MEGATRON_DIR": args.megatron_dir})
        ident = same_bytes(ours_prefix + "_text_document", meg_prefix + "_text_document")
        print(f"megatron preprocess_data.py --workers {max(workers, 1)}: {meg:.2f}s, peak RSS {meg_rss} MB; "
              f"megalm/megatron = {statistics.median(ours) / meg:.2f}; byte-identical: {ident}")

    if args.rss_scale:
        big = os.path.join(work, "big.jsonl")
        with open(big, "wb") as out:
            data = open(corpus, "rb").read()
            for _ in range(args.rss_scale):
                out.write(data)
        t_big, rss_big = timed(ours_cmd(big, ours_prefix + "_big"))
        print(f"peak RSS (all processes): {rss1} MB on 1x, {rss_big} MB on {args.rss_scale}x corpus "
              f"({(rss_big / max(rss1, 1) - 1) * 100:+.0f}%; target < +20%), {t_big:.2f}s")
    print(f"workdir {work}")


if __name__ == "__main__":
    main()
