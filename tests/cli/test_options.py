"""Wrong input is refused, and refused before any work (issue 13, items 5 and 6).

Every command's bad options must fail before the expensive part: the expensive functions are
replaced by ones that fail the test if called, and the output folder must stay as it was.
"""
import math

import pytest

import nfm_cli.report.correlations as report_module
import nfm_cli.steps.hessian_diag as driver_module
import nfm_cli.steps.measure as measuring_module
import nfm_cli.steps.rescale as rescale_module
import nfm_cli.steps.solve as solving_module
import nfm_cli.steps.train as training_module
from nfm_cli.steps.train import DIVERGENCE_FACTOR, _flag_divergence


def _forbid(monkeypatch, module, name):
    def called(*args, **kwargs):
        raise AssertionError(f"{name} ran although an option was bad")
    monkeypatch.setattr(module, name, called)


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def _one_error_line(res, fragment):
    assert res.code not in (0, 3), (res.code, res.err)
    lines = [line for line in res.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("nfm: error: "), res.err
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("args, fragment", [
    (["--tol", "-1"], "Invalid value for '--tol'"),
    (["--tol", "nan"], "Invalid value for '--tol'"),
    (["--max-iter", "0"], "Invalid value for '--max-iter'"),
    (["--precision", "float16"], "Invalid value for '--precision'"),
    (["--estimator", "magic"], "'magic' is not one of"),
    (["--estimator", "hutchinson", "--probes", "0"], "Invalid value for '--probes'"),
    (["--batch-size", "0"], "Invalid value for '--batch-size'"),
    (["--samples", "0"], "Invalid value for '--samples'"),
    (["--out", "{tmp}/missing/m.safetensors"], "the folder of --out"),
])
def test_measure_checks_every_option_before_the_hessians(cli, monkeypatch, tmp_path, tiny_checkpoint, args,
                                                         fragment):
    _forbid(monkeypatch, measuring_module, "compute_hessian_diagonal")
    _forbid(monkeypatch, measuring_module, "load_checkpoint")
    out = tmp_path / "m.safetensors"
    res = cli("measure", tiny_checkpoint, "--out", out, *[a.format(tmp=tmp_path) for a in args])
    _one_error_line(res, fragment)
    assert _listing(tmp_path) == []


def test_measure_missing_folder_names_out_not_an_intermediate_file(cli, tmp_path, tiny_checkpoint):
    out = tmp_path / "missing" / "m.safetensors"
    res = cli("measure", tiny_checkpoint, "--out", out)
    _one_error_line(res, "--out")
    assert "hdiag" not in res.err and str(out) in res.err


@pytest.mark.parametrize("args, fragment", [
    (["--loss", "mse"], "'mse' is not one of"),
    (["--estimator", "magic"], "'magic' is not one of"),
    (["--estimator", "finite-diff", "--finite-diff-scale", "-1"], "Invalid value for '--finite-diff-scale'"),
    (["--estimator", "hutchinson", "--probes", "0"], "Invalid value for '--probes'"),
    (["--batch-size", "0"], "Invalid value for '--batch-size'"),
    (["--samples", "0"], "Invalid value for '--samples'"),
    (["--samples", "100000"], "more than the 128 training samples"),
    (["--data-dir", "{tmp}/nowhere"], "--data-dir does not exist"),
])
def test_hessian_diag_checks_every_option_before_the_estimator(cli, monkeypatch, tmp_path, tiny_checkpoint, args,
                                                               fragment):
    _forbid(monkeypatch, driver_module, "make_estimator")
    res = cli("hessian-diag", tiny_checkpoint, "--out", tmp_path / "h.safetensors",
              *[a.format(tmp=tmp_path) for a in args])
    _one_error_line(res, fragment)
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("args, fragment", [
    (["--lr", "-1"], "Invalid value for '--lr'"),
    (["--data-dir", "{tmp}/nowhere"], "--data-dir does not exist"),
    (["--data-dir", "{tmp}/a-file"], "--data-dir is a file"),
    (["--out", "{tmp}/missing/x.safetensors"], "does not exist"),
])
def test_train_checks_options_before_loading_data(cli, monkeypatch, tmp_path, args, fragment):
    _forbid(monkeypatch, training_module, "load_split")
    (tmp_path / "a-file").write_text("not a dataset")
    res = cli("train", "--dataset", "fashion-mnist", "--out", tmp_path / "x.safetensors",
              *[a.format(tmp=tmp_path) for a in args])
    _one_error_line(res, fragment)
    assert _listing(tmp_path) == ["a-file"]


def test_solve_variance_checks_the_solver_options_first(cli, monkeypatch, tmp_path, tiny_checkpoint):
    _forbid(monkeypatch, solving_module, "load_checkpoint")
    res = cli("solve-variance", tiny_checkpoint, tmp_path / "h.safetensors", "--out", tmp_path / "m.safetensors",
              "--tol", "-1")
    _one_error_line(res, "Invalid value for '--tol'")
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("args, fragment", [
    (["--group-by", "colour"], "cannot group by 'colour'"),
    (["--csv", "{tmp}/missing/runs.csv"], "--csv: folder"),
    (["--csv", "{tmp}"], "--csv is a directory"),
    (["--plot", "{tmp}/a-file"], "--plot needs a folder"),
    (["--plot", "{tmp}/missing/plots"], "parent folder"),
])
def test_report_checks_its_outputs_before_reading(cli, monkeypatch, tmp_path, args, fragment):
    _forbid(monkeypatch, report_module, "load_runs")
    (tmp_path / "a-file").write_text("x")
    res = cli("report", tmp_path / "run.measures.safetensors", *[a.format(tmp=tmp_path) for a in args])
    _one_error_line(res, fragment)
    assert _listing(tmp_path) == ["a-file"]


@pytest.mark.parametrize("args, fragment", [
    (["--mode", "spin", "--alpha", "2"], "'spin' is not one of"),
    (["--mode", "neuron", "--alpha", "-2"], "alpha must be a positive number"),
    (["--mode", "neuron"], "give exactly one of alpha"),
    (["--mode", "neuron", "--alpha", "2", "--out", "{tmp}/missing/r.safetensors"], "existing folder"),
])
def test_rescale_checks_options_before_loading(cli, monkeypatch, tmp_path, tiny_checkpoint, args, fragment):
    _forbid(monkeypatch, rescale_module, "load_checkpoint")
    args = [a.format(tmp=tmp_path) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "r.safetensors")]
    res = cli("rescale", tiny_checkpoint, *args)
    _one_error_line(res, fragment)
    assert _listing(tmp_path) == []


# ---- item 5: wrong input accepted silently ----------------------------------------------------

def test_explicit_data_dir_without_the_dataset_is_an_error(cli, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = cli("train", "--dataset", "mnist", "--data-dir", empty, "--out", tmp_path / "x.safetensors")
    _one_error_line(res, "--data-dir does not hold the mnist dataset")
    assert str(empty) in res.err and not (tmp_path / "x.safetensors").exists()


def test_train_size_beyond_the_split_is_refused(cli, tmp_path):
    res = cli("train", "--dataset", "synthetic", "--train-size", "1000000000", "--out", tmp_path / "x.safetensors")
    _one_error_line(res, "--train-size 1000000000 is more than the 2048 samples of the synthetic training split")
    res = cli("train", "--dataset", "synthetic", "--test-size", "513", "--out", tmp_path / "x.safetensors")
    _one_error_line(res, "--test-size 513 is more than the 512 samples")
    assert _listing(tmp_path) == []


def test_divergence_rule_by_hand():
    limit = DIVERGENCE_FACTOR * math.log(10)          # 23.03 for 10 classes
    ok = {"epoch_loss": 2.0, "train_loss": 22.9, "test_loss": 1e6, "train_acc": 0.5, "test_acc": 0.4, "gap": 0.1}
    assert "diverged" not in _flag_divergence(ok, [], 1, limit)   # a huge test loss is overfitting, not divergence
    high = dict(ok, train_loss=23.1)
    assert _flag_divergence(high, [], 3, limit)["diverged_epoch"] == 3
    nan = dict(ok, epoch_loss=float("nan"))
    flagged = _flag_divergence(nan, [], 2, limit)
    assert flagged["diverged"] and flagged["epoch_loss"] is None
    later = _flag_divergence(ok, [dict(ok, epoch=1), dict(high, diverged=True, diverged_epoch=2)], 3, limit)
    assert later["diverged"] and later["diverged_epoch"] == 2     # once diverged, the run stays flagged


def test_diverged_training_is_flagged_warned_and_refused_by_measure(cli, tmp_path):
    out = tmp_path / "div.safetensors"
    res = cli("train", "--dataset", "synthetic", "--width", "16", "--train-size", "128", "--test-size", "64",
              "--epochs", "2", "--lr", "1e6", "--out", out, "--quiet")
    assert res.code == 0 and res.out == f"{out}\n"
    assert "warning: training diverged at epoch" in res.err
    info = cli("inspect", out, "--json")
    import json
    metrics = json.loads(info.out)["meta"]["metrics"]
    assert metrics["diverged"] is True and metrics["diverged_epoch"] >= 1
    measured = cli("measure", out)
    _one_error_line(measured, "training diverged")
    assert "float64" not in measured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["div.safetensors"]
