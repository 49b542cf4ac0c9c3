"""The ggn diagonal of tiny ViTs and ConvNeXts as a multiple of one gradient (issue 20).

For each model (random weights, seed 0, eval mode, float32, 10 classes): one gradient of the mean CE
loss over --samples samples (forward + backward) and the ggn diagonal (normalized-ce, the loss of
normalized sharpness: K-1 = 9 backward directions; the estimator built once beforehand, as ``nfm
measure`` does per run) over the same samples in one batch; interleaved, --repeats rounds after a
warm-up each, median and interquartile range of the ratio's two parts.

* ``vit-tiny``: nfm's own (``nfm_models``: 28x28x1, 4x4 patches, width 32, depth 2, 2 heads);
* timm ``vit_tiny_patch16_224`` built for 32x32 inputs with 4x4 patches (65 tokens, width 192, depth 12);
* timm ``convnext_atto`` (3.4M parameters) and torchvision ``convnext_tiny`` (28M) on 32x32 inputs.

    nice -n 10 python bench/ggn_speed.py [--models vit-tiny,convnext_atto] [--samples 32] [--repeats 5]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import timing  # noqa: E402
from nfm_cli.curvature.estimators import make_estimator  # noqa: E402

MODELS = ("vit-tiny", "vit_tiny_patch16_224", "convnext_atto", "convnext_tiny")


def build(name: str) -> tuple[torch.nn.Module, tuple[int, int, int]]:
    """The model and its input shape (channels, height, width)."""
    torch.manual_seed(0)
    if name == "vit-tiny":
        import nfm_models
        return nfm_models.build("vit-tiny").eval(), (1, 28, 28)
    if name == "convnext_tiny":
        import torchvision
        return torchvision.models.get_model(name, weights=None, num_classes=10).eval(), (3, 32, 32)
    import timm
    config = dict(img_size=32, patch_size=4) if name.startswith("vit") else {}
    return timm.create_model(name, pretrained=False, num_classes=10, **config).eval(), (3, 32, 32)


def measure(name: str, samples: int, repeats: int) -> dict:
    """Seconds of one gradient and one ggn diagonal (lists over the repeats), parameters, samples."""
    model, shape = build(name)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(samples, *shape, generator=gen), torch.randint(0, 10, (samples,), generator=gen)
    params = list(model.parameters())
    est = make_estimator("ggn", model, x, y, "normalized-ce", batch_size=samples)

    def gradient():
        torch.autograd.grad(F.cross_entropy(model(x), y), params)

    def diagonal():
        state = est.initial_state()
        for unit in range(est.units_total):
            est.run_unit(unit, state)
        est.finish(state)
    times = timing.interleaved({"gradient": gradient, "ggn": diagonal}, repeats)
    return {"model": name, "params": sum(p.numel() for p in params), "input": shape, **times}


def row(result: dict, samples: int) -> str:
    grad, ggn = timing.median_iqr(result["gradient"]), timing.median_iqr(result["ggn"])
    return (f"| {result['model']} | {result['params'] / 1e6:.2f}M | {'x'.join(map(str, result['input']))} | "
            f"{1000 * grad[0] / samples:.2f} [{1000 * grad[1] / samples:.2f}-{1000 * grad[2] / samples:.2f}] | "
            f"{1000 * ggn[0] / samples:.1f} [{1000 * ggn[1] / samples:.1f}-{1000 * ggn[2] / samples:.1f}] | "
            f"{ggn[0] / grad[0]:.1f} |")


def main() -> None:
    """Measure the models asked for and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = [f"- command: `{timing.command()}`", f"- machine: {timing.machine()}",
             f"- {timing.versions('timm', 'torchvision')}", "",
             f"Per sample, milliseconds, median [IQR] of {args.repeats} interleaved runs, {args.samples} samples "
             "in one batch, float32:", "",
             "| model | parameters | input | gradient (ms/sample) | ggn diagonal, normalized-ce (ms/sample) | "
             "ggn / gradient |", "|---|---:|---|---:|---:|---:|"]
    for name in args.models.split(","):
        lines.append(row(measure(name, args.samples, args.repeats), args.samples))
        print(lines[-1], file=sys.stderr, flush=True)
    lines.append(f"\nload average at the end: {timing.machine().rsplit('load average ', 1)[-1]}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
