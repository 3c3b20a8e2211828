#!/usr/bin/env bash
# The GPU rows of the benches in one go, within 10 minutes on one CUDA GPU (an H100/H200-class card takes
# about 5). Run from the repository root with the project's environment active:
#
#     bash bench/gpu.sh                 # prints the tables; also written to $OUT (default: bench-gpu/)
#
# Each bench has its own time limit, so one that hangs cannot eat the others' time; a bench that fails or
# runs out of time is reported and the script goes on. Nothing here needs the internet.
set -uo pipefail

OUT=${OUT:-bench-gpu}
mkdir -p "$OUT"
export USE_TF=0 TOKENIZERS_PARALLELISM=false
started=$(date +%s)

run() {  # run NAME SECONDS COMMAND...: the command's table into $OUT/NAME.md, its log into $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  timeout --signal=INT --kill-after=10 "$limit" "$@" >"$OUT/$name.md" 2>"$OUT/$name.log"
  local rc=$?
  cat "$OUT/$name.md"
  if [ $rc -ne 0 ]; then
    echo "!! $name exited with $rc (124: out of time); last lines of $OUT/$name.log:"
    tail -n 5 "$OUT/$name.log"
  fi
  echo "   ($(( $(date +%s) - started )) s so far)"
  echo
}

python - <<'EOF' || exit 1
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(f"no CUDA device visible to torch {torch.__version__}: nothing to measure (run this on a GPU machine)")
print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"bf16 {torch.cuda.is_bf16_supported()}")
EOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader || true

# Training ladder on gpt2-small, context 1024 (GPT-2's), batch 8: reference fp32, groundup fp32, bf16-mixed,
# bf16-mixed + torch.compile, with MFU against the card's dense bf16 peak. Compilation is in the warm-up.
run train 240 python -m bench.train --device cuda --context 1024 --batch 8 --steps 20 --warmup 5

# groundup vs transformers on the same weights: load, generation (eager, compiled and both with prompt lookup,
# 200 tokens), training (bf16-mixed; groundup through fit, in transformers' plain loop and with
# train.compile), peak memory from the CUDA allocator.
run peers 240 python -m bench.peers --device cuda --rounds 2 --context 1024

# KV cache vs the workshop's loop, 500 new tokens.
run generate 90 python -m bench.generate --device cuda --new-tokens 500

echo "done in $(( $(date +%s) - started )) s; tables in $OUT/"
