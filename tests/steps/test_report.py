"""``steps/report.build_report``: reading, leaving out, correlating, against a hand-made sweep and scipy."""
from __future__ import annotations

import pytest

from nfm_cli.steps.report import ReportRequest, build_report
from tests.conftest import make_result, sweep, write_measures


def test_build_report_correlates_the_runs_and_names_the_skipped(tmp_path):
    from scipy import stats  # the reference
    files = sweep(tmp_path, n=6)
    high_loss = make_result(0.5, 0.5)
    high_loss["metrics"]["train_loss"] = 0.5
    unconverged = write_measures(tmp_path / "high-loss.safetensors", high_loss)
    report = build_report(ReportRequest(files + [unconverged, files[0]], measures=["hessian_trace"],
                                        group_by=("model",), max_train_loss=0.1))
    assert [run["path"] for run in report.runs] == [str(p) for p in files]
    assert dict(report.skipped)[str(files[0])] == "given twice; counted once"
    assert "0.5" in dict(report.skipped)[str(unconverged)]          # left out by --max-train-loss
    assert report.measures == ["hessian_trace"] and report.plots == []
    [group] = report.table
    gaps = [run["gap"] for run in report.runs]
    traces = [run["hessian_trace"] for run in report.runs]
    assert group["correlations"]["hessian_trace"]["kendall_tau"] == pytest.approx(stats.kendalltau(traces, gaps)[0])
    assert "protocol" not in group


def test_build_report_defaults_to_the_registry_measures_and_adds_protocol_scores(tmp_path):
    report = build_report(ReportRequest(sweep(tmp_path, n=5), protocol=True, bootstrap=0))
    assert "normalized_sharpness" in report.measures
    assert set(report.table[0]["protocol"]) == set(report.measures)
