#!/usr/bin/env bash
# How far does the demo's recipe get with more compute? Train configs/toy.yaml for as many
# steps as a wall-clock budget allows on this machine (CUDA when there is one), then score
# the model on 128 held-out toy LCUs at 20 steps (not the demo's 256 at 10: compare its
# scores with each other, not with the demo's summary.md).
#
#   scripts/toy_budget_run.sh OUTDIR [BUDGET_SECONDS] [train.py overrides...]
#   scripts/toy_budget_run.sh outputs/toy-budget 1800 data.toy_n=8192
#
# 1. `train.py` makes the toy LCUs, the toy VAE and the embedding cache in $TOY_WORK
#    (default /tmp/toy_budget_work, outside OUTDIR) and times 30 steps (the calibration run);
# 2. max_steps = 90% of steps/s x what is left of the budget, less a reserve for export and
#    evaluation (90 s on CUDA, 300 s elsewhere), and a fresh run trains that many steps
#    (warmup and cosine decay span them) on the same data, VAE and cache;
# 3. `evaluate.py --suite toy --n 128 --steps 20` scores it at the size its VAE records.
# Every step runs under `timeout` with what is left of the budget.
#
# OUTDIR ends up holding only what is worth keeping: log.txt (everything printed),
# metrics.jsonl, report.json and report.png, so it fits the 8 files a lent GPU machine
# returns; the data, VAE, cache and checkpoints stay in $TOY_WORK. The interpreter is
# $PYTHON (default python). Exits non-zero when a step fails.
set -u -o pipefail
case "${1:-}" in  # the header above is the help
  -h | --help) sed -n '2,/^set /p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
  -*) echo "toy_budget_run.sh: error: unknown option $1 (OUTDIR comes first; --help)" >&2; exit 2 ;;
esac
OUT=${1:?usage: scripts/toy_budget_run.sh OUTDIR [BUDGET_SECONDS] [overrides...]}
BUDGET=${2:-1800}
if ! [[ $BUDGET =~ ^[0-9]+$ ]] || ((BUDGET < 60)); then
  echo "toy_budget_run.sh: error: BUDGET_SECONDS must be a whole number >= 60, got $BUDGET" >&2
  exit 2
fi
shift $(($# < 2 ? $# : 2))
WORK=${TOY_WORK:-/tmp/toy_budget_work}
PY=${PYTHON:-python}
START=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd) WORK=$(cd "$WORK" && pwd)  # absolute: the script changes directory
cd "$(dirname "$0")/.."
LOG="$OUT/log.txt"
: >"$LOG"

if $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  RESERVE=90
else
  RESERVE=300
fi
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu', 'threads', torch.get_num_threads())" | tee -a "$LOG"
SHARED=(--config configs/toy.yaml data.manifest="$WORK/data" data.cache="$WORK/cache"
  model.vae="$WORK/vae" train.checkpoint_every=1000000 "$@")

# seconds left of the budget, at least 1 (timeout 0 would mean no limit at all)
left() {
  local n=$((BUDGET - ($(date +%s) - START)))
  echo $((n > 0 ? n : 1))
}

echo "== 1. data, VAE, cache, 30 timed steps" | tee -a "$LOG"
rm -rf "$WORK/calibrate"
timeout "$(left)" $PY scripts/train.py "${SHARED[@]}" train.output_dir="$WORK/calibrate" \
  train.max_steps=30 train.log_every=10 >>"$LOG" 2>&1 || {
  code=$?
  if ((code == 124)); then  # timeout's status: the budget ran out
    echo "calibration ran out of the $BUDGET s budget (data, toy VAE, cache, 30 steps): give more; see $LOG"
  else
    echo "calibration failed: see $LOG"
  fi
  exit 1
}

# steps/s of the last 20 steps (the first 10 include warm-up work), from the logged rows
RATE=$($PY - "$WORK/calibrate/metrics.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
cfg = json.load(open(sys.argv[1].replace("metrics.jsonl", "config.json")))
per_step = [r["samples/s"] / cfg["data"]["batch_size"] for r in rows if r["step"] > 10]
print(sum(per_step) / len(per_step))
EOF
) || { echo "no timing in the calibration run"; exit 1; }
STEPS=$($PY -c "print(max(1, int(0.9 * ($(left) - $RESERVE) * $RATE)))")
echo "== 2. $STEPS steps at $RATE steps/s ($(left)s of the budget left, ${RESERVE}s kept)" | tee -a "$LOG"
rm -rf "$WORK/train"
T0=$(date +%s)
timeout "$(left)" $PY scripts/train.py "${SHARED[@]}" train.output_dir="$WORK/train" \
  train.max_steps="$STEPS" >>"$LOG" 2>&1 || { echo "training failed or ran out of time: see $LOG"; exit 1; }
echo "== trained $STEPS steps in $(($(date +%s) - T0))s" | tee -a "$LOG"
cp "$WORK/train/metrics.jsonl" "$OUT/metrics.jsonl"

echo "== 3. evaluate" | tee -a "$LOG"
# at the size the VAE recorded (evaluate.py's default): the data and VAE that $WORK kept
# from an earlier run may be of another size than data.toy_size says
timeout "$(left)" $PY scripts/evaluate.py --pipeline "$WORK/train/pipeline" --suite toy --n 128 \
  --steps 20 --quiet --out "$OUT/report.json" 2>>"$LOG" | tee -a "$LOG" ||
  { echo "evaluation failed or ran out of time: see $LOG"; exit 1; }
echo "== done in $(($(date +%s) - START))s of $BUDGET" | tee -a "$LOG"
