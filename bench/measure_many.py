"""Many runs per process (issue 23): what a grid saves by not paying start-up once per checkpoint.

Two cases, each timing complete processes (wall clock, ``subprocess.run``):

* ``measure``: 32 MLP checkpoints (784-512-512-512-10, 1024 Fashion-MNIST samples, 2 epochs each,
  seeds 0-31) measured by 32 ``nfm measure CKPT`` processes one after the other, against one
  ``nfm measure CKPT1 ... CKPT32`` call. The two alternate (A B A B ...; the outputs are deleted
  before each), after one untimed warm-up of each; median and interquartile range (IQR) of the
  repeats and the ratio of the medians. Every repeat's 32 measures results are compared with the
  first repeat's separate calls (all but wall time): the script stops if one differs. Target <= 0.6x.
* ``sweep``: a 32-run ``nfm sweep --jobs 2`` (the same 32 trainings and measurements, from scratch)
  against the sum of its runs' compute time, read from the files it wrote (the checkpoint's training
  wall time, both Hessian files' and the measures file's): ``jobs x sweep wall time / sum`` is what
  the sweep costs above the bare computations (start-up, loading, scheduling, idle workers).

Every process runs with ``NFM_THREADS``/``OMP_NUM_THREADS`` = --threads (default 1: on a shared
2-core machine two threads per process fight over the cores; the sweep's workers get cores / jobs).

    python bench/measure_many.py measure --repeats 3
    python bench/measure_many.py sweep --repeats 1 --nfm-path /path/to/another/checkout
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = 32
GRID = ("--grid", "model=mlp", "--grid", "dataset=fashion-mnist", "--grid", "train_size=1024", "--grid", "epochs=2")


def nfm(*args) -> list[str]:
    return [sys.executable, "-m", "nfm_cli", *map(str, args)]


def environment(a) -> dict[str, str]:
    e = dict(os.environ, PYTHONPATH=str(a.nfm_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    e["NFM_BENCH_CWD"] = str(a.workdir)
    if a.data_dir:
        e["NFM_DATA"] = a.data_dir
    if a.threads:
        e.update(NFM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads))
    return e


def run(cmd: list[str], e: dict[str, str]) -> float:
    t0 = time.perf_counter()
    # cwd: a folder without nfm_cli (``python -m`` puts the cwd first on sys.path, ahead of --nfm-path)
    res = subprocess.run(cmd, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         cwd=e["NFM_BENCH_CWD"])
    elapsed = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"failed ({res.returncode}): {' '.join(cmd[:6])} ...\n{res.stderr[-2000:]}")
    return elapsed


def summary(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.1f}"
    q = statistics.quantiles(values, n=4, method="inclusive")
    return f"{statistics.median(values):.1f} [{q[0]:.1f}-{q[2]:.1f}]"


def checkpoints(a, e) -> list[Path]:
    """The 32 checkpoints (trained once into WORKDIR/ckpts, reused after)."""
    folder = a.workdir / "ckpts"
    paths = [folder / f"seed={s}.safetensors" for s in range(RUNS)]
    if not all(p.exists() for p in paths):
        folder.mkdir(parents=True, exist_ok=True)
        for s in range(RUNS):
            if not paths[s].exists():
                run(nfm("train", "--model", "mlp", "--dataset", "fashion-mnist", "--train-size", 1024, "--epochs", 2,
                        "--seed", s, "--quiet", "--out", paths[s]), e)
    return paths


def results(paths: list[Path]) -> list[dict]:
    sys.path.insert(0, str(ROOT))
    from nfm_cli.store.artifacts import read_artifact
    out = []
    for p in paths:
        meta = read_artifact(p.with_name(p.name.replace(".safetensors", ".measures.safetensors")), "measures").meta
        out.append({k: v for k, v in meta.items() if k not in ("wall_time", "parents")})
    return out


def clean(paths: list[Path]) -> None:
    for p in paths:
        for f in p.parent.glob(p.name.replace(".safetensors", ".measures*")):
            f.unlink()


def case_measure(a, e) -> list[str]:
    paths = checkpoints(a, e)

    def separate() -> None:
        for p in paths:
            run(nfm("measure", p, "--quiet"), e)

    def one_call() -> None:
        run(nfm("measure", *paths, "--quiet"), e)

    clean(paths)
    separate()                                   # warm-up (and the reference results)
    reference = results(paths)
    clean(paths)
    one_call()
    times: dict[str, list[float]] = {"separate": [], "one call": []}
    for _ in range(a.repeats):
        for name, fn in (("separate", separate), ("one call", one_call)):
            clean(paths)
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            if results(paths) != reference:
                raise SystemExit(f"{name}: the measures differ from the first separate calls'")
    ratio = statistics.median(times["one call"]) / statistics.median(times["separate"])
    return ["| case | 32 separate processes (s) | one call (s) | ratio | target |", "|---|---|---|---|---|",
            f"| `nfm measure` x 32 vs `nfm measure` over 32 (MLP, 1024 samples) | {summary(times['separate'])} | "
            f"{summary(times['one call'])} | {ratio:.2f}x | <= 0.6x |",
            "", f"per-repeat seconds: {json.dumps({k: [round(v, 1) for v in vs] for k, vs in times.items()})}; "
            "all 32 results identical to the separate calls' in every repeat (wall time and parent hashes aside)"]


def compute_seconds(folder: Path) -> float:
    """The sum over a sweep folder of the wall times its files record (training, both Hessians, solve)."""
    sys.path.insert(0, str(ROOT))
    from nfm_cli.store.artifacts import read_artifact
    total = 0.0
    for f in folder.glob("*.safetensors"):
        art = read_artifact(f, ("checkpoint", "hessian-diag", "measures"))
        total += float(art.meta.get("wall_time") or 0.0)
    return total


def case_sweep(a, e) -> list[str]:
    rows = ["| case | sweep wall (s) | sum of compute (s) | jobs x wall / sum |", "|---|---|---|---|"]
    walls, sums = [], []
    for _ in range(a.repeats):
        out = a.workdir / "sweep"
        shutil.rmtree(out, ignore_errors=True)
        seeds = ",".join(str(s) for s in range(RUNS))
        walls.append(run(nfm("sweep", "--out", out, *GRID, "--seeds", seeds, "--jobs", a.jobs, "--quiet"), e))
        sums.append(compute_seconds(out))
    ratios = [a.jobs * w / s for w, s in zip(walls, sums, strict=True)]
    rows.append(f"| `nfm sweep --jobs {a.jobs}`, 32 MLP runs (1024 samples, 2 epochs) | {summary(walls)} | "
                f"{summary(sums)} | {statistics.median(ratios):.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", choices=("measure", "sweep"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="NFM_THREADS per process (0: unset)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/nfm-bench-many"))
    parser.add_argument("--data-dir", default=None, help="$NFM_DATA for the runs (default: the usual places)")
    parser.add_argument("--nfm-path", type=Path, default=ROOT, help="the nfm checkout to time (default: this one)")
    a = parser.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    e = environment(a)
    lines = [f"- command: `python bench/measure_many.py {' '.join(a.cases)} --repeats {a.repeats} "
             f"--threads {a.threads} --jobs {a.jobs}`",
             f"- nfm: {a.nfm_path}; machine: {platform.platform()}; {os.cpu_count()} CPUs; "
             f"Python {platform.python_version()}"]
    for case in a.cases:
        lines += [""] + (case_measure if case == "measure" else case_sweep)(a, e)
    lines.append(f"- load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
