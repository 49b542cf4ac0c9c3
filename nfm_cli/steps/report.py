"""``nfm report``'s work: runs read from measures files, the unconverged ones left out, the measures
correlated with the gap per group (Sec. 6's Figures 1, 3, 4), the protocol scores of Jiang et al. 2020 and
Dziugaite et al. 2020 if asked, and the scatter plots. Never imports torch (``report`` starts without it).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nfm_cli.runtime.progress import ProgressFn


@dataclass(frozen=True)
class ReportRequest:
    """What to report: ``measures`` None means ``correlations.default_measures`` of the runs read;
    ``plot`` a folder for the PNGs or None; ``x_scale`` "rescaled", "real" or "log"."""

    files: Sequence[str | Path]
    measures: Sequence[str] | None = None
    y: str = "gap"
    group_by: tuple[str, ...] = ()
    max_train_loss: float | None = None
    protocol: bool = False
    bootstrap: int = 200
    plot: Path | None = None
    x_scale: str = "rescaled"


@dataclass
class Report:
    """The runs read, the files skipped with their reasons, the measures correlated, the table (one entry
    per group, ``correlations.correlation_table``, with ``protocol`` scores if asked) and the plots written."""

    runs: list[dict[str, Any]]
    skipped: list[tuple[str, str]]
    measures: list[str]
    table: list[dict[str, Any]]
    plots: list[Path] = field(default_factory=list)


def build_report(request: ReportRequest, progress: ProgressFn = None) -> Report:
    """Read, filter, correlate, score and plot as ``request`` says, reporting progress through ``progress``."""
    from nfm_cli.report.correlations import (
        add_protocol,
        correlation_table,
        default_measures,
        drop_unconverged,
        load_runs,
    )
    runs, skipped = load_runs(request.files, y=request.y, progress=progress)
    if request.max_train_loss is not None:
        runs, dropped = drop_unconverged(runs, request.max_train_loss)
        skipped += dropped
    measures = list(request.measures or default_measures(runs))
    table = correlation_table(runs, measures, y=request.y, group_by=request.group_by)
    if request.protocol:
        add_protocol(table, runs, measures, y=request.y, group_by=request.group_by, bootstrap=request.bootstrap,
                     progress=progress)
    plots: list[Path] = []
    if request.plot is not None:
        from nfm_cli.report.plots import scatter_plots  # matplotlib only when plotting
        plots = scatter_plots(runs, measures, request.plot, y=request.y, group_by=request.group_by,
                              progress=progress, x_scale=request.x_scale)
    return Report(runs, skipped, measures, table, plots)


__all__ = ["Report", "ReportRequest", "build_report"]
