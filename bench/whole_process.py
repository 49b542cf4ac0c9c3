"""Whole-process benchmarks of what a sweep pays per run (issue 12): start-up, data loading and
checkpointing included, each against a plain script doing the same work.

Every case times complete processes (``subprocess.run``, wall clock), alternating nfm and its
baseline (A B A B ...) after one untimed warm-up each, and reports the median and the interquartile
range (IQR) of each and the ratio of the medians. Cases:

* ``train``: ``nfm train --epochs 20`` on MLP 784-512-512-512-10 with 1024 Fashion-MNIST samples vs
  ``bench/baselines/plain_train.py`` (same model, data, Adam, batch 128, train/test accuracy every
  epoch, no checkpoint). Target <= 1.15x.
* ``measure``: ``nfm measure`` of that checkpoint (two diagonals, Fisher-Rao, the solve) vs one
  BackPACK ``DiagGGNExact`` diagonal (``bench/baselines/backpack_diag.py``). Target <= 1.5x.
* ``hessian-diag``: ``nfm hessian-diag --loss ce --estimator exact`` on 2048 samples (MLP and LeNet)
  vs the same BackPACK script. Target <= 0.7x.
* ``help``: ``nfm --help`` vs ``python -c "import torch"``. Target <= 0.5x.
* ``report``: ``nfm report`` over 1,000 measures files. Target < 5 s.

Each nfm process runs with ``NFM_THREADS``/``OMP_NUM_THREADS`` = --threads (default: unset, the
libraries' defaults) and the baselines with the same ``OMP_NUM_THREADS``. The Fashion-MNIST files are
read from --data-dir (Debian's ``dataset-fashion-mnist``). nfm's decoded-data cache is warm after
the warm-up run (that is the sweep situation: every run after the first).

    python bench/whole_process.py all --repeats 5 --markdown BENCHMARKS.md
    python bench/whole_process.py train measure --repeats 3
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINES = ROOT / "bench" / "baselines"
SECTION = "## Whole processes against plain scripts (`bench/whole_process.py`, issue 12)"
CASES = ("train", "measure", "hessian-diag", "help", "report")
TARGETS = {"train": "<= 1.15x", "measure": "<= 1.5x", "hessian-diag mlp": "<= 0.7x",
           "hessian-diag lenet": "<= 0.7x", "help": "<= 0.5x", "report": "< 5 s"}


def nfm(*args: str) -> list[str]:
    return [sys.executable, "-m", "nfm_cli", *map(str, args)]


def env(threads: int | None) -> dict[str, str]:
    e = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if threads:
        e.update(NFM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    return e


def run(cmd: list[str], e: dict[str, str], before=None) -> float:
    if before is not None:
        before()
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr[-2000:]}")
    return elapsed


def interleaved(commands: dict[str, tuple], repeats: int, e) -> dict[str, list[float]]:
    """Warm-up once each, then ``repeats`` rounds of every command in turn; all times per name."""
    for cmd, before in commands.values():
        run(cmd, e, before)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, (cmd, before) in commands.items():
            times[name].append(run(cmd, e, before))
    return times


def summary(values: list[float]) -> tuple[float, float, float]:
    """Median, first and third quartile."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return statistics.median(values), q[0], q[2]


def checkpoint(workdir: Path, model: str, n: int, epochs: int, data_dir: str, e) -> Path:
    path = workdir / f"{model}-fmnist{n}-e{epochs}.safetensors"
    if not path.exists():
        run(nfm("train", "--model", model, "--dataset", "fashion-mnist", "--train-size", n, "--epochs", epochs,
                "--data-dir", data_dir, "--quiet", "--out", path), e)
    return path


def case_train(a, e) -> list[tuple]:
    out_nfm, out_plain = a.workdir / "train-nfm.safetensors", a.workdir / "train-plain.pt"
    commands = {
        "nfm": (nfm("train", "--model", "mlp", "--dataset", "fashion-mnist", "--train-size", 1024, "--epochs", 20,
                    "--batch-size", 128, "--data-dir", a.data_dir, "--quiet", "--out", out_nfm),
                lambda: out_nfm.unlink(missing_ok=True)),
        "plain": ([sys.executable, str(BASELINES / "plain_train.py"), a.data_dir, "1024", "20", str(out_plain)], None),
    }
    t = interleaved(commands, a.repeats, e)
    return [("train", "`nfm train --epochs 20` (MLP, 1024 samples)", "plain PyTorch script", t["nfm"], t["plain"])]


def case_measure(a, e) -> list[tuple]:
    ck = checkpoint(a.workdir, "mlp", 1024, 20, a.data_dir, e)
    out = a.workdir / "m.measures.safetensors"

    def clean():
        for p in a.workdir.glob("m.measures*"):
            p.unlink()

    commands = {"nfm": (nfm("measure", ck, "--out", out, "--data-dir", a.data_dir, "--json") if _has_option(
        "measure", "--data-dir", e) else nfm("measure", ck, "--out", out, "--json"), clean),
                "backpack": ([sys.executable, str(BASELINES / "backpack_diag.py"), str(ck), a.data_dir,
                              str(a.workdir / "bp.safetensors"), "1024"], None)}
    t = interleaved(commands, a.repeats, e)
    return [("measure", "`nfm measure` (MLP, 1024 samples)", "BackPACK DiagGGNExact script", t["nfm"], t["backpack"])]


def case_hessian(a, e) -> list[tuple]:
    rows = []
    for model in ("mlp", "lenet"):
        ck = checkpoint(a.workdir, model, 2048, 2, a.data_dir, e)
        out = a.workdir / f"h-{model}.safetensors"
        commands = {"nfm": (nfm("hessian-diag", ck, "--loss", "ce", "--estimator", "exact", "--data-dir", a.data_dir,
                                "--quiet", "--out", out), lambda out=out: out.unlink(missing_ok=True)),
                    "backpack": ([sys.executable, str(BASELINES / "backpack_diag.py"), str(ck), a.data_dir,
                                  str(a.workdir / "bp.safetensors"), "512"], None)}
        t = interleaved(commands, a.repeats, e)
        rows.append((f"hessian-diag {model}", f"`nfm hessian-diag --loss ce --estimator exact` ({model}, 2048)",
                     "BackPACK DiagGGNExact script", t["nfm"], t["backpack"]))
    return rows


def case_help(a, e) -> list[tuple]:
    commands = {"nfm": (nfm("--help"), None), "torch": ([sys.executable, "-c", "import torch"], None)}
    t = interleaved(commands, a.repeats, e)
    return [("help", "`nfm --help`", '`python -c "import torch"`', t["nfm"], t["torch"])]


def case_report(a, e) -> list[tuple]:
    folder = a.workdir / "report-1000"
    if not folder.exists() or len(list(folder.glob("*.measures.safetensors"))) != 1000:
        make_measures_files(a, folder, e)
    files = sorted(str(p) for p in folder.glob("*.measures.safetensors"))
    commands = {"nfm": (nfm("report", *files), None)}
    t = interleaved(commands, a.repeats, e)
    return [("report", "`nfm report` over 1,000 measures files", "", t["nfm"], None)]


def make_measures_files(a, folder: Path, e) -> None:
    """1,000 measures files: one real measurement, copied with varied numbers (the report reads only
    its metadata, so the sizes and tensors are those of a real MLP measures file)."""
    sys.path.insert(0, str(ROOT))
    import random

    from nfm_cli.store.artifacts import read_artifact, write_artifact
    case_measure_once = a.workdir / "m-report.measures.safetensors"
    if not case_measure_once.exists():
        ck = checkpoint(a.workdir, "mlp", 1024, 20, a.data_dir, e)
        run(nfm("measure", ck, "--out", case_measure_once, "--json"), e)
    art = read_artifact(case_measure_once, "measures")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = random.Random(0)
    for i in range(1000):
        meta = {k: v for k, v in art.meta.items()}
        result = dict(meta["result"])
        for key in ("normalized_sharpness", "hessian_trace", "fisher_rao_norm"):
            if isinstance(result.get(key), float):
                result[key] *= rng.uniform(0.5, 2.0)
        result["metrics"] = dict(result["metrics"], gap=rng.uniform(0, 0.9), seed=i)
        meta["result"] = result
        write_artifact(folder / f"run{i:04d}.measures.safetensors", art.tensors, "measures", meta)


def _has_option(command: str, option: str, e) -> bool:
    res = subprocess.run(nfm(command, "--help"), env=e, capture_output=True, text=True)
    return option in res.stdout


def render(rows: list[tuple], a) -> str:
    lines = [SECTION, "",
             f"- command: `python bench/whole_process.py {' '.join(a.cases)} --repeats {a.repeats}"
             + (f" --threads {a.threads}" if a.threads else "") + "`",
             f"- machine: {platform.platform()}; {os.cpu_count()} CPUs; Python {platform.python_version()}; "
             f"load average at the end {', '.join(f'{x:.1f}' for x in os.getloadavg())}",
             f"- {a.repeats} interleaved repeats of whole processes after one warm-up each; median [IQR] in seconds",
             "", "| case | nfm | baseline | nfm (s) | baseline (s) | ratio | target |", "|---|---|---|---|---|---|---|"]
    for key, what, baseline, ours, theirs in rows:
        m, q1, q3 = summary(ours)
        cell = f"{m:.2f} [{q1:.2f}-{q3:.2f}]"
        if theirs is None:
            lines.append(f"| {key} | {what} | - | {cell} | - | - | {TARGETS[key]} |")
            continue
        bm, b1, b3 = summary(theirs)
        lines.append(f"| {key} | {what} | {baseline} | {cell} | {bm:.2f} [{b1:.2f}-{b3:.2f}] | {m / bm:.2f}x | "
                     f"{TARGETS[key]} |")
    return "\n".join(lines) + "\n"


def update_markdown(path: Path, text: str, note: str) -> None:
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    block = text + (f"\n{note}\n" if note else "")
    pattern = re.compile(re.escape(SECTION) + r".*?(?=\n## |\Z)", re.S)
    if pattern.search(old):
        new = pattern.sub(lambda _: block.rstrip("\n") + "\n", old)
    else:
        new = old.rstrip("\n") + "\n\n" + block
    path.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="+", choices=CASES + ("all",))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="NFM_THREADS / OMP_NUM_THREADS for every process")
    parser.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/nfm-bench-whole"))
    parser.add_argument("--markdown", type=Path, default=None, help="replace this section of the file with the results")
    parser.add_argument("--note", default="", help="a line added under the table (e.g. the machine's load)")
    a = parser.parse_args()
    a.cases = list(CASES) if "all" in a.cases else a.cases
    a.workdir.mkdir(parents=True, exist_ok=True)
    e = env(a.threads)
    e.setdefault("NFM_CACHE", str(a.workdir / "cache"))
    rows = []
    for case in a.cases:
        rows += {"train": case_train, "measure": case_measure, "hessian-diag": case_hessian, "help": case_help,
                 "report": case_report}[case](a, e)
        print(render(rows, a), flush=True)
    if a.markdown:
        update_markdown(a.markdown, render(rows, a), a.note)


if __name__ == "__main__":
    main()
