#!/usr/bin/env bash
# megalm quick start: set up, then really pretrain a small GPT on this CPU (~4 minutes from a fresh clone on 2 cores, install included).
#   bash quickstart.sh                 # creates .venv, installs megalm, runs everything
#   MEGALM_NO_VENV=1 bash quickstart.sh  # use the current Python environment instead
# Steps: install -> train a SentencePiece tokenizer on the bundled Jane Austen corpus -> preprocess to
# Megatron .bin/.idx -> pretrain configs/gpt_tiny.yaml data-parallel on 2 CPU ranks through the deepspeed
# launcher (bf16, the default train.compile) -> validation perplexity -> loss-curve PNG -> Hugging Face
# export -> generate text from it. (Why not tensor parallel here: docs/training.md, "What the quick start measured".)
set -euo pipefail
cd "$(dirname "$0")"
START=$(date +%s)
OUT=runs/quickstart
RUN=runs/gpt_tiny
ITERS=${QUICKSTART_ITERS:-250}

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/7 install megalm (torch pinned to the CPU build)"
if [ -z "${MEGALM_NO_VENV:-}" ]; then
  [ -d .venv ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
quiet_pip() { pip install -q "$@" 2>&1 | { grep -v -E "Location .* is ignored|running pip as the 'root' user" || true; }; }
quiet_pip torch==2.13.0
quiet_pip -e '.[hf,plot]'

step "2/7 train a SentencePiece tokenizer on data/corpus/austen.jsonl"
mkdir -p "$OUT/data"
megalm train-tokenizer --input data/corpus/austen.jsonl --vocab-size 4000 --model-type bpe \
  --output-prefix "$OUT/tokenizer"

step "3/7 preprocess into Megatron-compatible .bin/.idx"
python tools/preprocess.py --input data/corpus/austen.jsonl --output-prefix "$OUT/data/corpus" \
  --tokenizer-model "$OUT/tokenizer.model" --json-keys text --append-eod --workers 2

step "4/7 pretrain configs/gpt_tiny.yaml: data parallel on 2 CPU ranks, bf16 (deepspeed launcher; the first steps compile)"
rm -rf "$RUN"
OMP_NUM_THREADS=1 deepspeed --num_gpus 2 megalm/pretrain.py --config configs/gpt_tiny.yaml \
  --set precision=bf16 train.iters="$ITERS" train.log_interval=10 train.eval_interval=50 \
  run.dir="$RUN" 2>&1 | grep --line-buffered -v -E \
  "^\[|^W[0-9]|warnings.warn|UserWarning|FutureWarning|return func\(|^MA |^CPU Virtual Memory|initializing group|bf16_ ?optimizer" \
  || true
[ -f "$RUN/checkpoints/latest" ] || { echo "training did not finish: see the output above" >&2; exit 1; }

step "5/7 validation perplexity and the loss curve"
python - "$RUN" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
train = [r for r in recs if "loss" in r]
evals = [r for r in recs if "eval_loss" in r]
print(f"train loss: step {train[0]['step']}: {train[0]['loss']:.3f} -> step {train[-1]['step']}: {train[-1]['loss']:.3f}")
for r in evals:
    print(f"eval  step {r['step']:>4}: loss {r['eval_loss']:.3f}  perplexity {r['eval_ppl']:.1f}")
PY
python tools/plot_metrics.py "$RUN" --output "$RUN/metrics.png"

step "6/7 convert the checkpoint to Hugging Face format"
python tools/convert_to_hf.py --checkpoint "$RUN/checkpoints" --output "$RUN/hf"

step "7/7 generate from the Hugging Face export (transformers, offline)"
HF_HUB_OFFLINE=1 python - "$RUN/hf" <<'PY'
import sys, torch, transformers
transformers.logging.set_verbosity_error()
torch.manual_seed(0)
gen = transformers.pipeline("text-generation", model=sys.argv[1])
prompt = "It is a truth universally acknowledged, that"
out = gen(prompt, max_new_tokens=60, do_sample=True, temperature=0.8, top_k=40)[0]["generated_text"]
print(f"prompt: {prompt}\ncontinuation:{out[len(prompt):]}")
PY

cat <<EOT

Done in $(( $(date +%s) - START )) s.
  metrics:      $RUN/metrics.jsonl  (curve: $RUN/metrics.png)
  TensorBoard:  tensorboard --logdir $RUN/tensorboard
  checkpoint:   $RUN/checkpoints   (resume: run the same command again)
  HF export:    $RUN/hf            (transformers.AutoModelForCausalLM.from_pretrained("$RUN/hf"))
Scale up: sbatch launch/pretrain_gpt_1b.sh   (see docs/cluster.md)
EOT
