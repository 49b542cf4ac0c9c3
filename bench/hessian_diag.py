"""Benchmark of ``nfm hessian-diag --estimator exact`` against one gradient and BackPACK (issue 3).

Trains (once; cached in --workdir) an MLP 784-512-512-512-10 and a LeNet on 2048 Fashion-MNIST
training samples with ``nfm train``, then times side by side, interleaved, --repeats rounds:

* one full-set gradient of the mean CE loss (one forward + backward over all 2048 samples),
* ``exact`` (``nfm_cli.curvature.estimators.estimate_diagonal``, the code path of ``nfm hessian-diag``), CE loss,
* BackPACK's ``DiagGGNExact`` (backpack-for-pytorch, a benchmark-only dependency), CE loss, full batch,

and reports each as a ratio to the gradient and the max relative difference exact vs BackPACK.
Times are the median and interquartile range of --repeats interleaved runs; ``--markdown FILE``
replaces this script's section of FILE in place. ``--stochastic`` adds hutchinson and finite-diff at
--probes probes (time and relative L2 error against exact); ``--finite-diff-scan mlp:100,lenet:100`` the finite-diff
error for several radius scales c (r_t = c * rms(theta_t)).

    python bench/hessian_diag.py --stochastic --finite-diff-scan mlp:100,mlp:1000,lenet:100 --markdown BENCHMARKS.md
    python bench/hessian_diag.py --torchrun --repeats 3 --markdown BENCHMARKS.md   # the torchrun section
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.timing import command, fmt, interleaved, machine, median_iqr, replace_section, versions  # noqa: E402
from nfm_cli.curvature.batch_size import auto_batch_size  # noqa: E402
from nfm_cli.curvature.estimators import estimate_diagonal  # noqa: E402
from nfm_cli.steps.train import TrainConfig, train  # noqa: E402
from nfm_cli.store.checkpoint import load_checkpoint  # noqa: E402

SECTION = "## Hessian diagonal (`bench/hessian_diag.py`)"
TORCHRUN_SECTION = ("## Sharded `hessian-diag` with torchrun, 1 vs 2 processes on the CPU "
                    "(`bench/hessian_diag.py --torchrun`)")
SCAN_HEADING = "### Finite-difference radius scan"


def checkpoints(workdir: Path, epochs: int) -> dict[str, Path]:
    out = {}
    for model in ("mlp", "lenet"):
        path = workdir / f"{model}-fmnist2048-e{epochs}.safetensors"
        train(TrainConfig(model=model, dataset="fashion-mnist", train_size=2048, test_size=2000, epochs=epochs,
                          batch_size=128, seed=0), path, device="cpu")
        out[model] = path
    return out


def relative_l2(estimate, reference):
    diff = torch.cat([(estimate[n] - reference[n]).flatten() for n in reference])
    return float(diff.norm() / torch.cat([r.flatten() for r in reference.values()]).norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/nfm-bench-hessian")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timed runs (median and IQR reported)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="exact's batch size (default: the tool's automatic choice)")
    parser.add_argument("--stochastic", action="store_true", help="also time hutchinson and finite-diff")
    parser.add_argument("--probes", type=int, default=100)
    parser.add_argument("--stochastic-batch-size", type=int, default=512)
    parser.add_argument("--finite-diff-scan", default="", metavar="MODEL:PROBES,...",
                        help="finite-diff error vs radius scale, e.g. mlp:100,mlp:1000,lenet:100")
    parser.add_argument("--scan-scales", default="1e-4,1e-3,1e-2,3e-2,1e-1,3e-1")
    parser.add_argument("--models", default="mlp,lenet", help="models to time")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--markdown", help="replace this benchmark's section in this file (or append it)")
    parser.add_argument("--torchrun", action="store_true", help="instead: nfm hessian-diag end to end with 1 "
                        "process (default threads, one thread) and 2 torchrun processes, interleaved")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.torchrun:
        torchrun_benchmark(args)
        return
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    where = f"{machine()}; {versions('backpack-for-pytorch', 'numpy')}"
    print(f"machine: {where}\ncommand: {command()}", flush=True)
    paths = checkpoints(workdir, args.epochs)
    rows, extra_rows, scan_rows = [], [], []
    for name, path in paths.items():
        if name not in args.models.split(","):
            continue
        ck = load_checkpoint(path)
        model = ck.model.eval()
        x, y = ck.training_tensors()
        params = [p for p in model.parameters()]

        def gradient():
            grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
            return grads

        bp_model = extend(load_checkpoint(path).model.eval())
        bp_loss = extend(torch.nn.CrossEntropyLoss())

        def backpack_diag():
            bp_model.zero_grad(set_to_none=True)
            with backpack(DiagGGNExact()):
                bp_loss(bp_model(x), y).backward()
            return {n: p.diag_ggn_exact.detach() for n, p in bp_model.named_parameters()}

        batch = args.batch_size or auto_batch_size(model, x[:1], "exact", len(y))

        def exact():
            return estimate_diagonal(model, x, y, "ce", "exact", batch_size=batch).diagonal

        runs = interleaved({"gradient": gradient, "exact": exact, "backpack": backpack_diag}, args.repeats)
        t = {name: median_iqr(v)[0] for name, v in runs.items()}
        ours, theirs = exact(), backpack_diag()
        max_rel = max(float((ours[n] - theirs[n].double()).abs().max() / theirs[n].abs().max().double())
                      for n in theirs)
        row = dict(model=name, params=sum(p.numel() for p in params), **t, runs=runs, max_rel=max_rel, batch=batch,
                   train_acc=ck.metrics.get("train_acc"))
        rows.append(row)
        print(f"{name}: gradient {t['gradient']:.3f}s, exact {t['exact']:.3f}s ({t['exact'] / t['gradient']:.1f}x), "
              f"BackPACK {t['backpack']:.3f}s ({t['backpack'] / t['gradient']:.1f}x), exact/BackPACK "
              f"{t['exact'] / t['backpack']:.2f}, max rel diff {max_rel:.1e}", flush=True)
        if args.stochastic:
            for est in ("hutchinson", "finite-diff"):
                t0 = time.perf_counter()
                result = estimate_diagonal(model, x, y, "ce", est, batch_size=args.stochastic_batch_size,
                                           probes=args.probes, seed=0)
                seconds = time.perf_counter() - t0
                err = relative_l2(result.diagonal, ours)
                extra_rows.append((name, est, args.probes, seconds, seconds / t["gradient"], err))
                print(f"  {est} {args.probes} probes: {seconds:.1f}s, rel L2 error {100 * err:.0f}%", flush=True)
        scans = [int(item.split(":")[1]) for item in args.finite_diff_scan.split(",")
                 if item and item.split(":")[0] == name]
        for probes in scans:
            for scale in [float(v) for v in args.scan_scales.split(",")]:
                result = estimate_diagonal(model, x, y, "ce", "finite-diff", batch_size=512, probes=probes,
                                           seed=0, finite_diff_scale=scale)
                err = relative_l2(result.diagonal, ours)
                scan_rows.append((name, scale, probes, err))
                print(f"  finite-diff c={scale:g} {probes} probes: rel L2 error {100 * err:.0f}%", flush=True)
            # for comparison: hutchinson with as many probes
            result = estimate_diagonal(model, x, y, "ce", "hutchinson", batch_size=512, probes=probes, seed=0)
            err = relative_l2(result.diagonal, ours)
            scan_rows.append((name, "hutchinson", probes, err))
            print(f"  hutchinson {probes} probes: rel L2 error {100 * err:.0f}%", flush=True)

    if args.markdown:
        write_markdown(Path(args.markdown), where, command(), args, rows, extra_rows, scan_rows)


def write_markdown(path: Path, machine, command, args, rows, extra_rows, scan_rows) -> None:
    lines = [SECTION, "",
             "`exact` (per-layer Gauss-Newton rules, `nfm_cli/curvature/exact.py`) versus one full-set gradient and "
             "BackPACK's `DiagGGNExact`, CE loss, N = 2048 Fashion-MNIST training samples, checkpoints from "
             f"`nfm train --train-size 2048 --epochs {args.epochs}`. Times: median [interquartile range] of "
             f"{args.repeats} interleaved runs; ratios of medians.", "",
             f"- command: `{command}`", f"- machine and versions: {machine}", "",
             "| model | params | gradient (s) | exact (s) | exact batch | exact / gradient | "
             "BackPACK (s) | BackPACK / gradient | exact / BackPACK | max rel. diff. to BackPACK |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params']:,} | {fmt(r['runs']['gradient'])} | {fmt(r['runs']['exact'])} | "
                     f"{r['batch']} | {r['exact'] / r['gradient']:.1f}x | {fmt(r['runs']['backpack'])} | "
                     f"{r['backpack'] / r['gradient']:.1f}x | "
                     f"{r['exact'] / r['backpack']:.2f} | {r['max_rel']:.1e} |")
    if extra_rows:
        lines += ["", f"Stochastic estimators (batch {args.stochastic_batch_size}, CE loss, seed 0, default "
                  "finite-diff radius; one run each):", "",
                  "| model | estimator | probes | time (s) | / gradient | rel. L2 error vs exact |",
                  "|---|---|---|---|---|---|"]
        for name, est, probes, seconds, ratio, err in extra_rows:
            lines.append(f"| {name} | {est} | {probes} | {seconds:.1f} | {ratio:.0f}x | {100 * err:.0f}% |")
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(SECTION) + r".*?(?=\n## |\Z)", re.S)
    if scan_rows:
        lines += ["", SCAN_HEADING, "",
                  f"`{command}` on {machine}.", "",
                  "Radius r_t = c * rms(theta_t); relative L2 error of finite-diff against exact, CE loss, the same "
                  "probes for every c, and Hutchinson with as many probes for comparison.", "",
                  "| model | c | probes | rel. L2 error |", "|---|---|---|---|"]
        for name, scale, probes, err in scan_rows:
            label = scale if isinstance(scale, str) else f"{scale:g}"
            lines.append(f"| {name} | {label} | {probes} | {100 * err:.0f}% |")
    else:   # keep the scan of an earlier run (it takes long)
        old = pattern.search(text)
        if old and SCAN_HEADING in old.group(0):
            lines += ["", old.group(0)[old.group(0).index(SCAN_HEADING):].rstrip("\n")]
    section = "\n".join(lines) + "\n"
    if pattern.search(text):
        text = pattern.sub(lambda _: section.rstrip("\n") + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
    print(f"wrote {path}")


def _cli(argv: list[str], procs: int, threads: int | None) -> tuple[float, float]:
    """Run ``nfm ARGV`` (``procs`` > 1: under torchrun) to completion; (end-to-end wall s, nfm.wall_time s)."""
    if procs == 1:
        cmd = [sys.executable, "-m", "nfm_cli", *argv]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-addr",
               "127.0.0.1", "--master-port", "29517", "-m", "nfm_cli", *argv]
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    else:
        env.pop("OMP_NUM_THREADS", None)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"bench/hessian_diag.py: {' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    out = Path(argv[argv.index("--out") + 1])
    from safetensors import safe_open
    with safe_open(str(out), "pt") as f:
        core = float(json.loads(f.metadata()["nfm.wall_time"]))
    out.unlink()
    return wall, core


def torchrun_benchmark(args) -> None:
    """1 process (torch's default threads), 1 process with one thread, 2 torchrun processes with one thread
    each: nfm hessian-diag --estimator exact on a LeNet over 8192 Fashion-MNIST samples, interleaved."""
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = workdir / "lenet-fmnist8192-e2.safetensors"
    train(TrainConfig(model="lenet", dataset="fashion-mnist", train_size=8192, test_size=2000, epochs=2,
                      batch_size=128, seed=0), ckpt, device="cpu")
    where = f"{machine()}; {versions('numpy')}"
    print(f"machine: {where}\ncommand: {command()}", flush=True)
    runs = {"1 process, torch's default threads": (1, None), "1 process, OMP_NUM_THREADS=1": (1, 1),
            "2 processes (torchrun), 1 thread each": (2, 1)}
    walls: dict[str, list[float]] = {name: [] for name in runs}
    cores: dict[str, list[float]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for _ in range(args.repeats):
            for name, (procs, threads) in runs.items():
                argv = ["hessian-diag", str(ckpt), "--estimator", "exact", "--batch-size", "128", "--device", "cpu",
                        "--out", str(Path(tmp) / "h.safetensors"), "-q"]
                wall, core = _cli(argv, procs, threads)
                walls[name].append(wall)
                cores[name].append(core)
                print(f"{name}: {wall:.1f} s end to end, {core:.1f} s core loop", flush=True)
    base = "1 process, OMP_NUM_THREADS=1"
    dist = "2 processes (torchrun), 1 thread each"
    lines = ["LeNet checkpoint on N = 8192 Fashion-MNIST samples (`nfm train --model lenet --train-size 8192 "
             "--epochs 2`), `nfm hessian-diag --estimator exact --batch-size 128` (64 batches, 32 per rank with 2 "
             "processes), gloo backend. Each configuration runs as a fresh CLI process, the three interleaved, "
             f"{args.repeats} rounds: median [interquartile range] of the end-to-end wall time and of the core loop "
             "(`nfm.wall_time`, without start-up).", "",
             f"- command: `{command()}`", f"- machine and versions: {where}", "",
             "| run | end-to-end wall (s) | core loop (s) |", "|---|---|---|"]
    for name in runs:
        lines.append(f"| {name} | {fmt(walls[name], digits=1)} | {fmt(cores[name], digits=1)} |")
    core_speedup = median_iqr(cores[base])[0] / median_iqr(cores[dist])[0]
    wall_speedup = median_iqr(walls[base])[0] / median_iqr(walls[dist])[0]
    lines += ["", f"Against one process with one thread, 2 processes make the core loop {core_speedup:.2f}x and the "
              f"whole command {wall_speedup:.2f}x as fast (ratios of medians); the difference is start-up "
              "(imports, loading checkpoint and data, the launcher and the rendezvous), which every rank pays."]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        replace_section(Path(args.markdown), TORCHRUN_SECTION, text)
        print(f"replaced the section {TORCHRUN_SECTION!r} of {args.markdown}")


if __name__ == "__main__":
    main()
