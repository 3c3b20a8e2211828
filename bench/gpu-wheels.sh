#!/usr/bin/env bash
# Wheels for bench/gpu.sh: the packages a GPU machine's Python holds at versions this project does not pin,
# at the versions of this environment, for that machine's Python. Run from the repository root with the
# project's environment active, on a machine that reaches a package index:
#
#     bash bench/gpu-wheels.sh          # into .whl/ (git-ignored); bring it along with the checkout
#
# The lent H200s (2026-11) had Python 3.12 with transformers 5.17, huggingface-hub 1.33 and tokenizers
# 0.23.2; the project pins transformers <5, whose import refuses huggingface-hub >=1 and tokenizers >0.23.0.
# Everything else the benches import was there (torch, lightning, safetensors, tiktoken, pyarrow, numpy).
set -euo pipefail

WHEELS=${WHEELS:-.whl}
PY_VERSION=${PY_VERSION:-3.12}
PYTHON=${PYTHON:-python3}

pins=$("$PYTHON" - <<'EOF'
from importlib.metadata import version

print(" ".join(f"{name}=={version(name)}" for name in ("transformers", "huggingface-hub", "tokenizers")))
EOF
)
mkdir -p "$WHEELS"
rm -f "$WHEELS"/*.whl  # one version of each package: two would stop gpu.sh's install
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" $pins
echo "for Python $PY_VERSION in $WHEELS/: $pins ($(du -sh "$WHEELS" | cut -f1))"
