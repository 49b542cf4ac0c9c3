#!/usr/bin/env bash
# make reproduce-protocol (issue 11): normalized sharpness judged the way the field judges
# generalization measures, at CPU scale on Fashion-MNIST.
#
#   scripts/reproduce_protocol.sh [OUTDIR]        (default results/protocol)
#
# 1. protocol-mlp / protocol-mlp-sgd: a Jiang et al. 2020-style grid (scripts/grids/protocol-mlp*.toml:
#    width x lr x batch size x random-label ratio x 2 seeds, 32 MLPs trained to a training
#    cross-entropy of 0.01) with Adam and again with SGD, measured with the rival measures, scored with
#    `nfm report --protocol` (Kendall tau, granulated Kendall, CMI, robust sign error) per optimizer
#    and for both together (protocol-mlp-both); runs that missed the stopping criterion are left out
#    (--max-train-loss 0.01), as Jiang et al. do.
# 2. protocol-mlp-size: clean labels, the training-set size (256/1024) as an axis next to width,
#    depth, lr and batch size (64 MLPs).
# 3. lenet-random: the paper's random-label protocol on LeNet (10 runs).
# 4. wrn-random: the same on WRN-10-1 with BatchNorm (10 runs), then every checkpoint rescaled with
#    `nfm rescale --mode bn` (a random factor in [0.2, 5] per channel of every conv that feeds a
#    BatchNorm: the same function) and measured again (wrn-random-rescaled).
#
# Every step is resumable: rerunning skips finished runs (nfm sweep), existing rescaled checkpoints
# and finished measures files. Environment: JOBS (runs at once, default 2; each gets cores/JOBS
# threads), NFM (nfm), PYTHON (python3). The per-run files go to OUTDIR/runs/ (not committed); the
# reports (*.txt tables, *.json, *.csv, plots/) to OUTDIR.
set -euo pipefail
out=${1:-results/protocol}
jobs=${JOBS:-2}
nfm=${NFM:-nfm}
grids=$(cd "$(dirname "$0")" && pwd)/grids
runs=$out/runs
export COLUMNS=${COLUMNS:-150}      # the width of the text tables written below
mkdir -p "$runs" "$out/plots"

sweep() {   # sweep NAME [extra nfm sweep options]
  local name=$1; shift
  echo "== $name: $($nfm sweep --grid-file "$grids/$name.toml" --out "$runs/$name" --list | wc -l) runs" >&2
  $nfm sweep --grid-file "$grids/$name.toml" --out "$runs/$name" --jobs "$jobs" "$@"
}

sweep protocol-mlp --rivals
sweep protocol-mlp-sgd --rivals
sweep protocol-mlp-size --rivals
sweep lenet-random
sweep wrn-random

echo "== wrn-random-rescaled: rescale (--mode bn) and measure" >&2
mkdir -p "$runs/wrn-random-rescaled"
seed=0
for ckpt in "$runs"/wrn-random/*seed=*.safetensors; do
  case $ckpt in *.measures.safetensors|*.hdiag-*) continue ;; esac
  rescaled=$runs/wrn-random-rescaled/$(basename "$ckpt")
  [ -f "$rescaled" ] || $nfm rescale "$ckpt" --mode bn --random-range 0.2 5 --seed "$seed" --out "$rescaled" >/dev/null
  [ -f "${rescaled%.safetensors}.measures.safetensors" ] || $nfm measure "$rescaled" --quiet >/dev/null
  seed=$((seed + 1))
done

paper_measures=normalized_sharpness,matrix_normalized_sharpness,hessian_trace,fisher_rao_norm,frobenius_norm_sq,spectral_norm_product
rivals=$(${PYTHON:-python3} -c "from nfm_cli.measures.registry import rival_keys; print(','.join(rival_keys()))")
report() {  # report NAME "FOLDERS" MEASURES [extra nfm report options]
  local name=$1 folders=$2 measures=$3 files=() folder; shift 3
  for folder in $folders; do files+=("$runs/$folder"/*.measures.safetensors); done
  $nfm report "${files[@]}" --x "$measures" --csv "$out/$name.csv" --json "$@" -q > "$out/$name.json"
  $nfm report "${files[@]}" --x "$measures" "$@" -q > "$out/$name.txt"
}
report protocol-mlp protocol-mlp "$paper_measures,$rivals" --protocol --max-train-loss 0.01
report protocol-mlp-sgd protocol-mlp-sgd "$paper_measures,$rivals" --protocol --max-train-loss 0.01
report protocol-mlp-both "protocol-mlp protocol-mlp-sgd" "$paper_measures,$rivals" --protocol --max-train-loss 0.01
report protocol-mlp-size protocol-mlp-size "$paper_measures,$rivals" --protocol --max-train-loss 0.01
report lenet-random lenet-random "$paper_measures" --plot "$out/plots/lenet-random"
report wrn-random wrn-random "$paper_measures" --plot "$out/plots/wrn-random"
report wrn-random-rescaled wrn-random-rescaled "$paper_measures" --plot "$out/plots/wrn-random-rescaled"
cat "$out"/*.txt
