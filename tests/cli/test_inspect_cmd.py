"""The demo falls back and explains itself; inspect and report --runs show results (issue 13, items 3, 4, 8)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_result, write_measures

ROOT = Path(__file__).resolve().parents[2]


def _stub_nfm(tmp_path: Path) -> Path:
    """A fake `nfm` that records its arguments (the demo's dataset choice is what is tested here)."""
    stub = tmp_path / "nfm-stub"
    stub.write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/calls.txt\n')
    stub.chmod(0o755)
    return stub


def _demo(tmp_path: Path, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, NFM=str(_stub_nfm(tmp_path)), PYTHON=sys.executable, **env_extra)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh"), str(tmp_path / "demo")],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.integration
def test_demo_without_fashion_mnist_falls_back_to_synthetic_with_a_note(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = _demo(tmp_path, {"DATA_DIR": str(empty), "DOWNLOAD": ""})
    assert res.returncode == 0, res.stderr
    assert "note: Fashion-MNIST is not available" in res.stdout and "synthetic" in res.stdout
    assert "make demo DATA_DIR=" in res.stdout and "DOWNLOAD=1" in res.stdout
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    trains = [c for c in calls if c.startswith("train ")]
    assert len(trains) == 3 and all("--dataset synthetic" in c and "--data-dir" not in c for c in trains)
    assert all("--test-size 512" in c for c in trains)   # the synthetic test split has 512 samples
    report = [c for c in calls if c.startswith("report ")]
    assert len(report) == 1 and "--runs" in report[0] and "--plot" in report[0]
    assert "figure1.png" in res.stdout and "What to look at" in res.stdout


@pytest.mark.integration
def test_demo_passes_data_dir_and_download_through(tmp_path):
    # DATA_DIR must hold Fashion-MNIST for the availability check: the Debian copy, where there is one
    debian = Path("/usr/share/datasets/fashion-mnist")
    if not debian.is_dir():
        pytest.skip("needs a local Fashion-MNIST copy")
    res = _demo(tmp_path, {"DATA_DIR": str(debian), "DOWNLOAD": "1"})
    assert res.returncode == 0, res.stderr
    trains = [c for c in (tmp_path / "calls.txt").read_text().splitlines() if c.startswith("train ")]
    assert len(trains) == 3
    assert all(f"--data-dir {debian}" in c and "--download" in c and "--dataset fashion-mnist" in c for c in trains)
    assert "note:" not in res.stdout


@pytest.mark.slow
def test_demo_end_to_end_on_synthetic(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, NFM=f"{sys.executable} -m nfm_cli", DATA_DIR=str(tmp_path),
               EPOCHS="2", TRAIN_SIZE="64", WIDTH="16")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh"), str(tmp_path / "demo")], capture_output=True,
                         text=True, env=env, timeout=1200)
    assert res.returncode == 0, res.stderr
    for ratio in ("0.0", "0.3", "1.0"):
        assert re.search(rf"mlp-synthetic-r{ratio}\s", res.stdout), res.stdout
    assert "normalized" in res.stdout and "trace" in res.stdout and "gap" in res.stdout
    assert (tmp_path / "demo" / "plots" / "figure1.png").is_file()
    assert "data.labels" not in res.stdout + res.stderr      # no tensor listing any more


def test_inspect_measures_shows_totals_and_layers(cli, tmp_path):
    result = make_result(0.25, 0.3, normalized_sharpness=12.5, hessian_trace=3.75)
    result.update(trace_loss="ce", params_left_out=12,
                  layers={"fc1.weight": {"shape": [4, 3], "normalized_sharpness": 0.5,
                                         "matrix_normalized_sharpness": 0.75, "hessian_trace": 0.125,
                                         "frobenius_norm_sq": 2.0, "iterations": 7, "residual": 1e-12}})
    path = write_measures(tmp_path / "m.safetensors", result)
    res = cli("inspect", path)
    assert res.code == 0, res.err
    assert re.search(r"normalized_sharpness\s+.\s+12\.5\b", res.err) and "hessian_trace (ce loss)" in res.err
    assert "per layer" not in res.err and "fc1.weight" not in res.err
    layered = cli("inspect", path, "--layers")
    assert "per layer" in layered.err and re.search(r"fc1\.weight\s+.\s+4x3\s+.\s+0\.5\b", layered.err)


def test_inspect_checkpoint_history_and_one_line_optimizer_state(cli, tiny_checkpoint):
    res = cli("inspect", tiny_checkpoint)
    assert res.code == 0, res.err
    assert "per-epoch history" in res.err
    info = json.loads(cli("inspect", tiny_checkpoint, "--json").out)
    history = info["meta"]["history"]
    for row in history:
        assert re.search(rf"\b{row['epoch']}\s+.\s+{row['epoch_loss']:.4g}\s", res.err)
    optim = [name for name in info["tensors"] if name.startswith("optim.")]
    assert len(optim) > 3
    assert sum("optim." in line for line in res.err.splitlines()) == 1
    assert f"optimizer state: {len(optim)} tensors" in res.err
    every = cli("inspect", tiny_checkpoint, "--all")
    assert sum("optim." in line for line in every.err.splitlines()) == len(optim)


def test_report_runs_prints_one_row_per_run(cli, tmp_path):
    paths = [write_measures(tmp_path / f"run-{i}.measures.safetensors",
                            make_result(0.125 * i, 0.5 * i, seed=i, normalized_sharpness=10.0 + i, hessian_trace=2.5))
             for i in range(3)]
    res = cli("report", *paths, "--runs", "--x", "normalized_sharpness,hessian_trace")
    assert res.code == 0, res.err
    assert "3 runs" in res.out and "pearson" not in res.out
    for i in range(3):
        row = next(line for line in res.out.splitlines() if f"run-{i} " in line)
        cells = [c.strip() for c in row.strip("│ ").split("│")]
        assert cells == [f"run-{i}", f"{0.5 * i:.3g}", "1", f"{1 - 0.125 * i:.3g}", f"{0.125 * i:.3g}",
                         f"{10.0 + i:.3g}", "2.5"]
    data = json.loads(cli("report", *paths, "--runs", "--json").out)
    assert [r["gap"] for r in data["runs"]] == [0.0, 0.125, 0.25]
