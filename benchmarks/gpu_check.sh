#!/usr/bin/env bash
# One command for one bare CUDA machine (no DeepSpeed, no network, a few minutes): proves megalm's CUDA path.
#   bash benchmarks/gpu_check.sh               # on the GPU machine, from a checkout with wheels/ beside it
#   bash benchmarks/gpu_check.sh --cpu-smoke   # the same steps on a tiny model on the CPU (fp16 left out)
# Missing packages (DeepSpeed and its pure-Python dependencies) come from wheels/, built beforehand by
# benchmarks/build_gpu_wheels.sh, into a venv layered over the image's own packages. Then:
#   1. a cpu:gloo,cuda:nccl process group: an all-reduce on each device, megalm's comm helpers;
#   2. configs/gpt_1b.yaml, one rank, seq 2048, 20 steps of 4 micro-batches, bf16 then fp16 (dynamic
#      loss scaling: scale and skipped steps printed);
#   3. the gpt_1b shape cut to 4 layers: fp32 (megalm's own grad-norm/clipping on the device) with full
#      activation checkpointing, SIGUSR1 mid-run (checkpoint, exit 75), resume, losses compared step by
#      step with an uninterrupted run; bf16 with a NaN loss injected at step 2 (the skip path);
#   4. a table: tokens/s, TFLOP/s, MFU, peak memory next to what `megalm plan` predicts.
# Exit status: 0 when every check passed. OUT (default /tmp/megalm_gpu_check) keeps logs and runs.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SMOKE=0
if [ "${1:-}" = "--cpu-smoke" ]; then SMOKE=1; fi
OUT=${OUT:-/tmp/megalm_gpu_check}
WHEELS=${WHEELS:-$ROOT/wheels}
PY=${PYTHON:-python3}
START=$(date +%s)
FAILED=0
log() { echo "[$(( $(date +%s) - START ))s] $*"; }
fail() { echo "CHECK FAILED: $*"; FAILED=1; }
rm -rf "$OUT"
mkdir -p "$OUT"

# ---- 0. packages: only what the image lacks, only from the carried wheels
if ! "$PY" -c "import deepspeed, xxhash" >/dev/null 2>&1; then
  if [ ! -d "$WHEELS" ]; then
    echo "DeepSpeed or xxhash is not installed and $WHEELS is missing: run benchmarks/build_gpu_wheels.sh where there is network"
    exit 2
  fi
  log "installing DeepSpeed from $WHEELS into $OUT/venv (over the image's packages, no network)"
  "$PY" -m venv --system-site-packages "$OUT/venv"
  PY=$OUT/venv/bin/python
  # only the carried distributions the image lacks, without re-resolving what the image already has
  missing=$("$PY" - "$WHEELS" <<'PY'
import importlib.metadata as md, os, re, sys
names = sorted({re.split(r"-\d", f)[0].replace("_", "-").lower() for f in os.listdir(sys.argv[1]) if f.endswith(".whl")})
def installed(name):
    try:
        return bool(md.version(name))
    except md.PackageNotFoundError:
        return False
print(" ".join(n for n in names if not installed(n)))
PY
)
  log "from wheels: $missing"
  # shellcheck disable=SC2086  # one word per distribution
  "$PY" -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" $missing
fi
# Nothing may be JIT-compiled: the extension dir is watched and must stay empty.
export TORCH_EXTENSIONS_DIR=$OUT/torch_extensions DS_BUILD_OPS=0
export PYTHONUNBUFFERED=1 NCCL_DEBUG=WARN CUBLAS_WORKSPACE_CONFIG=:4096:8 PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$TORCH_EXTENSIONS_DIR"
"$PY" - "$SMOKE" <<'PY'
import sys, torch, deepspeed
smoke = sys.argv[1] == "1"
print(f"torch {torch.__version__} cuda {torch.version.cuda} deepspeed {deepspeed.__version__}")
if not smoke:
    assert torch.cuda.is_available(), "no CUDA device visible"
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB")
PY

# ---- 1. the process group megalm creates on CUDA, and its helpers, for real
log "process group and collectives"
"$PY" - <<'PY' || fail "collectives"
import os, torch, torch.distributed as dist
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
from megalm.distributed import backend_for_device
from megalm.parallel import comm
backend = backend_for_device()
dist.init_process_group(backend)
devices = [torch.device("cpu")] + ([torch.device("cuda", 0)] if torch.cuda.is_available() else [])
for d in devices:  # the mixed group serves both devices (NCCL alone refuses CPU tensors)
    t = torch.ones(4, device=d)
    dist.all_reduce(t)
    assert t.sum().item() == 4
print(f"group {dist.get_backend()}: all_reduce on {', '.join(map(str, devices))}; comm device {comm.device()}")
assert comm.device().type == ("cuda" if torch.cuda.is_available() else "cpu")
assert comm.all_reduce(torch.tensor([2.0]), "max").device == comm.device()
assert comm.all_gather_object({"ok": 1}) == [{"ok": 1}]
comm.barrier()
dist.destroy_process_group()
PY

# ---- data: a tokenizer and a corpus from the checkout
CORPUS=$ROOT/data/corpus/austen.jsonl
VOCAB=8000
if [ "$SMOKE" = 1 ]; then CORPUS=$ROOT/tests/fixtures/kjv_small.jsonl; VOCAB=600; fi
log "tokenizer ($VOCAB pieces) and corpus from $(basename "$CORPUS")"
"$PY" -m megalm.cli train-tokenizer --input "$CORPUS" --vocab-size "$VOCAB" --output-prefix "$OUT/tok" \
  > "$OUT/tokenizer.log" 2>&1
"$PY" tools/preprocess.py --input "$CORPUS" --output-prefix "$OUT/corpus" --tokenizer-model "$OUT/tok.model" \
  --append-eod --workers 2 > "$OUT/preprocess.log" 2>&1

COMMON=(data.prefix="$OUT/corpus_text_document" data.tokenizer="$OUT/tok.model" train.eval_iters=0
        train.eval_interval=100000 run.tensorboard=false checkpoint.save_at_end=false zero.stage=0)
if [ "$SMOKE" = 1 ]; then
  BIG=(model.num_layers=2 model.hidden_size=64 model.num_heads=4 model.ffn_hidden_size=128 model.seq_length=64
       model.vocab_size=640 train.micro_batch_size=2 train.global_batch_size=8)
  SMALL=("${BIG[@]}")
  ITERS=6
  PRECISIONS=(bf16)
else
  BIG=(model.seq_length=2048 train.micro_batch_size=4 train.global_batch_size=16)
  SMALL=(model.num_layers=4 model.seq_length=2048 train.micro_batch_size=2 train.global_batch_size=4)
  ITERS=20
  PRECISIONS=(bf16 fp16)
fi

pretrain() {  # run.dir, then --set items; one rank, the way a user starts it
  local dir=$1
  shift
  "$PY" megalm/pretrain.py --config configs/gpt_1b.yaml --set "${COMMON[@]}" run.dir="$dir" "$@"
}

# ---- 2. the 1.3B model in bf16 and fp16
for precision in "${PRECISIONS[@]}"; do
  log "gpt_1b $precision: $ITERS steps"
  pretrain "$OUT/run_$precision" "${BIG[@]}" precision="$precision" train.iters="$ITERS" train.log_interval=5 \
    > "$OUT/run_$precision.log" 2>&1 || { tail -20 "$OUT/run_$precision.log"; fail "gpt_1b $precision"; }
done

# ---- 3. the CUDA paths: device grad norm + full recompute, preemption + resume, skipped steps
PATHS=("${SMALL[@]}" precision=fp32 train.activation_checkpointing=full train.iters=8 train.log_interval=1
       optim.clip_grad=1.0)
log "fp32 + full recompute (megalm's grad norm), uninterrupted"
pretrain "$OUT/paths_ref" "${PATHS[@]}" > "$OUT/paths_ref.log" 2>&1 || fail "fp32 reference run"
log "the same, SIGUSR1 after step 3, then resumed"
# started directly (not through the function) so that $! is the Python process the signal is for
"$PY" megalm/pretrain.py --config configs/gpt_1b.yaml --set "${COMMON[@]}" run.dir="$OUT/paths_resume" "${PATHS[@]}" \
  > "$OUT/paths_preempt.log" 2>&1 &
pid=$!
for _ in $(seq 1200); do
  if [ -f "$OUT/paths_resume/metrics.jsonl" ] && [ "$(grep -c '"loss"' "$OUT/paths_resume/metrics.jsonl")" -ge 3 ]; then
    break
  fi
  sleep 0.25
done
kill -USR1 "$pid" 2>/dev/null || true
code=0
wait "$pid" || code=$?
[ "$code" = 75 ] || fail "preempted run exited $code, expected 75 (checkpoint saved, requeue me)"
pretrain "$OUT/paths_resume" "${PATHS[@]}" > "$OUT/paths_resumed.log" 2>&1 || fail "resume"
log "bf16 with a NaN loss at step 2 (the skip path)"
pretrain "$OUT/paths_skip" "${SMALL[@]}" precision=bf16 train.iters=4 train.log_interval=1 \
  objective.name=tests.training.nan_objective:NaNOnSteps "objective.options={nan_steps: [2]}" \
  > "$OUT/paths_skip.log" 2>&1 || fail "skip run"

# ---- 4. the figures, next to the plan
PLAN_SETS=("${BIG[@]}" zero.stage=0)
MEM=$("$PY" -c "import torch; print(torch.cuda.get_device_properties(0).total_memory / 1e9 if torch.cuda.is_available() else 80)")
"$PY" -m megalm.cli plan configs/gpt_1b.yaml --gpus 1 --gpu-mem "$MEM" --json --set "${PLAN_SETS[@]}" \
  > "$OUT/plan.json" 2> "$OUT/plan.log" || fail "megalm plan"
"$PY" - "$OUT" "$SMOKE" "${PRECISIONS[@]}" <<'PY' || FAILED=1
import json, math, os, sys
out, smoke, precisions = sys.argv[1], sys.argv[2] == "1", sys.argv[3:]

def records(run):
    path = os.path.join(out, run, "metrics.jsonl")
    return [json.loads(l) for l in open(path) if '"loss"' in l] if os.path.exists(path) else []

ok = True
plan = json.load(open(os.path.join(out, "plan.json")))["config_layout"]
print(f"\nmegalm plan (this layout): {plan['total_gb']:.1f} GB per GPU predicted "
      f"(weights {plan['weights_gb']:.1f}, grads {plan['grads_gb']:.1f}, optimizer {plan['optimizer_gb']:.1f}, "
      f"activations {plan['activations_gb']:.1f}, buffers {plan['buffers_gb']:.1f}, overhead {plan['overhead_gb']:.1f})")
print(f"{'run':<10} {'steps':>5} {'loss':>7} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GB':>8} "
      f"{'plan GB':>8} {'scale':>8} {'skipped':>7}")
for p in precisions:
    r = records(f"run_{p}")
    if not r:
        print(f"{p:<10} no metrics"); ok = False; continue
    steady = r[1:] or r  # the first window includes start-up and allocator warm-up
    avg = lambda k: sum(x[k] for x in steady) / len(steady)
    last = r[-1]
    print(f"{p:<10} {last['step']:>5} {last['loss']:>7.3f} {avg('tokens_per_sec'):>10.0f} {avg('tflops'):>8.1f} "
          f"{100 * avg('mfu'):>5.1f}% {last['mem_gb']:>8.1f} {plan['total_gb']:>8.1f} "
          f"{str(last.get('loss_scale')):>8} {last.get('skipped')!s:>7}")
    if not all(math.isfinite(x["loss"]) for x in r[-2:]):
        print(f"  {p}: the last losses are not finite"); ok = False
ref, res = records("paths_ref"), records("paths_resume")
gn = [x["grad_norm"] for x in ref]
print(f"\nfp32 + full recompute: losses {[round(x['loss'], 4) for x in ref]}; grad norms (megalm, on device) "
      f"{[round(g, 3) for g in gn]}")
if len(ref) != 8 or len(res) != 8:
    print(f"resume: {len(res)} steps logged vs {len(ref)}"); ok = False
else:
    diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(ref, res))
    said = [l.strip() for l in open(os.path.join(out, "paths_preempt.log")) if "preempted at step" in l]
    back = [l.strip() for l in open(os.path.join(out, "paths_resumed.log")) if "resumed from" in l]
    print(f"{said[-1] if said else 'NO preemption logged'}\n{back[-1] if back else 'NOT resumed from a checkpoint'}\n"
          f"resumed run vs uninterrupted: max |loss difference| over 8 steps {diff:.3g} "
          f"({'identical' if diff == 0 else 'NOT identical'})")
    ok &= diff == 0 and bool(said) and bool(back)
skip = records("paths_skip")
skipped = skip[-1].get("skipped") if skip else None
print(f"NaN loss at step 2 under bf16: skipped steps {skipped}, losses {[x['loss'] for x in skip]}")
ok &= skipped == 1 and len(skip) == 4 and math.isfinite(skip[-1]["loss"])
built = [f for f in os.listdir(os.environ["TORCH_EXTENSIONS_DIR"])]
print(f"JIT-built extensions: {built or 'none'}")
ok &= not built
sys.exit(0 if ok else 1)
PY
log "done in $(( $(date +%s) - START )) s"
if [ "$FAILED" != 0 ]; then echo "gpu_check: FAILED (logs in $OUT)"; exit 1; fi
echo "gpu_check: all checks passed"
