#!/usr/bin/env bash
# The GPU rows of the benches in one go on one CUDA GPU, within 10 minutes (each bench's limit: 240 + 240 +
# 90 s; never yet run on a GPU, see bench/README.md). Run from the repository root:
#
#     bash bench/gpu.sh                 # prints the tables; also written to $OUT (default: bench-gpu/)
#     DEVICE=cpu bash bench/gpu.sh      # a rehearsal: the benches on the CPU at toy sizes, nothing measured
#     BENCHES="peers" bash bench/gpu.sh # only some of the benches (train, peers, generate); "" checks only
#
# A GPU machine's Python may hold other versions of the packages than this project pins: the lent H200s had
# Python 3.12 with transformers 5, huggingface-hub 1 and tokenizers 0.23, and no groundup. Nothing is
# installed from the internet here. `bash bench/gpu-wheels.sh`, run where the project's environment is, saves
# the pinned versions as wheels in .whl/; when $WHEELS (default .whl) holds wheels, this script installs them
# into a temporary folder ahead of the machine's own packages. groundup itself runs from this checkout.
#
# Before any bench, one check imports everything the benches use and prints the versions, so a missing
# package costs seconds, not the GPU's time. Each bench has its own time limit, so one that hangs cannot eat
# the others' time; a bench that fails or runs out of time is reported and the script goes on.
set -uo pipefail

OUT=${OUT:-bench-gpu}
DEVICE=${DEVICE:-cuda}
WHEELS=${WHEELS:-.whl}
PYTHON=${PYTHON:-python3}
BENCHES=${BENCHES-train peers generate}
export DEVICE USE_TF=0 TOKENIZERS_PARALLELISM=false

case $DEVICE in
    cuda)
        # Training ladder on gpt2-small, context 1024 (GPT-2's), batch 8: reference fp32, groundup fp32,
        # bf16-mixed, bf16-mixed + torch.compile, with MFU against the card's dense bf16 peak.
        TRAIN=(--device cuda --context 1024 --batch 8 --steps 20 --warmup 5)
        # groundup vs transformers on the same weights: load, generation (eager, compiled, both with prompt
        # lookup, 8 prompts at once; 200 tokens), training (bf16-mixed; through fit, in transformers' plain
        # loop and with train.compile), peak memory from the CUDA allocator.
        PEERS=(--device cuda --rounds 2 --context 1024)
        # KV cache vs the workshop's loop, 500 new tokens.
        GENERATE=(--device cuda --new-tokens 500)
        ;;
    cpu)  # the same benches at toy sizes (tests/test_gpu_script.py): proves the script, measures nothing.
        # No torch.compile rows: compiling on the CPU says nothing of inductor on CUDA and took 1.5 of the
        # rehearsal's 2 minutes (the library's compiled paths have their own tests).
        TRAIN=(--preset gpt-tiny --context 64 --batch 2 --steps 2 --warmup 1)
        PEERS=(--size gpt-tiny --rounds 1 --context 64 --new-tokens 12 --batch-prompts 3 --lookahead 4
               --steps 1 --warmup 2 --skip narrow compile)
        GENERATE=(--preset gpt-tiny --new-tokens 12)
        ;;
    *)
        echo "DEVICE=$DEVICE: use DEVICE=cuda (the measurement, the default) or DEVICE=cpu (a rehearsal)" >&2
        exit 2
        ;;
esac

mkdir -p "$OUT"
started=$(date +%s)

shopt -s nullglob
wheels=("$WHEELS"/*.whl)
shopt -u nullglob
if [ ${#wheels[@]} -gt 0 ]; then
    site=$(mktemp -d)
    if ! "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
        "${wheels[@]}"; then
        echo "could not install the wheels in $WHEELS/: keep one version of each package there" >&2
        exit 1
    fi
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" GPU_SH_SITE="$site"
fi

"$PYTHON" - <<'EOF' || exit 1
"""Everything the benches import, and the versions they will measure, before any GPU time is spent."""
import importlib
import os
import sys
from importlib.metadata import version
from pathlib import Path

import torch

if os.environ["DEVICE"] == "cuda":
    if not torch.cuda.is_available():
        sys.exit(f"no CUDA device visible to torch {torch.__version__}: nothing to measure (run this on a GPU "
                 "machine, or DEVICE=cpu for a rehearsal)")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"bf16 {torch.cuda.is_bf16_supported()}")
else:
    print(f"REHEARSAL on the CPU at toy sizes (DEVICE=cpu): the tables below are not measurements; "
          f"torch {torch.__version__}")
site = os.environ.get("GPU_SH_SITE")
if site:
    carried = sorted(p.name.split("-")[0] for p in Path(site).glob("*.dist-info"))
    print("from the carried wheels, ahead of this machine's packages: "
          + ", ".join(f"{name} {version(name)}" for name in carried))
for module in ("bench.train", "bench.peers", "bench.generate", "groundup.train.loop", "groundup.weights",
               "groundup.weights.fetch", "groundup.model.loading", "tests.gpt2_fixtures", "lightning.fabric",
               "transformers.models.gpt2.modeling_gpt2"):
    try:
        importlib.import_module(module)
    except Exception as error:  # an ImportError, or a package refusing its neighbours' versions
        sys.exit(f"cannot import {module} ({type(error).__name__}: {error}): on a machine with the project's "
                 "environment run `bash bench/gpu-wheels.sh`, and bring .whl/ along")
import transformers  # noqa: E402

print(f"python {sys.version.split()[0]}, transformers {transformers.__version__}, "
      f"lightning {version('lightning')}, safetensors {version('safetensors')}")
if int(transformers.__version__.split(".")[0]) >= 5:
    print(f"note: transformers {transformers.__version__} is not the version this project pins (<5): the peers "
          "rows measure another transformers than the CPU rows in bench/README.md (bench/gpu-wheels.sh)")
EOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader 2>/dev/null || true

failed=()
run() {  # run NAME SECONDS COMMAND...: the command's table into $OUT/NAME.md, its log into $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    case " $BENCHES " in *" $name "*) ;; *) return ;; esac
    echo "== $name (limit ${limit}s): $*"
    timeout --signal=INT --kill-after=10 "$limit" "$@" >"$OUT/$name.md" 2>"$OUT/$name.log"
    local rc=$?
    cat "$OUT/$name.md"
    if [ $rc -ne 0 ]; then
        failed+=("$name")
        echo "!! $name exited with $rc (124: out of time); last lines of $OUT/$name.log:"
        tail -n 5 "$OUT/$name.log"
    fi
    echo "   ($(($(date +%s) - started)) s so far)"
    echo
}

run train 240 "$PYTHON" -m bench.train "${TRAIN[@]}"
run peers 240 "$PYTHON" -m bench.peers "${PEERS[@]}"
run generate 90 "$PYTHON" -m bench.generate "${GENERATE[@]}"

echo "done in $(($(date +%s) - started)) s; tables in $OUT/${failed[*]:+; FAILED: ${failed[*]}}"
[ ${#failed[@]} -eq 0 ]
