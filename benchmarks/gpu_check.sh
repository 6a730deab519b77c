#!/usr/bin/env bash
# One prepared GPU check for a lent CUDA machine (minutes of time, no network):
# 1 rank of configs/gpt_1b.yaml (seq 2048) for ~20 steps in bf16, then fp16 with live dynamic loss
# scaling, over NCCL; prints tokens/s, TFLOP/s and MFU per run from metrics.jsonl.
#   bash benchmarks/gpu_check.sh [ITERS]
set -euo pipefail
cd "$(dirname "$0")/.."
ITERS=${1:-20}
OUT=${OUT:-/tmp/megalm_gpu_check}
mkdir -p "$OUT"
python - <<'PY'
import torch, deepspeed
print(f"torch {torch.__version__} cuda {torch.version.cuda} deepspeed {deepspeed.__version__}")
assert torch.cuda.is_available(), "no CUDA device visible"
print("device:", torch.cuda.get_device_name(), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
PY
CORPUS=tests/fixtures/kjv_small.jsonl
[ -f data/corpus/austen.jsonl ] && CORPUS=data/corpus/austen.jsonl
python -m megalm.cli train-tokenizer --input "$CORPUS" --vocab-size 32000 --output-prefix "$OUT/tok" \
  || python -m megalm.cli train-tokenizer --input "$CORPUS" --vocab-size 8000 --output-prefix "$OUT/tok"
python tools/preprocess.py --input "$CORPUS" --output-prefix "$OUT/corpus" --tokenizer-model "$OUT/tok.model" \
  --append-eod --workers 4
export NCCL_DEBUG=WARN
for precision in bf16 fp16; do
  run="$OUT/run_$precision"
  rm -rf "$run"
  torchrun --nproc_per_node 1 megalm/pretrain.py --config configs/gpt_1b.yaml --set \
    precision=$precision train.iters="$ITERS" train.log_interval=5 train.eval_interval=100000 train.eval_iters=0 \
    train.micro_batch_size=4 train.global_batch_size=4 model.vocab_size=32000 zero.stage=0 \
    checkpoint.save_at_end=false run.dir="$run" data.prefix="$OUT/corpus_text_document" \
    data.tokenizer="$OUT/tok.model" loss_scale.initial_scale_power=16
  python - "$run" "$precision" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl") if '"loss"' in l]
last = recs[-1]
print(f"{sys.argv[2]}: step {last['step']} loss {last['loss']:.3f} tokens/s {last['tokens_per_sec']:.0f} "
      f"TFLOP/s {last['tflops']:.1f} MFU {100 * last['mfu']:.1f}% loss_scale {last.get('loss_scale')} "
      f"skipped {last.get('skipped')} mem {last.get('mem_gb')} GB")
PY
done
