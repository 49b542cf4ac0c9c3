#!/usr/bin/env python3
"""Why exact matters (issue 20 item 8): normalized sharpness of eq. (17) from the exact Hessian diagonal
against stochastic estimators, on the checkpoints of a sweep folder.

    python3 scripts/exact_vs_stochastic.py RUNS_DIR OUTDIR [--estimators exact,hutchinson:10,...]

Each checkpoint RUNS_DIR/*seed=*.safetensors is measured by ``nfm measure --estimator E --probes P
--json --out OUTDIR/measures/...`` (existing files are reused); then OUTDIR/table.md: per estimator the
median inflation NS(E) / NS(reference, the first estimator), the median clipped fraction (diagonal
entries clipped at 0), Kendall tau of NS(E) with NS(reference) and with the generalization gap; and
OUTDIR/plot.png (NS against the gap, one series per estimator).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path

from scipy.stats import kendalltau


def measure(ckpt: Path, estimator: str, out_dir: Path) -> dict:
    """``nfm measure --json`` of ``ckpt`` with ``estimator`` (``NAME`` or ``NAME:PROBES``), cached in out_dir."""
    name, _, probes = estimator.partition(":")
    dest = out_dir / f"{ckpt.stem}.{name}{probes}.json"
    if not dest.exists():
        cmd = ["nfm", "measure", str(ckpt), "--estimator", name, "--json", "--quiet",
               "--out", str(out_dir / f"{ckpt.stem}.{name}{probes}.measures.safetensors")]
        cmd += ["--probes", probes] if probes else []
        text = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        tmp = dest.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.rename(dest)
    return json.loads(dest.read_text())


def main() -> None:
    """Measure every checkpoint with every estimator, write table.md and plot.png."""
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--estimators", default="exact,hutchinson:10,hutchinson:100")
    args = ap.parse_args()
    estimators = args.estimators.split(",")
    ckpts = sorted(p for p in args.runs.glob("*seed=*.safetensors") if ".measures" not in p.name)
    (args.out / "measures").mkdir(parents=True, exist_ok=True)
    results = {e: [measure(c, e, args.out / "measures") for c in ckpts] for e in estimators}
    ref = [r["normalized_sharpness"] for r in results[estimators[0]]]
    gap = [r["metrics"]["gap"] for r in results[estimators[0]]]
    lines = [f"{len(ckpts)} checkpoints of {args.runs}; reference: {estimators[0]}", "",
             "| estimator | median NS / NS(ref) | min | max | median clipped fraction | tau with ref | tau with gap |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for e in estimators:
        ns = [r["normalized_sharpness"] for r in results[e]]
        ratio = [a / b for a, b in zip(ns, ref, strict=True)]
        clipped = statistics.median(r["clipped_fraction"] for r in results[e])
        lines.append(f"| {e} | {statistics.median(ratio):.3f} | {min(ratio):.3f} | {max(ratio):.3f} | "
                     f"{clipped:.3g} | {kendalltau(ns, ref)[0]:+.3f} | {kendalltau(ns, gap)[0]:+.3f} |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for e in estimators:
        ax.plot(gap, [r["normalized_sharpness"] for r in results[e]], "o", label=e)
    ax.set(xlabel="generalization gap", ylabel="normalized sharpness", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "plot.png", dpi=120)


if __name__ == "__main__":
    main()
