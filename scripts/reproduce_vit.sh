#!/usr/bin/env bash
# make reproduce-vit (issue 21): the paper's random-label protocol (Sec. 6.1) on a Vision Transformer,
# and the transformer symmetries, at CPU scale on Fashion-MNIST.
#
#   scripts/reproduce_vit.sh [OUTDIR]        (default results/vit)
#
# 1. vit-random: vit-tiny (scripts/grids/vit-random.toml: 4x4 patches, 2 pre-LN blocks of width 32,
#    AdamW with a warm-up) on 1024 samples, random-label ratios 0..1 x 2 seeds, trained to a training
#    cross-entropy of 0.01, measured by `nfm measure` with its default estimator (the Gauss-Newton
#    diagonal `ggn` for GELU/softmax/LayerNorm networks, issue 20) and the rival measures (adaptive
#    sharpness among them), and again with `--estimator hutchinson` (the Hessian's own trace, noisy).
# 2. vit-random-rescaled: every checkpoint rescaled with `nfm rescale --mode all` (per head dimension,
#    query x a / key x 1/a and value x b / output column x 1/b; every pre-LN norm's gain and bias x c
#    with its consumers' columns x 1/c; factors in [0.2, 5]: the same function) and measured again.
# 3. Reports: Kendall tau of every measure against the gap before and after rescaling, the Figure-1
#    plots, and rescaled-vs-original ratios per run (a value that moves under rescaling is not a
#    function of the network, whatever its tau).
#
# Every step is resumable: rerunning skips finished runs (nfm sweep), existing rescaled checkpoints
# and finished measures files. Environment: JOBS (runs at once, default 2), NFM (nfm), PYTHON
# (python3), GRID_FILE, PROBES (hutchinson probes, default 20: 100 probes took 355 s per run on one
# thread; the grid's sizing is in scripts/grids/vit-random.toml). Per-run files go to OUTDIR/runs/ (not committed).
set -euo pipefail
out=${1:-results/vit}
jobs=${JOBS:-2}
nfm=${NFM:-nfm}
probes=${PROBES:-20}
grid=${GRID_FILE:-$(cd "$(dirname "$0")" && pwd)/grids/vit-random.toml}   # GRID_FILE: another grid (smoke tests)
runs=$out/runs
export COLUMNS=${COLUMNS:-150}
mkdir -p "$runs/vit-random-rescaled" "$out/plots"

echo "$(date -u +%T) == vit-random: $($nfm sweep --grid-file "$grid" --out "$runs/vit-random" --list | wc -l) runs" >&2
$nfm sweep --grid-file "$grid" --out "$runs/vit-random" --jobs "$jobs" --rivals

checkpoints() {  # the trained checkpoints of a folder (not the measures files or intermediates)
  for ckpt in "$1"/*seed=*.safetensors; do
    case $ckpt in *.measures.safetensors|*.hdiag-*|*.hutchinson.*) continue ;; esac
    echo "$ckpt"
  done
}

measure_all() {  # measure_all [nfm measure options]: stdin lines "CHECKPOINT OUT", $jobs at once, missing OUT only
  local opts="$*"
  while read -r ckpt dest; do [ -f "$dest" ] || echo "$ckpt $dest"; done |
    xargs -r -P "$jobs" -L 1 sh -c 'NFM_THREADS=1 '"$nfm"' measure "$0" --out "$1" '"$opts"' --quiet >/dev/null'
}

echo "$(date -u +%T) == vit-random-rescaled: rescale (--mode all) and measure" >&2
seed=0
for ckpt in $(checkpoints "$runs/vit-random"); do
  rescaled=$runs/vit-random-rescaled/$(basename "$ckpt")
  [ -f "$rescaled" ] || $nfm rescale "$ckpt" --mode all --random-range 0.2 5 --seed "$seed" --out "$rescaled" >/dev/null
  seed=$((seed + 1))
done
for ckpt in $(checkpoints "$runs/vit-random-rescaled"); do
  echo "$ckpt ${ckpt%.safetensors}.measures.safetensors"
done | measure_all --rivals

echo "$(date -u +%T) == hutchinson ($probes probes): the Hessian trace itself, before and after rescaling" >&2
for folder in vit-random vit-random-rescaled; do
  mkdir -p "$runs/$folder-hutchinson"
  for ckpt in $(checkpoints "$runs/$folder"); do
    echo "$ckpt $runs/$folder-hutchinson/$(basename "${ckpt%.safetensors}").measures.safetensors"
  done
done | measure_all --estimator hutchinson --probes "$probes"

measures=normalized_sharpness,matrix_normalized_sharpness,hessian_trace,frobenius_norm_sq,adaptive_sharpness
report() {  # report NAME FOLDER [extra nfm report options]
  local name=$1 folder=$2; shift 2
  $nfm report "$runs/$folder"/*.measures.safetensors --x "$measures" --csv "$out/$name.csv" --json "$@" -q > "$out/$name.json"
  $nfm report "$runs/$folder"/*.measures.safetensors --x "$measures" "$@" -q > "$out/$name.txt"
}
report vit-random vit-random --plot "$out/plots/vit-random"
report vit-random-rescaled vit-random-rescaled --plot "$out/plots/vit-random-rescaled"
report vit-random-hutchinson vit-random-hutchinson
report vit-random-rescaled-hutchinson vit-random-rescaled-hutchinson
${PYTHON:-python3} "$(dirname "$0")/rescale_ratios.py" "$runs/vit-random" "$runs/vit-random-rescaled" \
  "$runs/vit-random-hutchinson" "$runs/vit-random-rescaled-hutchinson" > "$out/rescale-ratios.txt"
cat "$out"/*.txt
