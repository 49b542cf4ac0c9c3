"""Small things a new user trips over (issue 13, item 10): counts, formats, p-values at tiny n,
file-type messages, labels, plot axes."""
from __future__ import annotations

import csv
import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats

from nfm_cli.report.correlations import correlations, exact_p_values, load_runs, write_csv
from tests.conftest import make_result, sweep, write_measures


def test_one_run_is_singular(cli, tmp_path):
    path = write_measures(tmp_path / "a.safetensors", make_result(0.2, 0.0))
    res = cli("report", path)
    assert res.code == 0, res.err
    assert ": 1 run, correlation" in res.out and "1 runs" not in res.out


def test_resumed_training_counts_only_the_new_epochs(cli, tmp_path):
    out = tmp_path / "r.safetensors"
    common = ["train", "--dataset", "synthetic", "--width", "8", "--train-size", "64", "--test-size", "32",
              "--out", out]
    first = cli(*common, "--epochs", "2")
    assert first.code == 0 and "trained 2 epochs in" in first.err, first.err
    again = cli(*common, "--epochs", "3")
    assert again.code == 0, again.err
    assert "resumed after 2 epochs" in again.err and "trained epochs 3-3 in" in again.err and "(3 in all)" in again.err


def test_csv_writes_integers_as_integers(tmp_path):
    result = make_result(0.226, 0.3)
    result["metrics"]["batch_size"] = 128
    path = write_measures(tmp_path / "a.safetensors", result)
    runs, _ = load_runs([path])
    out = write_csv(runs, tmp_path / "runs.csv")
    row = next(csv.DictReader(out.open()))
    assert row["batch_size"] == "128" and row["weight_matrices"] == "3" and row["train_size"] == "256"
    assert row["gap"] == "0.226" and row["hessian_trace"] == "3.0"


def _slow_p(x, y, statistic):
    """Direct reference: loop over every permutation of y, count |stat| >= |observed|."""
    observed = statistic(x, y)
    perms = list(itertools.permutations(y))
    hits = sum(abs(statistic(x, np.array(p))) >= abs(observed) - 1e-12 for p in perms)
    return hits / len(perms)


def test_p_values_are_exact_at_small_n():
    c = correlations([1.0, 2.0, 3.0], [0.1, 0.2, 0.5])
    assert c["spearman_rho"] == 1.0
    assert c["spearman_p"] == pytest.approx(2 / 6) and c["kendall_p"] == pytest.approx(2 / 6)   # by hand
    assert c["pearson_p"] == pytest.approx(2 / 6)
    four = correlations([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 4.0, 3.0])
    assert four["spearman_p"] == pytest.approx(_slow_p(np.arange(4.0), np.array([1.0, 2, 4, 3]),
                                                       lambda a, b: stats.spearmanr(a, b)[0]))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=6), rng.normal(size=6)
    y[3] = y[5]  # a tie
    got = exact_p_values(x, y)
    assert got["pearson_p"] == pytest.approx(_slow_p(x, y, lambda a, b: np.corrcoef(a, b)[0, 1]))
    assert got["spearman_p"] == pytest.approx(_slow_p(x, y, lambda a, b: stats.spearmanr(a, b)[0]))
    assert got["kendall_p"] == pytest.approx(_slow_p(x, y, lambda a, b: stats.kendalltau(a, b)[0]))
    big = correlations(np.arange(12.0), np.arange(12.0) ** 2)            # beyond 8: scipy's p-values
    assert big["spearman_p"] == pytest.approx(stats.spearmanr(np.arange(12.0), np.arange(12.0) ** 2)[1])


def test_a_pytorch_file_is_called_a_pytorch_pickle(cli, tmp_path):
    for name, kwargs in (("new.pt", {}), ("old.pt", {"_use_new_zipfile_serialization": False})):
        path = tmp_path / name
        torch.save({"w": torch.ones(2)}, path, **kwargs)
        res = cli("inspect", path)
        assert res.code == 1 and "not a safetensors file (PyTorch pickle?" in res.err, res.err


def test_per_layer_trace_column_names_its_loss(cli, tmp_path, tiny_checkpoint):
    res = cli("measure", tiny_checkpoint, "--out", tmp_path / "m.safetensors")
    assert res.code == 0, res.err
    assert "trace (ce loss)" in res.err


@pytest.mark.heavy
def test_plot_flags_draw_the_runs_values(cli, tmp_path, monkeypatch):
    """``nfm report --plot`` with each x-axis flag: every figure it saves is read back through its
    matplotlib objects (the scatter's points, the x scale), against the runs' own numbers."""
    import nfm_cli.report.plots as plots
    saved = {}
    real_save = plots._save

    def save(fig, path):
        saved[path.name] = fig
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", save)
    files = sweep(tmp_path, n=5)
    runs, _ = load_runs(files)
    sharpness = np.array([r["normalized_sharpness"] for r in runs])
    trace = np.array([r["hessian_trace"] for r in runs])
    gaps = np.array([r["gap"] for r in runs])
    for flag, scale in (("--real-x", "linear"), ("--log-x", "log")):   # the rescaled default: below
        saved.clear()
        out = tmp_path / flag.strip("-")
        res = cli("report", *files, "--plot", out, "--x", "normalized_sharpness", flag)
        assert res.code == 0, res.err
        assert set(saved) == {"normalized_sharpness.png", "figure1.png"} and (out / "figure1.png").is_file()
        (ax, _colorbar) = saved["normalized_sharpness.png"].axes
        left, right, _colorbar = saved["figure1.png"].axes        # Figure 1: trace | normalized sharpness
        for axis, values in ((ax, sharpness), (left, trace), (right, sharpness)):
            points = axis.collections[0].get_offsets()
            np.testing.assert_allclose(points[:, 0], values, rtol=1e-12)
            np.testing.assert_array_equal(points[:, 1], gaps)
            assert axis.get_xscale() == scale and axis.get_ylabel().startswith("generalization gap")


def test_real_and_log_axes_show_the_values(tmp_path):
    from matplotlib.figure import Figure

    from nfm_cli.report.plots import _draw
    runs, _ = load_runs(sweep(tmp_path, n=5))
    for scale, expect_log in (("real", False), ("log", True), ("rescaled", False)):
        fig = Figure()
        ax = fig.add_subplot(1, 1, 1)
        _draw(fig, ax, runs, "hessian_trace", "gap", "", x_scale=scale)
        xs = ax.collections[0].get_offsets()[:, 0]
        real = np.array([r["hessian_trace"] for r in runs])
        if scale == "rescaled":
            assert xs.min() == 0.0 and xs.max() == 1.0
        else:
            assert np.allclose(sorted(xs), sorted(real))
        assert (ax.get_xscale() == "log") == expect_log
    runs[0]["hessian_trace"] = -1.0                       # cannot be drawn on a log axis: left out, counted
    fig = Figure()
    ax = fig.add_subplot(1, 1, 1)
    _draw(fig, ax, runs, "hessian_trace", "gap", "", x_scale="log")
    assert len(ax.collections[0].get_offsets()) == 4 and "1 run <= 0 not shown" in ax.get_xlabel()
    assert math.isfinite(float(ax.get_xlim()[0]))
