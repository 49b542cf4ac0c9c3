"""``nfm report``."""
from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from nfm_cli.choices import REPORT_GROUP_BY
from nfm_cli.cli import WORKFLOW, command
from nfm_cli.cli.options import Json, Quiet, positive
from nfm_cli.cli.render import console, plural, print_json, progress_bar, score
from nfm_cli.measures.registry import summary_keys
from nfm_cli.steps.report import ReportRequest, build_report
from nfm_cli.store.train_config import GROUP_FIELDS


def _split(values: list[str] | None) -> list[str]:
    return [part for value in values or [] for part in value.split(",") if part.strip()]


@command("report", WORKFLOW, uses_torch=False)
def report_command(
    files: list[Path] = typer.Argument(..., metavar="FILES...",
                                       help="Measures files (from `nfm measure` / `nfm solve-variance`); "
                                       "other or broken files are skipped with the reason."),
    x: list[str] | None = typer.Option(None, "--x", help="Measure to correlate (repeat, or comma-separate). "
                                          f"Default: {','.join(summary_keys())}, and the rivals "
                                          "(nfm measure --rivals) wherever the files hold them."),
    y: str = typer.Option("gap", "--y", help="What the measures should predict (default: the generalization gap, "
                          "train accuracy - test accuracy)."),
    plot: Path | None = typer.Option(None, "--plot", help="Write PNG scatter plots (one per measure, plus "
                                        "figure1.png) into this folder (created if missing)."),
    real_x: bool = typer.Option(False, "--real-x", help="Plot each measure's own values on the x axis "
                                "(default: rescaled to [0, 1] by its min and max, as in the paper)."),
    log_x: bool = typer.Option(False, "--log-x", help="Plot each measure's own values on a log x axis "
                               "(runs with values <= 0 are left out and counted in the label)."),
    csv_path: Path | None = typer.Option(None, "--csv", help="Write the per-run table (one row per file) here."),
    as_json: Json = False,
    group_by: str = typer.Option(",".join(REPORT_GROUP_BY), "--group-by",
                                 help=f"Comma-separated run fields to split groups by ({', '.join(GROUP_FIELDS)}), "
                                 "or 'none' for one group."),
    protocol: bool = typer.Option(False, "--protocol", help="Also score each measure the way Jiang et al. 2020 "
                                  "and Dziugaite et al. 2020 do over a hyperparameter grid: Kendall tau, granulated "
                                  "Kendall per axis (the config fields that vary, seed excluded), CMI score, robust "
                                  "sign error (max, 90th percentile); see README."),
    bootstrap: int = typer.Option(200, "--bootstrap", min=0, help="With --protocol: bootstrap replicates over "
                                  "seeds for the 95% intervals (when the runs have several seeds; 0: none)."),
    max_train_loss: float | None = typer.Option(None, "--max-train-loss", callback=positive,
                                                   metavar="LOSS", help="Leave out (as skipped, with the reason) "
                                                   "runs whose final training loss is above LOSS, as Jiang et al. "
                                                   "2020 leave out models that did not reach their stopping "
                                                   "criterion (e.g. 0.01 with nfm train --stop-at-loss 0.01)."),
    per_run: bool = typer.Option(False, "--runs", help="Print one row per run (random-label ratio, accuracies, "
                                 "gap and the --x measures) instead of the correlations; with --json, add them."),
    quiet: Quiet = False,
) -> None:
    """Correlate each flatness measure with the generalization gap over many runs.

    Pearson r, Spearman rho and Kendall tau per group, optionally with scatter plots like the paper's
    Figures 1, 3 and 4, and the hyperparameter-grid scores of the generalization-measure literature
    (--protocol)."""
    from nfm_cli.report.correlations import check_group_by, check_names, check_outputs, write_csv
    y = y.strip().replace("-", "_")
    names = _split(x)
    measures = check_names(names, y) if names else None    # None: default_measures(runs), once they are read
    groups = () if group_by.strip().lower() in ("", "none") else tuple(g.strip() for g in group_by.split(",")
                                                                       if g.strip())
    check_group_by(groups)
    check_outputs(plot, csv_path)
    x_scale = "log" if log_x else ("real" if real_x else "rescaled")
    request = ReportRequest(files, measures, y, groups, max_train_loss, protocol, bootstrap, plot, x_scale)
    with progress_bar(quiet or not console.is_terminal) as on_event:
        report = build_report(request, progress=on_event)
    runs, skipped, measures, table, plots = report.runs, report.skipped, report.measures, report.table, report.plots
    written_csv = write_csv(runs, csv_path) if csv_path is not None else None

    for path, reason in skipped:
        console.print(f"skipped {path}: {reason}", style="yellow", markup=False, highlight=False, soft_wrap=True)
    if as_json:
        data = {"y": y, "group_by": list(groups), "measures": measures, "n_files": len(files),
                "n_runs": len(runs), "groups": table,
                "skipped": [{"path": p, "reason": r} for p, r in skipped],
                "plots": [str(p) for p in plots], "csv": str(written_csv) if written_csv else None}
        print_json(_with_runs(data, runs, measures, y) if per_run else data)
        return
    _print_tables(runs, table, measures, groups, y, protocol, per_run)
    _print_notes(runs, files, skipped, plots, plot, written_csv)


RUN_COLUMNS = ("random_ratio", "train_acc", "test_acc")


def _with_runs(data: dict, runs: list[dict], measures: list[str], y: str) -> dict:
    """``--json --runs``: the report plus one entry per run (its file, ratio, accuracies, y, measures)."""
    data["runs"] = [{k: run.get(k) for k in ("path",) + RUN_COLUMNS + (y,) + tuple(measures)} for run in runs]
    return data


def _print_tables(runs: list[dict], table: list[dict], measures: list[str], groups: tuple[str, ...], y: str,
                  protocol: bool, per_run: bool) -> None:
    """The report's main output on stdout: the per-run rows (``--runs``) or the correlation tables."""
    out = Console()
    if not out.is_terminal:  # a file or pipe has no width: do not squeeze the table into 80 columns
        out = Console(width=max(out.width, 120))
    if per_run:
        _print_runs(out, runs, measures, groups, y)
    else:
        _print_correlations(out, table, y, protocol)


def _print_runs(out: Console, runs: list[dict], measures: list[str], groups: tuple[str, ...], y: str) -> None:
    """One table per group, one row per run: the run's file name, ratio, accuracies, y, measures."""
    from nfm_cli.report.correlations import group_runs
    for group, members in group_runs(runs, groups):
        name = ", ".join(f"{k}={v}" for k, v in group.items()) or "all runs"
        t = Table(title=escape(f"{name}: {plural(len(members), 'run')}"), title_justify="left")
        t.add_column("run", no_wrap=True)
        for header in RUN_COLUMNS + (y,) + tuple(measures):
            t.add_column(header.replace("_", " "), justify="right")
        for run in members:
            t.add_row(escape(_run_name(run["path"])), *(score(signed=False, value=_float(run.get(k)))
                                                         for k in RUN_COLUMNS + (y,) + tuple(measures)))
        out.print(t)


def _run_name(path: str) -> str:
    """``demo/mlp-r0.3.measures.safetensors`` -> ``mlp-r0.3``."""
    name = Path(path).name
    for suffix in (".measures.safetensors", ".safetensors"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _float(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _print_correlations(out: Console, table: list[dict], y: str, protocol: bool = False) -> None:
    for group in table:
        name = ", ".join(f"{k}={v}" for k, v in group["group"].items()) or "all runs"
        t = Table(title=escape(f"{name}: {plural(group['n_runs'], 'run')}, correlation with {y}"), title_justify="left")
        t.add_column("measure", no_wrap=True, min_width=max(len(m) for m in group["correlations"]))
        for header in ("n", "pearson r", "spearman \u03c1", "kendall \u03c4", "min", "max"):
            t.add_column(header, justify="right", no_wrap=True)
        for measure, c in group["correlations"].items():
            t.add_row(measure, str(c["n"]), score(c["pearson_r"]), score(c["spearman_rho"]),
                      score(c["kendall_tau"]), score(signed=False, value=c["min"]), score(signed=False, value=c["max"]))
        out.print(t)
        if protocol:
            out.print(_protocol_table(group, name))


def _print_notes(runs, files, skipped, plots, plot, written_csv) -> None:
    if skipped:
        console.print(f"{len(runs)} of {len(files)} files reported, {len(skipped)} skipped", style="yellow",
                      highlight=False)
    if plots:
        figure1 = [p for p in plots if p.name.startswith("figure1")]
        where = f" (Figure 1, Hessian trace | normalized sharpness vs gap: {', '.join(map(str, figure1))})" \
            if figure1 else ""
        console.print(f"wrote {len(plots)} plots to {plot}{where}", markup=False, highlight=False, soft_wrap=True)
    if written_csv is not None:
        console.print(f"wrote {written_csv}", markup=False, highlight=False, soft_wrap=True)


def _with_interval(value: float, interval) -> str:
    return score(value) if not interval else f"{score(value)} [{score(interval[0])}, {score(interval[1])}]"


def _protocol_table(group: dict, name: str) -> Table:
    axes = group["axes"]
    t = Table(title=escape(f"{name}: protocol scores over axes {', '.join(axes) or '(none vary)'}"
                           + (" (95% bootstrap intervals over seeds)" if any(
                               p["ci95"] for p in group["protocol"].values()) else "")), title_justify="left")
    t.add_column("measure", no_wrap=True)
    headers = ["kendall \u03c4"] + [f"\u03c8 {a}" for a in axes] + ["\u03a8", "CMI", "RSE max", "RSE p90"]
    for header in headers:
        t.add_column(header, justify="right")
    for measure, p in group["protocol"].items():
        ci = p["ci95"] or {}
        cells = [_with_interval(p["kendall_tau"], ci.get("kendall_tau"))]
        cells += [_with_interval(p["granulated_kendall"][a], (ci.get("granulated_kendall") or {}).get(a)) for a in axes]
        cells += [_with_interval(p[k], ci.get(k)) for k in ("granulated_kendall_mean", "cmi_score",
                                                             "robust_sign_error_max", "robust_sign_error_p90")]
        t.add_row(measure, *cells)
    return t
