"""The measure registry is the one list of measures: README, compute_measures, report and plots agree with it."""
import re
from pathlib import Path

import torch
from torch import nn

from nfm_cli.measures import registry as reg
from nfm_cli.measures.compute import compute_measures
from nfm_cli.report.correlations import CSV_COLUMNS, DEFAULT_MEASURES, valid_columns

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_measure_table_is_the_registry():
    text = README.read_text()
    found = re.search(r"<!-- measure table:.*?-->\n(.*?)<!-- end of measure table -->", text, re.S)
    assert found, "README lacks the measure table markers"
    assert found.group(1) == reg.readme_table(), \
        "README's measure table is stale: paste the output of `python scripts/measure_table.py`"


def test_compute_measures_returns_exactly_the_registered_numbers():
    """Every top-level number compute_measures returns is a registered measure or diagnostic and vice
    versa (the per-sample-gradient ones come from fisher_rao and are added by measuring.measure_checkpoint)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    hdiag = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    summary = compute_measures(model, hdiag).summary
    expected = {k for k, m in reg.MEASURES.items() if m.source not in ("gradients", "rivals")} | set(reg.DIAGNOSTICS)
    assert set(summary) - {"layers"} == expected


def test_every_spec_is_well_formed():
    for key, m in reg.MEASURES.items():
        assert m.key == key and m.title and m.description and m.direction in (-1, 1)
        assert m.source in reg.SOURCES and m.cost == reg.SOURCES[m.source]
        assert m.loss in (None, "ce", "normalized-ce", "accuracy")   # accuracy: the rivals' 0-1 training accuracy


def test_report_and_plots_take_their_names_from_the_registry():
    assert DEFAULT_MEASURES == reg.summary_keys()
    assert set(reg.MEASURES) <= set(valid_columns()) and set(reg.MEASURES) <= set(CSV_COLUMNS)
    assert set(reg.RUN_METRICS) <= set(CSV_COLUMNS)
    assert reg.title("hessian_trace") == "trace of the Hessian" and reg.title("gap").startswith("generalization")
    assert reg.title("unknown_thing") == "unknown_thing"
