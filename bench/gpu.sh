#!/usr/bin/env bash
# GPU checks of issue 22, prepared to run whenever a CUDA GPU is at hand (nothing runs it in CI):
#   1. one WRN-16-4 training step (forward + backward + SGD) on a CIFAR-shaped batch of 128,
#   2. `nfm measure` (exact) of WRN-16-4 and of torchvision's resnet18, both imported with random
#      weights (safetensors) on N CIFAR-shaped samples (a `tensors:` file made here),
#   3. `torchrun --nproc-per-node 2` hessian-diag (exact) on the same GPU,
#   4. CPU vs CUDA agreement of a small exact diagonal (max relative difference).
# Prints one summary table and writes it to $WORK/summary.md. Under 8 minutes on one H100 at N=10000.
#
#   bash bench/gpu.sh                               # N=10000 samples, device cuda
#   NFM_GPU_SAMPLES=64 NFM_GPU_DEVICE=cpu bash bench/gpu.sh   # dry run of the CPU parts, tiny sizes
set -euo pipefail
N=${NFM_GPU_SAMPLES:-10000}
DEVICE=${NFM_GPU_DEVICE:-cuda}
SMALL=${NFM_GPU_SMALL:-256}
WORK=${NFM_GPU_WORK:-$(mktemp -d /tmp/nfm-gpu.XXXX)}
PY=${PYTHON:-python3}
NFM="$PY -m nfm_cli"
mkdir -p "$WORK"
SUMMARY="$WORK/summary.md"
echo "| check | result | seconds |" > "$SUMMARY"
echo "|---|---|---|" >> "$SUMMARY"
row() { echo "| $1 | $2 | $3 |" >> "$SUMMARY"; }
timed() { local t0; t0=$(date +%s.%N); "$@" > /dev/null; echo "$(date +%s.%N) - $t0" | bc; }

# data and random weights
$PY - "$WORK" "$N" <<'EOF'
import sys, torch, torchvision
from safetensors.torch import save_file
import nfm_models
work, n = sys.argv[1], int(sys.argv[2])
g = torch.Generator().manual_seed(0)
data = {"train.x": torch.randn(n, 3, 32, 32, generator=g), "train.y": torch.randint(0, 10, (n,), generator=g),
        "test.x": torch.randn(256, 3, 32, 32, generator=g), "test.y": torch.randint(0, 10, (256,), generator=g)}
save_file(data, f"{work}/data.safetensors")
torch.manual_seed(0)
for name, model in (("wrn", nfm_models.build("wrn16-4")), ("resnet18", torchvision.models.resnet18(num_classes=10))):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{work}/{name}-weights.safetensors")
EOF

# 1. one training step
STEP=$($PY - "$DEVICE" <<'EOF'
import sys, time, torch, torch.nn.functional as F
import nfm_models
dev = torch.device(sys.argv[1])
model = nfm_models.build("wrn16-4").to(dev).train()
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
x, y = torch.randn(128, 3, 32, 32, device=dev), torch.randint(0, 10, (128,), device=dev)
def step():
    opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()
step()
if dev.type == "cuda": torch.cuda.synchronize()
t0 = time.perf_counter(); step()
if dev.type == "cuda": torch.cuda.synchronize()
print(f"{time.perf_counter() - t0:.4f}")
EOF
)
row "WRN-16-4 training step, batch 128 ($DEVICE)" "done" "$STEP"

# 2. import and measure
for name in wrn resnet18; do
  model=$([ $name = wrn ] && echo wrn16-4 || echo torchvision:resnet18)
  extra=$([ $name = resnet18 ] && echo "--model-arg num_classes=10" || echo "")
  $NFM import --model "$model" $extra --weights "$WORK/$name-weights.safetensors" \
      --data "tensors:$WORK/data.safetensors" --out "$WORK/$name.safetensors" --device "$DEVICE" -q --force > /dev/null
  secs=$(timed $NFM measure "$WORK/$name.safetensors" --estimator exact --device "$DEVICE" -q --force --json)
  row "measure exact, $model, $N samples ($DEVICE)" "done" "$secs"
done

# 3. two torchrun processes on one GPU (gloo on CPU)
secs1=$(timed $NFM hessian-diag "$WORK/wrn.safetensors" --estimator exact --samples "$SMALL" --device "$DEVICE" \
    --out "$WORK/h1.safetensors" -q --force)
secs2=$(timed $PY -m torch.distributed.run --nproc-per-node 2 -m nfm_cli hessian-diag "$WORK/wrn.safetensors" \
    --estimator exact --samples "$SMALL" --device "$DEVICE" --out "$WORK/h2.safetensors" -q --force)
row "hessian-diag exact, WRN-16-4, $SMALL samples, 1 process" "done" "$secs1"
row "same, torchrun 2 processes on one $DEVICE" "done" "$secs2"

# 4. CPU vs CUDA (or the two runs above against each other on a CPU dry run)
other=$([ "$DEVICE" = cpu ] && echo "$WORK/h2.safetensors" || echo "$WORK/hcpu.safetensors")
if [ "$DEVICE" != cpu ]; then
  $NFM hessian-diag "$WORK/wrn.safetensors" --estimator exact --samples "$SMALL" --device cpu --out "$other" -q --force
fi
diff=$($PY - "$WORK/h1.safetensors" "$other" <<'EOF'
import sys
from safetensors.torch import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
names = [n for n in a if n in b and a[n].is_floating_point()]
scale = max(float(b[n].abs().max()) for n in names)
print(f"{max(float((a[n].double() - b[n].double()).abs().max()) for n in names) / scale:.2e}")
EOF
)
row "max rel. diff. $DEVICE vs $( [ "$DEVICE" = cpu ] && echo torchrun || echo cpu ), exact diagonal, $SMALL samples" "$diff" "-"
cat "$SUMMARY"
echo "summary: $SUMMARY"
