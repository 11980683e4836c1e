#!/usr/bin/env bash
# The GPU check on a bare GPU box (CUDA torch, transformers, peft, accelerate; no network, no Ray). Beforehand, on a
# machine with network: `python bench/gpu_check.py --prepare .gpu_check` (tokenizer, GSM8K subset, wheels; < 64 MiB),
# then carry .gpu_check/ with the checkout. Writes $OUT/gpu_check.json and $OUT/gpu_check.log.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
SITE=.gpu_check/site
if [ ! -d "$SITE" ]; then  # hydra-core, omegaconf, antlr4 (an sdist: built here, without network) and bitsandbytes
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --find-links .gpu_check/wheels \
    --target "$SITE" hydra-core omegaconf antlr4-python3-runtime bitsandbytes
fi
export PYTHONPATH="$PWD:$PWD/$SITE${PYTHONPATH:+:$PYTHONPATH}" DISTFT_CACHE=${DISTFT_CACHE:-/tmp/distft-cache}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt" || true
python3 bench/gpu_check.py --data .gpu_check/data --tokenizer "$PWD/.gpu_check/tokenizer" --out "$OUT" "$@"
