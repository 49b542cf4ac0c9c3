"""``nfm report``."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from nfm_cli.cli import WORKFLOW, app
from nfm_cli.cli.options import Json, Quiet
from nfm_cli.cli.render import console, print_json, progress_bar
from nfm_cli.report import DEFAULT_GROUP_BY, DEFAULT_MEASURES, check_names, correlation_table, load_runs, write_csv


def _cell(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{value:+.3f}"


def _num(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{value:.3g}"


def _split(values: Optional[list[str]]) -> list[str]:
    return [part for value in values or [] for part in value.split(",") if part.strip()]


@app.command("report", rich_help_panel=WORKFLOW)
def report_command(
    files: list[Path] = typer.Argument(..., metavar="FILES...", help="Measures files (from `nfm measure` / `nfm solve-variance`); "
                                       "other or broken files are skipped with the reason."),
    x: Optional[list[str]] = typer.Option(None, "--x", help="Measure to correlate (repeat, or comma-separate). "
                                          f"Default: {','.join(DEFAULT_MEASURES)}."),
    y: str = typer.Option("gap", "--y", help="What the measures should predict (default: the generalization gap, "
                          "train accuracy - test accuracy)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write PNG scatter plots (one per measure, plus "
                                        "figure1.png) into this folder (created if missing)."),
    csv_path: Optional[Path] = typer.Option(None, "--csv", help="Write the per-run table (one row per file) here."),
    as_json: Json = False,
    group_by: str = typer.Option(",".join(DEFAULT_GROUP_BY), "--group-by",
                                 help="Comma-separated run fields to split groups by (model, dataset, seed, "
                                 "train_size, epochs), or 'none' for one group."),
    quiet: Quiet = False,
) -> None:
    """Correlate each flatness measure with the generalization gap over many runs.

    Pearson r, Spearman rho and Kendall tau per group, optionally with scatter plots like the paper's
    Figures 1, 3 and 4."""
    y = y.strip().replace("-", "_")
    measures = check_names(_split(x) or list(DEFAULT_MEASURES), y)
    groups = () if group_by.strip().lower() in ("", "none") else tuple(g.strip() for g in group_by.split(",")
                                                                       if g.strip())
    with progress_bar(quiet or not console.is_terminal) as on_event:
        runs, skipped = load_runs(files, y=y, progress=on_event)
        table = correlation_table(runs, measures, y=y, group_by=groups)
        plots: list[Path] = []
        if plot is not None:
            from nfm_cli.plots import scatter_plots  # matplotlib only when plotting
            plots = scatter_plots(runs, measures, plot, y=y, group_by=groups, progress=on_event)
    written_csv = write_csv(runs, csv_path) if csv_path is not None else None

    for path, reason in skipped:
        console.print(f"skipped {path}: {reason}", style="yellow", markup=False, highlight=False, soft_wrap=True)
    if as_json:
        print_json({"y": y, "group_by": list(groups), "measures": measures, "n_files": len(files),
                    "n_runs": len(runs), "groups": table,
                    "skipped": [{"path": p, "reason": r} for p, r in skipped],
                    "plots": [str(p) for p in plots], "csv": str(written_csv) if written_csv else None})
        return
    out = Console()  # the table is report's main output: stdout
    if not out.is_terminal:  # a file or pipe has no width: do not squeeze the table into 80 columns
        out = Console(width=max(out.width, 120))
    for group in table:
        name = ", ".join(f"{k}={v}" for k, v in group["group"].items()) or "all runs"
        t = Table(title=escape(f"{name}: {group['n_runs']} runs, correlation with {y}"), title_justify="left")
        t.add_column("measure", no_wrap=True, min_width=max(len(m) for m in group["correlations"]))
        for header in ("n", "pearson r", "spearman \u03c1", "kendall \u03c4", "min", "max"):
            t.add_column(header, justify="right", no_wrap=True)
        for measure, c in group["correlations"].items():
            t.add_row(measure, str(c["n"]), _cell(c["pearson_r"]), _cell(c["spearman_rho"]),
                      _cell(c["kendall_tau"]), _num(c["min"]), _num(c["max"]))
        out.print(t)
    if skipped:
        console.print(f"{len(runs)} of {len(files)} files reported, {len(skipped)} skipped", style="yellow",
                      highlight=False)
    if plots:
        console.print(f"wrote {len(plots)} plots to {plot}", markup=False, highlight=False, soft_wrap=True)
    if written_csv is not None:
        console.print(f"wrote {written_csv}", markup=False, highlight=False, soft_wrap=True)
