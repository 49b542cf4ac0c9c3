"""Reports over live sweeps (issue 15, item 5): ``nfm report runs/* runs/.*`` while runs are being written.

The folder is made by hand with what a sweep in progress holds next to finished measures files: a
partial hessian-diag file (``done = false``), measures temp files (truncated mid-save, and complete
but not yet renamed, of a live writer and of a killed one), a checkpoint of an unfinished training
run and its save's temp file, a lock file, a measures file truncated at its final name (a copy in
progress), a file that vanished after the shell listed it, a run folder and a FIFO (a reader that
opened it would wait forever). ``report`` must list each as skipped with its reason, never crash or
hang, and give exactly the numbers of a report over the finished files alone.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nfm_cli.report.correlations import load_runs
from nfm_cli.store.artifacts import write_artifact
from tests.conftest import sweep

HOST = "".join(c for c in socket.gethostname() if c.isalnum() or c in "-_") or "host"


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def live_sweep(folder: Path) -> tuple[list[Path], dict[str, str]]:
    """(the finished measures files, {name of every other entry: a word its skip reason must contain})."""
    finished = sweep(folder, n=5)
    data = finished[0].read_bytes()
    live, dead = os.getpid(), _dead_pid()
    expect = {}

    def add(name: str, content: bytes | None, word: str) -> Path:
        path = folder / name
        if content is not None:
            path.write_bytes(content)
        expect[name] = word
        return path

    write_artifact(folder / "r5.measures.hdiag-normalized-ce.safetensors", {"state.sum.w": torch.zeros(3)},
                   "hessian-diag", {"config": {"loss": "normalized-ce"}, "parents": {"checkpoint": "0" * 64},
                                    "progress": {"done": False, "units_done": 3, "units_total": 10}})
    expect["r5.measures.hdiag-normalized-ce.safetensors"] = "hessian-diag"
    add(f".r6.measures.safetensors.{HOST}-{live}.a1b2c3.tmp", data[: len(data) // 2], "still being written")
    add(f".r7.measures.safetensors.{HOST}-{live}.d4e5f6.tmp", data, "still being written")   # complete, not renamed
    add(f".r8.measures.safetensors.{HOST}-{dead}.g7h8i9.tmp", data, "killed")
    write_artifact(folder / "r9.safetensors", {"model.w": torch.zeros(3)}, "checkpoint",
                   {"config": {"epochs": 6}, "progress": {"epochs_done": 2, "epochs": 6, "complete": False}})
    expect["r9.safetensors"] = "checkpoint"
    add(f".r9.safetensors.{HOST}-{live}.j1k2l3.tmp", (folder / "r9.safetensors").read_bytes()[:300],
        "still being written")
    add(".r10.measures.safetensors.lock", json.dumps({"host": HOST, "pid": live, "started": 0}).encode(),
        "lock file")
    add("r11.measures.safetensors", data[: len(data) - 7], "truncated")
    add("r12.measures.safetensors", None, "no such file")
    (folder / "r13").mkdir()
    expect["r13"] = "directory"
    os.mkfifo(folder / "r14.measures.safetensors")
    expect["r14.measures.safetensors"] = "not a regular file"
    return finished, expect


def _too_slow(signum, frame):
    raise TimeoutError("load_runs blocked (opened the FIFO?)")


def test_load_runs_skips_everything_in_flight(tmp_path):
    finished, expect = live_sweep(tmp_path)
    paths = finished + [tmp_path / name for name in expect]
    previous = signal.signal(signal.SIGALRM, _too_slow)
    signal.alarm(60)
    try:
        runs, skipped = load_runs(paths)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert sorted(r["path"] for r in runs) == sorted(map(str, finished))
    reasons = {Path(p).name: reason for p, reason in skipped}
    assert sorted(reasons) == sorted(expect)
    for name, word in expect.items():
        assert word in reasons[name], (name, reasons[name])


@pytest.mark.integration
def test_cli_report_over_a_live_folder_counts_only_finished_runs(tmp_path):
    """The real command on ``runs/* runs/.*`` as a shell expands it, in a subprocess with a timeout
    (a FIFO must not block it)."""
    finished, expect = live_sweep(tmp_path)
    listed = sorted(str(p) for p in tmp_path.iterdir()) + [str(tmp_path / "r12.measures.safetensors")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    got = subprocess.run([sys.executable, "-m", "nfm_cli", "report", *listed, "--json", "--group-by", "none"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert got.returncode == 0, got.stderr
    assert "Traceback" not in got.stderr
    report = json.loads(got.stdout)
    assert report["n_runs"] == len(finished)
    assert {Path(s["path"]).name for s in report["skipped"]} == set(expect)
    alone = subprocess.run([sys.executable, "-m", "nfm_cli", "report", *map(str, finished), "--json",
                            "--group-by", "none"], capture_output=True, text=True, env=env, timeout=300)
    assert json.loads(alone.stdout)["groups"] == report["groups"]
