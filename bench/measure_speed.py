"""``measure`` / one ``hessian-diag`` of the same checkpoint (issue 22 item 3), before and after a change.

``measure`` computes the normalized-ce and ce diagonals, the Fisher-Rao norm and the solve; with the shared
forward pass it should cost at most 1.6x one ``hessian-diag`` (one forward and 2(K-1)+1 directions per batch
instead of three forward passes). Checkpoints: the MLP trained 1 epoch on the synthetic set (width 512,
1024 samples), and torchvision's resnet18 (10 classes, random weights, ``nfm import``) on 256 random
CIFAR-shaped samples. Each measurement is a fresh process importing ``nfm_cli`` from --before or --after;
before/after and measure/hessian-diag alternate, --repeats rounds; median and range.

    python bench/measure_speed.py --before /tmp/before --after . --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if "--child" not in sys.argv:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
else:
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

BATCH = 128


def make_checkpoints(folder: Path) -> dict[str, Path]:
    """The MLP (trained) and resnet18 (imported) checkpoints, made once in ``folder``."""
    import torch
    import torchvision
    from safetensors.torch import save_file

    from nfm_cli.steps.importing import ImportConfig, import_checkpoint
    from nfm_cli.steps.train import TrainConfig, train
    paths = {"mlp": folder / "mlp.safetensors", "resnet18": folder / "resnet18.safetensors"}
    if not paths["mlp"].exists():
        train(TrainConfig(model="mlp", dataset="synthetic", width=512, epochs=1, batch_size=128, train_size=1024,
                          test_size=64, seed=0), paths["mlp"], device="cpu")
    if not paths["resnet18"].exists():
        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=10)
        torch.save(model.state_dict(), folder / "resnet18.pt")
        gen = torch.Generator().manual_seed(1)
        save_file({"train.x": torch.randn(256, 3, 32, 32, generator=gen),
                   "train.y": torch.randint(0, 10, (256,), generator=gen),
                   "test.x": torch.randn(16, 3, 32, 32, generator=gen),
                   "test.y": torch.randint(0, 10, (16,), generator=gen)}, str(folder / "data.safetensors"))
        import_checkpoint(ImportConfig(model="torchvision:resnet18", weights=str(folder / "resnet18.pt"),
                                       data=f"tensors:{folder / 'data.safetensors'}", model_args=["num_classes=10"]),
                          paths["resnet18"], device="cpu")
    return paths


def child(step: str, checkpoint: str, folder: str) -> dict:
    from nfm_cli.steps.hessian_diag import compute_hessian_diagonal
    from nfm_cli.steps.measure import measure_checkpoint
    print("nfm_cli from", __import__("nfm_cli").__file__, file=sys.stderr)
    out = Path(folder) / f"{step}.{os.getpid()}.safetensors"
    t0 = time.perf_counter()
    if step == "measure":
        measure_checkpoint(checkpoint, out, estimator="exact", batch_size=BATCH, device="cpu", force=True,
                           keep_intermediate=False)
    else:
        compute_hessian_diagonal(checkpoint, out, loss="normalized-ce", estimator="exact", batch_size=BATCH,
                                 device="cpu", force=True)
    seconds = time.perf_counter() - t0
    out.unlink(missing_ok=True)
    return {"seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True)
    parser.add_argument("--after", default=".")
    parser.add_argument("--models", default="mlp,resnet18")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--folder", default="/tmp/nfm-measure-speed")
    parser.add_argument("--touch-memory", type=float, default=8.0, metavar="GB",
                        help="write this much memory once before the first child (bench.timing.touch_memory)")
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch
        torch.set_num_threads(args.threads)
        print(json.dumps(child(args.child[0], args.child[1], args.folder)))
        return
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = make_checkpoints(folder)
    from bench.timing import child_row, fmt, machine, touch_memory
    print(f"touched {args.touch_memory:g} GB of memory in {touch_memory(args.touch_memory):.1f} s", flush=True)
    results: dict = {}
    for _ in range(args.repeats):
        for model in args.models.split(","):
            for label, root in (("before", args.before), ("after", args.after)):
                for step in ("hessian-diag", "measure"):
                    argv = ["--before", args.before, "--threads", str(args.threads), "--folder", args.folder,
                            "--child", step, str(paths[model])]
                    row = child_row(__file__, root, argv)
                    results.setdefault((model, label, step), []).append(row)
                    print(model, label, step, row, flush=True)
    print(machine())
    print("| model | code | hessian-diag (s) | measure (s) | measure / hessian-diag | load (1 min) |")
    print("|---|---|---|---|---|---|")
    for model in args.models.split(","):
        for label in ("before", "after"):
            hdiag = [r["seconds"] for r in results[(model, label, "hessian-diag")]]
            measure = [r["seconds"] for r in results[(model, label, "measure")]]
            loads = ", ".join(f"{r['load']:.1f}" for r in results[(model, label, "measure")])
            print(f"| {model} | {label} | {fmt(hdiag, digits=2)} | {fmt(measure, digits=2)} | "
                  f"{fmt([m / h for m, h in zip(measure, hdiag, strict=True)], digits=2)}x | {loads} |")


if __name__ == "__main__":
    main()
