"""The measure registry is the one list of measures: README, compute_measures, report and plots agree with it."""
import json
import re
from pathlib import Path

import torch
from torch import nn

from nfm_cli.cli.render import TOTALS
from nfm_cli.measures import registry as reg
from nfm_cli.measures.compute import compute_measures
from nfm_cli.report.correlations import CSV_COLUMNS, valid_columns
from tests.conftest import sweep

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_measure_table_is_the_registry():
    text = README.read_text()
    found = re.search(r"<!-- measure table:.*?-->\n(.*?)<!-- end of measure table -->", text, re.S)
    assert found, "README lacks the measure table markers"
    assert found.group(1) == reg.readme_table(), \
        "README's measure table is stale: paste the output of `python scripts/measure_table.py`"


def test_compute_measures_returns_exactly_the_registered_numbers():
    """Every top-level number compute_measures returns is a registered measure or diagnostic and vice
    versa (the per-sample-gradient ones come from fisher_rao and are added by steps.measure.measure_checkpoint)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    hdiag = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    summary = compute_measures(model, hdiag).summary
    expected = {k for k, m in reg.MEASURES.items() if m.source not in ("gradients", "rivals")} | set(reg.DIAGNOSTICS)
    assert set(summary) - {"layers"} == expected


def test_every_spec_is_well_formed():
    for key, m in reg.MEASURES.items():
        assert m.key == key and m.title and m.description and m.direction in (-1, 1)
        assert m.source in reg.SOURCES
        assert m.loss in (None, "ce", "normalized-ce", "accuracy")   # accuracy: the rivals' 0-1 training accuracy


def test_registered_loss_and_source_are_what_compute_measures_uses():
    """A measure registered with the normalized-ce loss moves with that diagonal only, one with the ce
    loss with the trace diagonal only, and a weights-only one (loss None) with neither: the registry's
    claims (README's table) checked against the numbers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    h = {n: torch.rand_like(p) + 0.1 for n, p in model.named_parameters()}
    h_ce = {n: torch.rand_like(p) + 0.1 for n, p in model.named_parameters()}
    base = compute_measures(model, h, h_ce).summary
    moved_h = compute_measures(model, {n: 4 * t for n, t in h.items()}, h_ce).summary
    moved_ce = compute_measures(model, h, {n: 4 * t for n, t in h_ce.items()}).summary
    computed = [k for k in base if k in reg.MEASURES]
    assert computed
    for key in computed:
        m = reg.MEASURES[key]
        moves = (moved_h[key] != base[key], moved_ce[key] != base[key])
        assert moves == {"normalized-ce": (True, False), "ce": (False, True), None: (False, False)}[m.loss], key
        assert (m.loss is None) == (m.source == "weights"), key


def test_report_correlates_the_summary_measures_by_default(cli, tmp_path):
    """``nfm report`` without ``--x`` correlates exactly the measures flagged ``summary`` (in table
    order), and ``nfm measure``'s totals show the same ones."""
    res = cli("report", *sweep(tmp_path, n=4), "--json")
    assert res.code == 0, res.err
    flagged = [k for k, m in reg.MEASURES.items() if m.summary]
    assert json.loads(res.out)["measures"] == flagged
    assert list(json.loads(res.out)["groups"][0]["correlations"]) == flagged
    assert [k for k in TOTALS if k in reg.MEASURES and reg.MEASURES[k].source != "rivals"] == flagged


def test_report_and_plots_take_their_names_from_the_registry():
    assert set(reg.MEASURES) <= set(valid_columns()) and set(reg.MEASURES) <= set(CSV_COLUMNS)
    assert set(reg.RUN_METRICS) <= set(CSV_COLUMNS)
    assert reg.title("hessian_trace") == "trace of the Hessian" and reg.title("gap").startswith("generalization")
    assert reg.title("unknown_thing") == "unknown_thing"
