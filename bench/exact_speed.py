"""Exact Hessian diagonal / one plain gradient on the same samples, before and after a change (issue 22).

Each measurement is a fresh process that imports ``nfm_cli`` from --before or --after (a folder holding
an ``nfm_cli`` package, e.g. ``git archive <commit> nfm_cli | tar -x -C /tmp/before``), builds the model
with seed 0, draws 128 CIFAR-shaped samples (3x32x32, 10 classes; MLP and LeNet: 1x28x28), times one
gradient of the mean CE loss (median of 3) and ``exact_diagonal_batch`` (CE) over all samples in one batch
(timm's vit_tiny and convnext_atto: the ggn estimator's plan), and reports the ratio and the peak RSS.
Before and after alternate, --repeats rounds; median and range.

    python bench/exact_speed.py --before /tmp/before --after . --threads 1 \
        --models resnet18,wrn16-4,mlp,lenet,vit_tiny,convnext_atto

On a shared machine the wall-clock ratio is at the mercy of the load; the process CPU time ratio
(``cpu``, both threads counted) moves less, so both are reported.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

if "--child" not in sys.argv:              # a child imports nfm_cli from --before or --after only
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
else:
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def measure(model_name: str, samples: int) -> dict:
    import torch
    import torch.nn.functional as F

    from nfm_cli.curvature.exact import exact_diagonal_batch
    from nfm_cli.curvature.support import parameterised_layers

    torch.manual_seed(0)
    model, shape = build(model_name)
    model.eval()
    print("nfm_cli from", __import__("nfm_cli").__file__, file=sys.stderr)
    x, y = torch.randn(samples, *shape), torch.randint(0, 10, (samples,))
    if model_name in GGN_MODELS:
        from nfm_cli.curvature.support import curvature_plan
        layers = curvature_plan(model)
    else:
        layers = parameterised_layers(model)

    def gradient():
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()

    gradient()                                             # warm-up
    gradients = [timed(gradient) for _ in range(GRADIENT_REPEATS)]   # one-shot gradient times are noisy
    model.zero_grad(set_to_none=True)
    exact = timed(lambda: exact_diagonal_batch(model, x, y, "ce", layers))
    wall, cpu = (sorted(t[i] for t in gradients)[len(gradients) // 2] for i in (0, 1))
    return {"gradient": wall, "exact": exact[0], "ratio": exact[0] / wall, "cpu_ratio": exact[1] / cpu,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


GGN_MODELS = ("vit_tiny", "convnext_atto")     # not piecewise linear: the ggn estimator's machinery
GRADIENT_REPEATS = 3


def build(model_name: str):
    """(model, input shape): torchvision resnet18 and timm's vit_tiny (patch 4, 65 tokens) and convnext_atto
    at 32x32 with 10 classes; the registry's models (wrn16-4 32x32, mlp and lenet 28x28)."""
    if model_name == "resnet18":
        import torchvision
        return torchvision.models.resnet18(num_classes=10), (3, 32, 32)
    if model_name == "vit_tiny":
        import timm
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4,
                                 num_classes=10), (3, 32, 32)
    if model_name == "convnext_atto":
        import timm
        return timm.create_model("convnext_atto", pretrained=False, num_classes=10), (3, 32, 32)
    import nfm_models
    model = nfm_models.build(model_name)
    return model, (3, 32, 32) if model_name.startswith("wrn") else (1, 28, 28)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True)
    parser.add_argument("--after", default=".")
    parser.add_argument("--models", default="resnet18,wrn16-4,mlp,lenet")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads of each child (default torch's)")
    parser.add_argument("--touch-memory", type=float, default=8.0, metavar="GB",
                        help="write this much memory once before the first child (bench.timing.touch_memory)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        print(json.dumps(measure(args.child, args.samples)))
        return
    from bench.timing import child_row, fmt, machine, touch_memory
    print(f"touched {args.touch_memory:g} GB of memory in {touch_memory(args.touch_memory):.1f} s", flush=True)
    results: dict = {}
    for _ in range(args.repeats):
        for model in args.models.split(","):
            for label, root in (("before", args.before), ("after", args.after)):
                argv = ["--before", args.before, "--child", model, "--samples", str(args.samples)] + (
                    ["--threads", str(args.threads)] if args.threads else [])
                row = child_row(__file__, root, argv)
                results.setdefault((model, label), []).append(row)
                print(model, label, row, flush=True)
    print(machine())
    print("| model | code | gradient (s) | exact (s) | exact / gradient | cpu: exact / gradient | peak RSS (MB) "
          "| load (1 min) |")
    print("|---|---|---|---|---|---|---|---|")
    for (model, label), rows in results.items():
        loads = ", ".join(f"{r['load']:.1f}" for r in rows)
        print(f"| {model} | {label} | {fmt([r['gradient'] for r in rows])} | "
              f"{fmt([r['exact'] for r in rows], digits=2)} | "
              f"{fmt([r['ratio'] for r in rows], digits=1)}x | {fmt([r['cpu_ratio'] for r in rows], digits=1)}x | "
              f"{max(r['peak_rss_mb'] for r in rows):.0f} | "
              f"{loads} |")


if __name__ == "__main__":
    main()
