"""Exact Hessian diagonal / one plain gradient on the same samples, before and after a change (issue 22).

Each measurement is a fresh process that imports ``nfm_cli`` from --before or --after (a folder holding
an ``nfm_cli`` package, e.g. ``git archive <commit> nfm_cli | tar -x -C /tmp/before``), builds the model
with seed 0, draws 128 CIFAR-shaped samples (3x32x32, 10 classes; MLP and LeNet: 1x28x28), times one
gradient of the mean CE loss and ``exact_diagonal_batch`` (CE) over all samples in one batch, and
reports the ratio and the peak RSS. Before and after alternate, --repeats rounds; median and IQR.

    python bench/exact_speed.py --before /tmp/before --after . --models resnet18,wrn16-4,mlp,lenet
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
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

    import nfm_models
    from nfm_cli.curvature.exact import exact_diagonal_batch
    from nfm_cli.curvature.support import parameterised_layers

    torch.manual_seed(0)
    if model_name == "resnet18":
        import torchvision
        model, shape = torchvision.models.resnet18(num_classes=10), (3, 32, 32)
    else:
        model = nfm_models.build(model_name)
        shape = (3, 32, 32) if model_name.startswith("wrn") else (1, 28, 28)
    model.eval()
    print("nfm_cli from", __import__("nfm_cli").__file__, file=sys.stderr)
    x, y = torch.randn(samples, *shape), torch.randint(0, 10, (samples,))
    layers = parameterised_layers(model)

    def gradient():
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()

    gradient()                                             # warm-up
    t0 = time.perf_counter()
    gradient()
    t1 = time.perf_counter()
    exact_diagonal_batch(model, x, y, "ce", layers)
    t2 = time.perf_counter()
    return {"gradient": t1 - t0, "exact": t2 - t1, "ratio": (t2 - t1) / (t1 - t0),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True)
    parser.add_argument("--after", default=".")
    parser.add_argument("--models", default="resnet18,wrn16-4,mlp,lenet")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.samples)))
        return
    from bench.timing import fmt, machine
    results: dict = {}
    for _ in range(args.repeats):
        for model in args.models.split(","):
            for label, root in (("before", args.before), ("after", args.after)):
                path = os.pathsep.join([os.path.abspath(root), os.environ.get("PYTHONPATH", "")])
                env = {**os.environ, "PYTHONPATH": path}
                child = [sys.executable, __file__, "--before", args.before, "--child", model,
                         "--samples", str(args.samples)]
                out = subprocess.run(child, env=env, check=True, capture_output=True, text=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                row["load"] = os.getloadavg()[0]
                results.setdefault((model, label), []).append(row)
                print(model, label, row, flush=True)
    print(machine())
    print("| model | code | gradient (s) | exact (s) | exact / gradient | peak RSS (MB) | load (1 min) |")
    print("|---|---|---|---|---|---|---|")
    for (model, label), rows in results.items():
        loads = ", ".join(f"{r['load']:.1f}" for r in rows)
        print(f"| {model} | {label} | {fmt([r['gradient'] for r in rows])} | "
              f"{fmt([r['exact'] for r in rows], digits=2)} | "
              f"{fmt([r['ratio'] for r in rows], digits=1)}x | {max(r['peak_rss_mb'] for r in rows):.0f} | "
              f"{loads} |")


if __name__ == "__main__":
    main()
