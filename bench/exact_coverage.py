"""Benchmark: exact Hessian diagonal of torchvision resnet18 and the Fisher-Rao norm from the per-layer rules
(issues 10 and 12).

* resnet18 (torchvision, num_classes=10, random weights, eval mode, BatchNorm with random running
  statistics) on --resnet-samples random 32x32 inputs, float32: one gradient of the mean CE loss
  (forward + backward) against ``exact_diagonal`` (CE), time per sample and the ratio; and whether
  BackPACK's ``DiagGGNExact`` can take the model (it cannot take residual graphs: the error is reported).
* MLP 784-512-512-512-10 (``models.build("mlp")``) on --mlp-samples random inputs: the Fisher-Rao norm
  from the rules (``method="rules"``), one exact diagonal (CE) and the old per-sample-gradient path
  (``method="vmap"``), with the max relative difference of the two Fisher-Rao values.

Interleaved repeats (A, B, C, A, B, C, ...) after one warm-up each; median and interquartile range.

    python bench/exact_coverage.py --markdown BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nfm_models as models  # noqa: E402
from bench import timing  # noqa: E402
from bench.timing import median_iqr  # noqa: E402
from nfm_cli.curvature.exact import exact_diagonal  # noqa: E402
from nfm_cli.measures.fisher_rao import fisher_rao_norm  # noqa: E402

SECTION = "## Exact diagonal of resnet18 and Fisher-Rao from the rules (`bench/exact_coverage.py`)"


def interleaved(functions: dict, repeats: int) -> dict[str, tuple[float, float, float]]:
    """{name: (median, first quartile, third quartile)} of interleaved timings after a warm-up each."""
    return {name: median_iqr(values) for name, values in timing.interleaved(functions, repeats).items()}


def resnet18():
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.get_model("resnet18", weights=None, num_classes=10)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model.eval()


def backpack_diagonal(converter: bool):
    """A function computing BackPACK's DiagGGNExact of resnet18 on (x, y), CE (``use_converter``: its
    experimental fx converter, which rewrites residual sums into modules it knows)."""
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact
    bp_model, bp_loss = extend(resnet18(), use_converter=converter), extend(torch.nn.CrossEntropyLoss())

    def run(x, y):
        bp_model.zero_grad(set_to_none=True)
        with backpack(DiagGGNExact()):
            bp_loss(bp_model(x), y).backward()
        return {n: p.diag_ggn_exact.detach() for n, p in bp_model.named_parameters() if hasattr(p, "diag_ggn_exact")}
    return run


def backpack_verdict(x, y, reference: dict[str, torch.Tensor], converter: bool) -> tuple[str, object]:
    """(what BackPACK does with resnet18, the timing function when it computes the right diagonal)."""
    try:
        run = backpack_diagonal(converter)
        found = run(x, y)
    except ImportError:
        return "BackPACK not installed", None
    except Exception as exc:  # noqa: BLE001 -- we report whatever it raises
        return f"fails with {type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}", None
    if len(found) < len(reference):
        return f"ran, but left {len(reference) - len(found)} of {len(reference)} parameters without a diagonal", None
    worst = max(float((found[n].double() - reference[n]).abs().max() / reference[n].abs().max()) for n in reference)
    return f"runs; max relative difference to exact {worst:.1e}", (run if worst < 1e-3 else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--resnet-samples", type=int, default=64)
    parser.add_argument("--mlp-samples", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--markdown", help="append/replace this benchmark's section in this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    machine = (f"{platform.platform()}; {platform.machine()}; {os.cpu_count()} CPUs; torch {torch.__version__} "
               f"({torch.get_num_threads()} threads); Python {platform.python_version()}; "
               f"load average before {load:.1f}")
    command = "python " + " ".join([sys.argv[0]] + sys.argv[1:])
    print(f"machine: {machine}\ncommand: {command}", flush=True)

    gen = torch.Generator().manual_seed(2)
    model = resnet18()
    n = args.resnet_samples
    x, y = torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    params = list(model.parameters())
    reference = exact_diagonal(model, x, y, "ce", batch_size=n)
    verdict, timed = {}, {}
    for converter in (False, True):
        verdict[converter], timed[converter] = backpack_verdict(x, y, reference, converter)
    functions = {
        "gradient": lambda: torch.autograd.grad(F.cross_entropy(model(x), y), params),
        "exact": lambda: exact_diagonal(model, x, y, "ce", batch_size=n),
    }
    if timed[True] is not None:
        functions["backpack"] = lambda: timed[True](x, y)
    resnet = interleaved(functions, args.repeats)
    print(f"resnet18: {resnet}; BackPACK: {verdict}", flush=True)

    torch.manual_seed(0)
    mlp = models.build("mlp").eval()
    m = args.mlp_samples
    xm, ym = torch.randn(m, 1, 28, 28, generator=gen), torch.randint(0, 10, (m,), generator=gen)
    fisher = interleaved({
        "fisher-rao rules": lambda: fisher_rao_norm(mlp, xm, ym, method="rules"),
        "exact diagonal": lambda: exact_diagonal(mlp, xm, ym, "ce", batch_size=256),
        "fisher-rao vmap": lambda: fisher_rao_norm(mlp, xm, ym, method="vmap"),
    }, args.repeats)
    a, b = fisher_rao_norm(mlp, xm, ym, method="rules"), fisher_rao_norm(mlp, xm, ym, method="vmap")
    print(f"mlp: {fisher}; rel diff {abs(a - b) / abs(b):.1e}", flush=True)
    if args.markdown:
        write_markdown(Path(args.markdown), machine, command, args, resnet, verdict, fisher, abs(a - b) / abs(b))


def _cell(t) -> str:
    return f"{t[0]:.3f} ({t[1]:.3f}-{t[2]:.3f})"


def write_markdown(path: Path, machine, command, args, resnet, verdict, fisher, rel) -> None:
    n, grad, exact = args.resnet_samples, resnet["gradient"], resnet["exact"]
    fr, ex, vm = fisher["fisher-rao rules"], fisher["exact diagonal"], fisher["fisher-rao vmap"]
    lines = [SECTION, "",
             f"Median (interquartile range) of {args.repeats} interleaved runs, seconds, float32 on the CPU.", "",
             f"- command: `{command}`", f"- machine: {machine}",
             "- the 2-core machine was shared with other jobs during the run (see the load average): "
             "absolute times are inflated and noisy, ratios of interleaved runs less so", "",
             f"resnet18 (torchvision, 10 classes, 32x32 inputs, {n} samples in one batch, eval mode), CE loss:", "",
             "| | time (s) | per sample (ms) | / gradient |", "|---|---|---|---|",
             f"| one gradient (forward + backward) | {_cell(grad)} | {1000 * grad[0] / n:.1f} | 1 |",
             f"| exact Hessian diagonal | {_cell(exact)} | {1000 * exact[0] / n:.1f} | "
             f"{exact[0] / grad[0]:.1f}x |",
             *([f"| BackPACK DiagGGNExact, `use_converter=True` | {_cell(resnet['backpack'])} | "
                f"{1000 * resnet['backpack'][0] / n:.1f} | {resnet['backpack'][0] / grad[0]:.1f}x |"]
               if "backpack" in resnet else []), "",
             "BackPACK `DiagGGNExact` on the same resnet18 and batch (CE): as is (`extend(model)`): "
             f"{verdict[False]}; with its experimental fx converter (`use_converter=True`): {verdict[True]}. "
             "BackPACK's module extensions back-propagate their quantities through `nn.Sequential` chains of "
             "known layers; the residual sums of a ResNet block live in the block's own `forward`.", "",
             f"Fisher-Rao norm (eq. 25) on the MLP 784-512-512-512-10 with {args.mlp_samples} samples:", "",
             "| | time (s) | / one exact diagonal |", "|---|---|---|",
             f"| Fisher-Rao, per-layer rules (one forward + one backward per batch) | {_cell(fr)} | "
             f"{fr[0] / ex[0]:.2f}x |",
             f"| one exact Hessian diagonal (CE, batch 256) | {_cell(ex)} | 1 |",
             f"| Fisher-Rao, old path (torch.func vmap per-sample gradients, chunks of 64) | {_cell(vm)} | "
             f"{vm[0] / ex[0]:.2f}x |", "",
             f"New path {vm[0] / fr[0]:.1f}x faster than the old one; the two values differ by {rel:.1e} "
             "(relative). Target (issue 12): Fisher-Rao at most 2x one exact diagonal."]
    section = "\n".join(lines) + "\n"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(SECTION) + r".*?(?=\n## |\Z)", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


if __name__ == "__main__":
    main()
