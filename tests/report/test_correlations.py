"""``nfm report``: correlations against scipy, skipping bad files, CSV/JSON/plots, the CLI."""
from __future__ import annotations

import csv
import json
import math
import warnings

import numpy as np
import pytest
import torch

from nfm_cli.errors import NfmError
from nfm_cli.measures.registry import summary_keys
from nfm_cli.report.correlations import (
    CSV_COLUMNS,
    DEFAULT_MEASURES,
    correlation_table,
    correlations,
    load_runs,
    minmax_rescale,
    write_csv,
)
from nfm_cli.store.artifacts import write_artifact
from tests.conftest import make_result, sweep, write_measures

# --- statistics ------------------------------------------------------------------------------------

def test_hand_computed_small_example():
    c = correlations([1.0, 2.0, 3.0], [1.0, 3.0, 2.0])
    assert c["n"] == 3
    assert c["pearson_r"] == pytest.approx(0.5)  # cov 1 / sqrt(2 * 2)
    assert c["spearman_rho"] == pytest.approx(0.5)
    assert c["kendall_tau"] == pytest.approx(1 / 3)  # 2 concordant, 1 discordant pair
    assert (c["min"], c["max"]) == (1.0, 3.0)


def test_linear_and_monotone_measures_against_scipy():
    from scipy import stats  # the reference implementation
    rng = np.random.default_rng(0)
    gap = rng.uniform(0, 1, 30)
    lin = correlations(4.0 * gap - 2.0, gap)
    assert lin["pearson_r"] == pytest.approx(1.0) and lin["spearman_rho"] == pytest.approx(1.0)
    mono = correlations(np.exp(5 * gap), gap)
    assert mono["spearman_rho"] == pytest.approx(1.0) and mono["kendall_tau"] == pytest.approx(1.0)
    assert mono["pearson_r"] < 0.99
    anti = correlations(-gap ** 3, gap)
    assert anti["spearman_rho"] == pytest.approx(-1.0) and anti["kendall_tau"] == pytest.approx(-1.0)
    x = gap + rng.normal(0, 0.3, 30)
    c = correlations(x, gap)
    for key, fn in (("pearson", stats.pearsonr), ("spearman", stats.spearmanr), ("kendall", stats.kendalltau)):
        want = fn(x, gap)
        stat = {"pearson": "pearson_r", "spearman": "spearman_rho", "kendall": "kendall_tau"}[key]
        assert c[stat] == pytest.approx(want[0], rel=1e-12)
        assert c[f"{key}_p"] == pytest.approx(want[1], rel=1e-9)


def test_ties_constant_columns_nan_and_small_n():
    from scipy import stats  # the reference implementation
    x, y = [1.0, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]
    c = correlations(x, y)
    assert c["kendall_tau"] == pytest.approx(5 / math.sqrt(5 * 6))  # tau-b: C=5, D=0, one tie in x
    assert c["spearman_rho"] == pytest.approx(stats.spearmanr(x, y)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no scipy warning escapes either
        const = correlations([7.0] * 5, [0.1, 0.2, 0.3, 0.4, 0.5])
        const_y = correlations([1.0, 2.0, 3.0], [0.5, 0.5, 0.5])
        two = correlations([1.0, 2.0], [1.0, 2.0])
        gaps = correlations([1.0, math.nan, 3.0, math.inf, 5.0, 6.0], [1.0, 2.0, math.nan, 4.0, 5.0, 7.0])
    for res in (const, const_y, two):
        assert all(math.isnan(res[k]) for k in ("pearson_r", "pearson_p", "spearman_rho", "kendall_tau"))
    assert const["n"] == 5 and two["n"] == 2
    assert gaps["n"] == 3 and gaps["pearson_r"] == pytest.approx(stats.pearsonr([1, 5, 6], [1, 5, 7])[0])
    huge = correlations([1e300, 2e300, 4e300], [1.0, 2.0, 4.0])  # no overflow inside Pearson
    assert huge["pearson_r"] == pytest.approx(1.0)


def test_minmax_rescale():
    assert minmax_rescale([2.0, 4.0, 6.0]).tolist() == [0.0, 0.5, 1.0]
    out = minmax_rescale([3.0, math.nan, 3.0, math.inf])
    assert out[0] == out[2] == 0.5 and math.isnan(out[1]) and math.isnan(out[3])
    assert np.allclose(minmax_rescale([-1e308, 0.0, 1e308]), [0.0, 0.5, 1.0])
    assert np.isnan(minmax_rescale([math.nan])).all()


# --- loading, grouping, CSV -------------------------------------------------------------------------

def bad_files(tmp_path, good):
    ckpt = tmp_path / "ckpt.safetensors"
    write_artifact(ckpt, {"w": torch.zeros(2)}, "checkpoint", {"config": {}})
    data = good.read_bytes()
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    folder = tmp_path / "adir"
    folder.mkdir()
    no_metrics = make_result(0.1, 0.0)
    del no_metrics["metrics"]
    return {ckpt: "is a 'checkpoint' file", truncated: "not a valid safetensors file",
            tmp_path / "absent.safetensors": "no such file", folder: "is a directory",
            write_measures(tmp_path / "nometrics.safetensors", no_metrics): "no metrics",
            write_measures(tmp_path / "nullgap.safetensors", make_result(None, 0.5)): "non-finite 'gap'"}


def test_load_runs_skips_bad_files_with_reasons(tmp_path):
    good = sweep(tmp_path, n=4)
    bad = bad_files(tmp_path, good[0])
    runs, skipped = load_runs(good + list(bad) + [good[0]])
    assert [r["path"] for r in runs] == [str(p) for p in good]
    reasons = dict(skipped)
    for path, fragment in bad.items():
        assert fragment in reasons[str(path)]
    assert skipped[-1] == (str(good[0]), "given twice; counted once")
    run = runs[1]
    assert run["normalized_sharpness"] == pytest.approx(10.0 + 3.0 * run["gap"])
    assert run["model"] == "mlp" and run["seed"] == 1 and run["converged"] is True
    assert math.isnan(runs[0]["fisher_rao_norm"])  # null in the file
    with pytest.raises(NfmError, match=r"no usable measures files among 2 given \(first: .*ckpt"):
        load_runs([p for p in bad][:2])


def test_correlation_table_groups_and_unknown_names(tmp_path):
    runs, _ = load_runs(sweep(tmp_path, n=6, models=("mlp", "lenet")))
    table = correlation_table(runs, DEFAULT_MEASURES)
    assert [g["group"] for g in table] == [{"model": "mlp", "dataset": "fashion-mnist"},
                                           {"model": "lenet", "dataset": "fashion-mnist"}]
    for g in table:
        corr = g["correlations"]
        assert g["n_runs"] == 6 and list(corr) == list(DEFAULT_MEASURES)
        assert corr["normalized_sharpness"]["pearson_r"] == pytest.approx(1.0)
        assert corr["hessian_trace"]["kendall_tau"] == pytest.approx(1.0)
        assert math.isnan(corr["frobenius_norm_sq"]["spearman_rho"])
        assert corr["fisher_rao_norm"]["n"] == 4
    whole = correlation_table(runs, ["normalized_sharpness"], group_by=())
    assert len(whole) == 1 and whole[0]["group"] == {} and whole[0]["n_runs"] == 12
    with pytest.raises(NfmError, match="unknown measure 'sharpness'; valid names: normalized_sharpness"):
        correlation_table(runs, ["sharpness"])
    with pytest.raises(NfmError, match="cannot group by 'colour'"):
        correlation_table(runs, ["hessian_trace"], group_by=("colour",))


def test_write_csv_columns_and_values(tmp_path):
    runs, _ = load_runs(sweep(tmp_path, n=3))
    out = write_csv(runs, tmp_path / "runs.csv")
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    header = out.read_text().splitlines()[0].split(",")
    assert header == list(CSV_COLUMNS) and header[:4] == ["normalized_sharpness", "matrix_normalized_sharpness",
                                                          "hessian_trace", "hessian_trace_weights"]
    assert len(rows) == 3
    for row, run in zip(rows, runs, strict=True):
        assert float(row["normalized_sharpness"]) == run["normalized_sharpness"]  # exact (repr)
        assert float(row["gap"]) == run["gap"] and float(row["random_ratio"]) == run["random_ratio"]
        assert row["model"] == "mlp" and row["dataset"] == "fashion-mnist" and row["path"] == run["path"]
    assert rows[0]["fisher_rao_norm"] == "" and rows[1]["fisher_rao_norm"] == "2.0"
    assert rows[0]["seed"] == "0" and rows[0]["converged"] == "true"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    with pytest.raises(NfmError, match="does not exist"):
        write_csv(runs, tmp_path / "missing" / "runs.csv")


# --- plots ------------------------------------------------------------------------------------------

@pytest.mark.heavy
def test_scatter_plots_decode_with_the_expected_size(tmp_path):
    from matplotlib.image import imread

    from nfm_cli.report.plots import FIGURE1_PX, SCATTER_PX, scatter_plots

    runs, _ = load_runs(sweep(tmp_path, n=5))
    runs[0]["random_ratio"] = math.nan  # drawn grey, not dropped
    out = tmp_path / "plots"
    paths = scatter_plots(runs, ["normalized_sharpness", "frobenius_norm_sq"], out)
    assert sorted(p.name for p in paths) == ["figure1.png", "frobenius_norm_sq.png", "normalized_sharpness.png"]
    for path in paths:
        image = imread(path)
        width, height = FIGURE1_PX if path.name == "figure1.png" else SCATTER_PX
        assert image.shape[:2] == (height, width)
        assert image.std() > 0  # something was drawn
    assert [p.name for p in out.iterdir() if not p.name.endswith(".png")] == []
    assert SCATTER_PX == (500, 400) and FIGURE1_PX == (1000, 400)


# --- CLI --------------------------------------------------------------------------------------------

def test_cli_report_mixed_files_table_and_skips(cli, tmp_path):
    good = sweep(tmp_path, n=5)
    bad = bad_files(tmp_path, good[0])
    res = cli("report", *good, *bad)
    assert res.code == 0, res.err
    assert "normalized_sharpness" in res.out and "model=mlp, dataset=fashion-mnist: 5 runs" in res.out
    assert "spectral_norm_product" in res.out and "hessian_trace" in res.out
    skipped = [line for line in res.err.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == len(bad)
    for path, fragment in bad.items():
        assert any(line.startswith(f"skipped {path}: ") and fragment in line for line in skipped)
    assert "5 of 11 files reported, 6 skipped" in res.err


def test_cli_report_all_bad_is_one_error_line(cli, tmp_path):
    good = sweep(tmp_path, n=1)
    bad = bad_files(tmp_path, good[0])
    res = cli("report", *bad)
    assert res.code == 1 and res.out == ""
    lines = [line for line in res.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("nfm: error: no usable measures files among 6 given (first: ")
    res = cli("report", good[0], "--x", "flatness")
    assert res.code == 1 and "unknown measure 'flatness'; valid names:" in res.err
    assert len(res.err.strip().splitlines()) == 1


@pytest.mark.heavy
def test_cli_report_json_csv_plot_and_group_by(cli, tmp_path):
    good = sweep(tmp_path, n=4, models=("mlp", "lenet"))
    plots, table = tmp_path / "figs", tmp_path / "runs.csv"
    res = cli("report", *good, tmp_path / "absent.safetensors", "--json", "--x", "normalized-sharpness,hessian_trace",
              "--plot", plots, "--csv", table)
    assert res.code == 0, res.err
    data = json.loads(res.out)  # one JSON object and nothing else on stdout
    assert set(data) == {"y", "group_by", "measures", "n_files", "n_runs", "groups", "skipped", "plots", "csv"}
    assert data["y"] == "gap" and data["group_by"] == ["model", "dataset"]
    assert data["measures"] == ["normalized_sharpness", "hessian_trace"]
    assert data["n_files"] == 9 and data["n_runs"] == 8 and len(data["groups"]) == 2
    assert data["skipped"] == [{"path": str(tmp_path / "absent.safetensors"),
                                "reason": "no such file; expected a measures file"}]
    corr = data["groups"][0]["correlations"]["normalized_sharpness"]
    assert set(corr) == {"n", "pearson_r", "pearson_p", "spearman_rho", "spearman_p", "kendall_tau", "kendall_p",
                         "min", "max"}
    assert corr["n"] == 4 and corr["pearson_r"] == pytest.approx(1.0)
    assert sorted(p.split("/")[-1] for p in data["plots"]) == sorted(
        f"{name}--{model}-fashion-mnist.png" for name in ("figure1", "normalized_sharpness", "hessian_trace")
        for model in ("mlp", "lenet"))
    assert all((plots / p.split("/")[-1]).is_file() for p in data["plots"])
    assert data["csv"] == str(table) and len(table.read_text().splitlines()) == 9

    one = json.loads(cli("report", *good, "--json", "--group-by", "none").out)
    assert len(one["groups"]) == 1 and one["groups"][0]["n_runs"] == 8 and one["group_by"] == []
    assert one["groups"][0]["correlations"]["frobenius_norm_sq"]["pearson_r"] is None  # NaN -> null
    by_model = json.loads(cli("report", *good, "--json", "--group-by", "model").out)
    assert [g["group"] for g in by_model["groups"]] == [{"model": "mlp"}, {"model": "lenet"}]

    res = cli("report", *good, "--plot", tmp_path / "no" / "such")
    assert res.code == 1 and "does not exist" in res.err


def test_runs_that_missed_the_stopping_criterion_are_left_out_with_the_reason(cli, tmp_path):
    """--max-train-loss: a run whose final training loss is above the limit (or unknown) is skipped with
    its loss named; the correlations are those of the other runs alone."""
    from nfm_cli.report.correlations import drop_unconverged, load_runs
    files = []
    for i, loss in enumerate([0.004, 0.01, 0.058, None, 0.009]):
        result = make_result(0.1 * (i + 1), 0.1 * i, seed=i, normalized_sharpness=float(i * i))
        result["metrics"]["train_loss"] = loss
        files.append(write_measures(tmp_path / f"r{i}.measures.safetensors", result))
    runs, _ = load_runs(files)
    kept, dropped = drop_unconverged(runs, 0.01)
    assert [r["path"] for r in kept] == [str(files[i]) for i in (0, 1, 4)]
    assert [p for p, _ in dropped] == [str(files[2]), str(files[3])]
    assert "final training loss 0.058 is above 0.01" in dropped[0][1] and "nan" in dropped[1][1]
    with pytest.raises(NfmError, match="none of the 5 runs"):
        drop_unconverged(runs, 1e-4)
    res = cli("report", *files, "--max-train-loss", "0.01", "--json", "--group-by", "none", "-q")
    assert res.code == 0, res.err
    data = json.loads(res.out)
    assert data["n_runs"] == 3 and sorted(s["path"] for s in data["skipped"]) == [str(files[2]), str(files[3])]
    alone = json.loads(cli("report", *[files[i] for i in (0, 1, 4)], "--json", "--group-by", "none", "-q").out)
    assert data["groups"][0]["correlations"] == alone["groups"][0]["correlations"]


def test_report_correlates_the_rivals_by_default_where_the_files_hold_them(cli, tmp_path):
    """issue 23 item 3: no --x needed for the rivals; none of them when no file holds them; diagnostics never."""
    plain = [write_measures(tmp_path / f"plain-{i}.safetensors", make_result(0.1 * i, 0.2 * i, seed=i))
             for i in range(4)]
    res = cli("report", *plain, "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["measures"] == list(summary_keys())
    rivals = [write_measures(tmp_path / f"rival-{i}.safetensors",
                             make_result(0.1 * i, 0.2 * i, seed=i, adaptive_sharpness=1.0 + i * i,
                                         pacbayes_flatness=4.0 - i)) for i in range(4)]
    res = cli("report", *plain, *rivals, "--json", "--protocol", "--bootstrap", "0")
    assert res.code == 0, res.err
    got = json.loads(res.out)
    assert got["measures"] == [*summary_keys(), "pacbayes_flatness", "adaptive_sharpness"]
    (only,) = [g["correlations"] for g in got["groups"]]
    assert only["adaptive_sharpness"]["n"] == 4 and only["adaptive_sharpness"]["kendall_tau"] == pytest.approx(1.0)
    assert only["pacbayes_flatness"]["kendall_tau"] == pytest.approx(-1.0)
    assert "clipped_fraction" not in got["measures"]


def test_group_by_help_lists_every_field_it_accepts(cli):
    res = cli("report", "--help")
    assert res.code == 0
    text = " ".join(res.out.split())
    for field in ("model", "dataset", "seed", "train_size", "epochs", "optimizer", "estimator"):
        assert field in text, field
