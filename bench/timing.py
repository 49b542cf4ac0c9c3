"""Shared by the benchmark scripts: interleaved timing with median and interquartile range, the
machine and package versions, and replacing a script's own section of BENCHMARKS.md in place."""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def interleaved(functions: dict[str, Callable[[], object]], repeats: int,
                warmup: bool = True) -> dict[str, list[float]]:
    """Seconds per call, A, B, C, A, B, C, ... ``repeats`` rounds (after one warm-up call each), so a
    change in machine load hits every function alike."""
    if warmup:
        for fn in functions.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def touch_memory(gigabytes: float) -> float:
    """Write ``gigabytes`` of memory once, in a throwaway process, and free it; returns the seconds it took.

    On a freshly booted virtual machine the first write to each page of guest memory is slow (seen here:
    0.7 GB/s the first time, 2.3 GB/s after, on an 18 GB sweep), so whichever child process first needs
    much memory pays for it and a before/after comparison is skewed. Touching the memory the benchmark's
    children will use, once, before the first of them starts, puts every child on the same footing. A
    separate process, so that the benchmark's own peak RSS (inherited by its children's ``ru_maxrss``)
    stays small."""
    if gigabytes <= 0:
        return 0.0
    t0 = time.perf_counter()
    code = f"import torch; torch.ones({int(gigabytes * 2**30) // 4}, dtype=torch.float32)"
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - t0


def child_row(script: str, code_root: str, argv: list[str]) -> dict:
    """Run ``script`` with ``argv`` in a fresh Python whose ``nfm_cli`` comes from ``code_root`` (put first on
    PYTHONPATH: a "before" or "after" copy of the package), and return the JSON object it prints last,
    with the 1-minute load average at its end added as ``load``."""
    path = os.pathsep.join([os.path.abspath(code_root), os.environ.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, script, *argv], env={**os.environ, "PYTHONPATH": path}, check=True,
                         capture_output=True, text=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["load"] = os.getloadavg()[0]
    return row


def median_iqr(values: list[float]) -> tuple[float, float, float]:
    """(median, first quartile, third quartile); with fewer than 2 values the quartiles are the value."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return statistics.median(values), q1, q3


def fmt(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    """``median [q1-q3]`` of ``values * scale``."""
    med, q1, q3 = (v * scale for v in median_iqr(values))
    return f"{med:.{digits}f} [{q1:.{digits}f}-{q3:.{digits}f}]"


def versions(*packages: str) -> str:
    """Python, torch and the given distributions' versions ("absent" if not installed)."""
    parts = [f"Python {platform.python_version()}", f"torch {torch.__version__}"]
    for name in packages:
        try:
            parts.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{name} absent")
    return ", ".join(parts)


def machine() -> str:
    """Platform, CPU count, torch threads and the load average at the time of the call."""
    return (f"{platform.platform()}; {platform.processor() or platform.machine()}; {os.cpu_count()} CPUs; "
            f"{torch.get_num_threads()} torch threads; load average {os.getloadavg()[0]:.1f} (1 min)")


def command() -> str:
    """The command line that ran this script, relative to the repository root."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
    return "python " + " ".join(shlex.quote(a) for a in [script, *sys.argv[1:]])


def replace_section(path: Path, heading: str, body: str) -> None:
    """Replace the section that starts with ``heading`` (up to the next ``## `` heading) by ``heading``
    and ``body``, or append it; the rest of the file is left as it is."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"{heading}\n\n{body.strip()}\n"
    pattern = re.compile(re.escape(heading) + r"\n.*?(?=\n## |\Z)", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
