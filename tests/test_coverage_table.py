"""README's coverage block is what scripts/coverage.py makes from the committed rows (issue 20 item 5)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def coverage_script():
    spec = importlib.util.spec_from_file_location("coverage_script", REPO / "scripts" / "coverage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_coverage_block_matches_the_committed_rows():
    script = coverage_script()
    rows = script.read_rows(REPO / "results" / "coverage" / "coverage.jsonl")
    readme = (REPO / "README.md").read_text()
    begin, end = readme.index(script.README_BEGIN), readme.index(script.README_END) + len(script.README_END)
    assert readme[begin:end] == script.readme_table(rows)


def test_the_readme_block_counts_each_choice(tmp_path):
    script = coverage_script()
    rows = [{"family": "f", "name": "a", "auto": "exact", "diagonal_s": 4.0, "gradient_s": 1.0},
            {"family": "f", "name": "b", "auto": "exact", "diagonal_s": 9.0, "gradient_s": 1.5},
            {"family": "f", "name": "c", "auto": "ggn"},
            {"family": "f", "name": "d", "auto": "refused", "why": "no rule | here"}]
    table = script.readme_table(rows)
    assert "| f | 4 | 2 | 1 | 1 | 2 | 5.0 (4.0-6.0) | - |" in table
    assert "- f `d`: no rule \\| here" in table
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{script.README_BEGIN}\nold\n{script.README_END}\nrest\n")
    script.write_readme(readme, rows)
    assert readme.read_text() == f"intro\n{table}\nrest\n"
