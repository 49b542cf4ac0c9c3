#!/usr/bin/env bash
# One run of the paper's random-label protocol (Sec. 6.1, Appendix E): train, then measure.
#
#   scripts/sweep_run.sh INDEX OUTDIR [extra nfm train options...]
#
# Run INDEX (0, 1, 2, ...) gets seed INDEX and random-label ratio RATIOS[INDEX mod 11], so any 11
# consecutive runs cover 0.0, 0.1, ..., 1.0 once (the paper draws the ratio at random per run; a
# balanced assignment gives the same design with fewer runs). Each run is an independent,
# resumable command: rerunning skips what is finished (nfm train leaves a complete checkpoint
# alone; nfm measure leaves a finished measures file alone and resumes its Hessian files).
# Environment: MODEL (mlp), DATASET (fashion-mnist), TRAIN_SIZE (1024), TEST_SIZE (2000),
# EPOCHS (60), BATCH_SIZE (128), LR (1e-3), NFM (nfm).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 INDEX OUTDIR [extra nfm train options...]" >&2
  exit 2
fi
index=$1; outdir=$2; shift 2
ratios=(0.0 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9 1.0)
ratio=${ratios[$((index % 11))]}
model=${MODEL:-mlp}; dataset=${DATASET:-fashion-mnist}
nfm=${NFM:-nfm}
mkdir -p "$outdir"
ckpt="$outdir/$model-$dataset-run$(printf %03d "$index")-r$ratio.safetensors"
$nfm train --model "$model" --dataset "$dataset" --random-ratio "$ratio" --seed "$index" \
  --train-size "${TRAIN_SIZE:-1024}" --test-size "${TEST_SIZE:-2000}" --epochs "${EPOCHS:-60}" \
  --batch-size "${BATCH_SIZE:-128}" --lr "${LR:-1e-3}" --quiet --out "$ckpt" "$@" >/dev/null
$nfm measure "$ckpt" --json >/dev/null
echo "${ckpt%.safetensors}.measures.safetensors"
