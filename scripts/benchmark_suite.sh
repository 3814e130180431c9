#!/usr/bin/env bash
# Every speed and memory check of issue #6 in one prepared run: correctness first, then timings.
#
#   scripts/benchmark_suite.sh OUTDIR [BUDGET_SECONDS]
#
# On CUDA it runs the released sizes in bf16 (the rows of BENCHMARKS.md's GPU section);
# elsewhere the same steps at small sizes in fp32, so that the script is checked on CPU.
# Each step writes OUTDIR/NAME.json (its stderr goes to OUTDIR/suite.log); a step that
# fails or runs out of time is logged and the next one runs. Steps are in order of
# priority, and each gets at most what is left of BUDGET_SECONDS (default 600), so a
# lease that ends early still returns the first ones. Prints a summary of each step last.
# The interpreter is $PYTHON (default python; on the lent GPU machines, PYTHON=python3).
#
# On a machine whose torch is installed but not this project's other needs (no network):
# download the pure-Python wheels here into .whl/ (diffusers, importlib_metadata, einops, omegaconf,
# antlr4-python3-runtime, ftfy, wcwidth, webdataset, braceexpand), carry that folder, and
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
#   PYTHONPATH=/tmp/site:$PWD PYTHON=python3 scripts/benchmark_suite.sh "$OUT" 380
# Never write a wrapper through an existing link to the interpreter: a wrapper written
# through a symlink to python3 replaces python3 itself, and every later call hangs.
set -u
case "${1:-}" in  # the header above is the help
  -h | --help) sed -n '2,/^set /p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
  -*) echo "benchmark_suite.sh: error: unknown option $1 (OUTDIR comes first; --help)" >&2; exit 2 ;;
esac
OUT=${1:?usage: scripts/benchmark_suite.sh OUTDIR [BUDGET_SECONDS]}
BUDGET=${2:-600}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute: the script changes directory below
LOG="$OUT/suite.log"
: >"$LOG"
START=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

if $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  GPU=1; DEV=(--device cuda --dtype bf16)
else
  GPU=0; DEV=(--device cpu --dtype fp32)
fi
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" | tee -a "$LOG"
# every step imports these: one missing (a bare GPU image) fails them all, so say so first
if ! $PY -c "import accelerate, diffusers, einops, safetensors, transformers, ace" 2>>"$LOG"; then
  echo "benchmark_suite.sh: error: a dependency is missing (see $LOG)" | tee -a "$LOG" >&2
  exit 1
fi

# step NAME LIMIT_SECONDS COMMAND...: stdout to OUTDIR/NAME.json (NAME "tests": to the log),
# stderr to the log
step() {
  local name=$1 limit=$2 left rc t0
  shift 2
  left=$((BUDGET - ($(date +%s) - START)))
  ((limit > left)) && limit=$left
  if ((limit < 10)); then
    echo "== $name: skipped, the budget is spent" | tee -a "$LOG"
    return
  fi
  echo "== $name (at most ${limit}s): $*" | tee -a "$LOG"
  t0=$(date +%s)
  if [[ $name == tests ]]; then
    timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
  else
    timeout -k 10 "$limit" "$@" >"$OUT/$name.json" 2>>"$LOG"
  fi
  rc=$?
  echo "== $name: exit $rc after $(($(date +%s) - t0))s" | tee -a "$LOG"
}

B=scripts/benchmark.py
if ((GPU)); then
  # 1. correctness on the device: the CUDA-only tests (varlen against the naive oracle; the
  #    shipped FSDP config trains, resumes and exports on one GPU; CUDA-graph sampling makes
  #    the same images as plain calls; with a cache, T5 and the VAE leave the GPU; not the
  #    FSDP tests on CPU ranks, which CI runs)
  #    (test_pipeline.py first: the FSDP test's three launches come last, so a step that
  #    runs out of time loses them, not the CUDA-graph check)
  step tests 150 $PY -m pytest -q -p no:cacheprovider tests/test_pipeline.py \
    tests/test_attention.py tests/test_transformer.py tests/test_train.py \
    -k "(cuda or backend or fsdp or varlen or encoders_leave) and not cpu_ranks"
  # 2. the issue's goal rows: 8 x 512 px edits (training batch), one 512 px CFG step (also
  #    replayed as a CUDA graph)
  step dit_512 120 $PY $B "${DEV[@]}" --configs ace-0.6b-512 --size 512 --batch 8 --frames 2 --cuda-graph \
    --text-len 120 --repeats 10 --warmup 3 --json
  # 3. attention backends on ACE's layouts (flex separately: it compiles)
  step attention 60 $PY scripts/benchmark_attention.py "${DEV[@]}" --scale 1 --backends sdpa,varlen --json
  # 4. 1024 px: 2 samples x 2 frames (training), one 1024 px CFG step
  step dit_1024 90 $PY $B "${DEV[@]}" --configs ace-0.6b-1024 --size 1024 --batch 2 --frames 2 --cuda-graph \
    --text-len 120 --repeats 10 --warmup 3 --json
  # 5. a whole 512 px edit at the released sizes (random weights), and with model CPU offload
  step pipeline 120 $PY $B "${DEV[@]}" --configs ace-0.6b-512 --pipeline released --pipeline-only \
    --size 512 --repeats 3 --warmup 1 --json
  # 6. the VAE at 1024 px, whole and tiled
  step vae 60 $PY scripts/benchmark_vae.py "${DEV[@]}" --size 1024 --repeats 3 --json
  # 7. regional torch.compile of the 512 px rows
  step compile 240 $PY $B "${DEV[@]}" --configs ace-0.6b-512 --size 512 --batch 8 --frames 2 \
    --text-len 120 --repeats 10 --warmup 3 --compile --json
  # 8. compiled FlexAttention
  step flex 120 $PY scripts/benchmark_attention.py "${DEV[@]}" --scale 1 --backends flex --json
else
  step tests 300 $PY -m pytest -q -p no:cacheprovider tests/test_transformer.py \
    tests/test_train.py tests/test_pipeline.py -k "cuda or backend or fsdp"
  step dit_512 300 $PY $B "${DEV[@]}" --configs tiny --size 64 --repeats 2 --warmup 1 --json
  step attention 300 $PY scripts/benchmark_attention.py "${DEV[@]}" --scale 0.0625 --repeats 2 \
    --warmup 1 --backends sdpa,varlen --json
  step dit_1024 300 $PY $B "${DEV[@]}" --configs tiny --size 128 --batch 1 --repeats 2 --warmup 1 --json
  step pipeline 300 $PY $B "${DEV[@]}" --pipeline tiny --pipeline-only --size 64 --repeats 2 --json
  step vae 300 $PY scripts/benchmark_vae.py "${DEV[@]}" --size 128 --json
  step compile 600 $PY $B "${DEV[@]}" --configs tiny --size 64 --repeats 2 --warmup 1 --compile --json
  step flex 300 $PY scripts/benchmark_attention.py "${DEV[@]}" --scale 0.0625 --repeats 2 \
    --warmup 1 --backends flex --json
fi

echo "== summary ($(($(date +%s) - START))s)"
$PY scripts/summarize_benchmarks.py "$OUT"
