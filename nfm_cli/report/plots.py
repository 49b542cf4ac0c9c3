"""Scatter plots in the style of the paper's Figures 1, 3 and 4: generalization gap vs a measure
rescaled to [0, 1] by its min and max over the runs (or its real values, optionally on a log axis),
points colored by the random-label ratio.

Rendered with matplotlib's Agg backend through the object API (``Figure`` + ``FigureCanvasAgg``):
no display, no pyplot global state, so many figures in one process do not leak. Every PNG has a
fixed pixel size (``SCATTER_PX``, ``FIGURE1_PX``) and is written atomically.
"""
from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

if "matplotlib.pyplot" not in sys.modules:  # never switch the backend under a pyplot user (it closes figures)
    matplotlib.use("Agg")

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from nfm_cli.errors import NfmError  # noqa: E402
from nfm_cli.measures.registry import title  # noqa: E402
from nfm_cli.report.correlations import (  # noqa: E402
    DEFAULT_GROUP_BY,
    DEFAULT_MEASURES,
    column,
    correlations,
    group_runs,
    minmax_rescale,
)
from nfm_cli.runtime.progress import ProgressFn, report  # noqa: E402
from nfm_cli.store.artifacts import atomic_write  # noqa: E402

DPI = 100
SCATTER_INCHES = (5.0, 4.0)
FIGURE1_INCHES = (10.0, 4.0)
SCATTER_PX = (500, 400)  # (width, height) of each per-measure PNG
FIGURE1_PX = (1000, 400)  # (width, height) of figure1.png



def _fmt(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{value:.3f}"


def _title(measure: str, corr: dict[str, Any]) -> str:
    return (f"{title(measure)}\n"
            f"Pearson r={_fmt(corr['pearson_r'])}, Spearman \u03c1={_fmt(corr['spearman_rho'])} (n={corr['n']})")


def _slug(group: dict[str, str]) -> str:
    text = "-".join(str(v) for v in group.values())
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "all"


X_SCALES = ("rescaled", "real", "log")


def _x_values(values: np.ndarray, x_scale: str) -> tuple[np.ndarray, int]:
    """The x coordinates: min-max rescaled (the paper's axis), real, or real for a log axis (values
    <= 0 cannot be drawn there: they become NaN and are counted)."""
    if x_scale == "rescaled":
        return minmax_rescale(values), 0
    xs = np.asarray(values, dtype=np.float64).copy()
    if x_scale == "log":
        bad = np.isfinite(xs) & (xs <= 0)
        xs[bad] = np.nan
        return xs, int(bad.sum())
    return xs, 0


def _draw(fig: Figure, ax: Any, runs: Sequence[dict], measure: str, y: str, group_label: str,
          colorbar: bool = True, x_scale: str = "rescaled") -> None:
    xs, dropped = _x_values(column(runs, measure), x_scale)
    ys = column(runs, y)
    ratios = column(runs, "random_ratio")
    corr = correlations(column(runs, measure), ys)
    ok = [i for i in range(len(runs)) if math.isfinite(xs[i]) and math.isfinite(ys[i])]
    colored = [i for i in ok if math.isfinite(ratios[i])]
    grey = [i for i in ok if not math.isfinite(ratios[i])]
    norm = Normalize(vmin=0.0, vmax=1.0)
    points = ax.scatter([xs[i] for i in colored], [ys[i] for i in colored], c=[ratios[i] for i in colored],
                        cmap="viridis", norm=norm, s=22, edgecolors="black", linewidths=0.3)
    if grey:
        ax.scatter([xs[i] for i in grey], [ys[i] for i in grey], c="lightgrey", s=22, edgecolors="black",
                   linewidths=0.3, label="ratio unknown")
        ax.legend(loc="upper left", fontsize=7)
    if not ok:
        ax.text(0.5, 0.5, "no runs with finite values", ha="center", va="center", transform=ax.transAxes)
    axis_note = {"rescaled": " (rescaled to [0, 1])", "real": "", "log": " (log scale)"}[x_scale]
    if dropped:
        axis_note += f", {dropped} {'run' if dropped == 1 else 'runs'} <= 0 not shown"
    if x_scale == "rescaled":
        ax.set_xlim(-0.05, 1.05)
    elif x_scale == "log" and ok:
        ax.set_xscale("log")
    ax.set_xlabel(f"{title(measure)}{axis_note}" + group_label, fontsize=8)
    ax.set_ylabel(title(y), fontsize=8)
    ax.set_title(_title(measure, corr), fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(True, linewidth=0.3, alpha=0.5)
    if colorbar:
        bar = fig.colorbar(points, ax=ax)
        bar.set_label("random-label ratio", fontsize=8)
        bar.ax.tick_params(labelsize=7)


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    return atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=DPI))


def prepare_dir(out_dir: str | os.PathLike) -> Path:
    """Create ``out_dir`` if missing (its parent must exist)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NfmError("--plot needs a folder, this is a file", out_dir)
    if not out_dir.exists():
        parent = out_dir.parent if str(out_dir.parent) else Path(".")
        if not parent.is_dir():
            raise NfmError(f"parent folder {str(parent)!r} does not exist; create it first", out_dir)
        try:
            out_dir.mkdir()
        except FileExistsError:
            pass
        except OSError as exc:
            raise NfmError(f"cannot create the plot folder: {exc.strerror or exc}", out_dir) from None
    return out_dir


def scatter_plots(runs: Sequence[dict], measures: Sequence[str] = DEFAULT_MEASURES,
                  out_dir: str | os.PathLike = "plots", y: str = "gap",
                  group_by: Sequence[str] = DEFAULT_GROUP_BY, progress: ProgressFn = None,
                  x_scale: str = "rescaled") -> list[Path]:
    """Write ``<measure>.png`` per measure and ``figure1.png`` (Hessian trace | normalized sharpness,
    side by side) into ``out_dir``; with several groups, one set per group named
    ``<measure>--<model>-<dataset>.png`` / ``figure1--<model>-<dataset>.png``. Returns the paths.

    ``x_scale``: ``rescaled`` (each measure min-max rescaled to [0, 1], as in the paper), ``real``
    (the measure's own values) or ``log`` (own values on a log axis)."""
    if x_scale not in X_SCALES:
        raise NfmError(f"unknown x scale {x_scale!r}; valid: {', '.join(X_SCALES)}")
    out_dir = prepare_dir(out_dir)
    groups = group_runs(runs, group_by)
    several = len(groups) > 1
    written: list[Path] = []
    total = len(groups) * (len(measures) + 1)
    for group, members in groups:
        suffix = f"--{_slug(group)}" if several else ""
        label = ("\n" + ", ".join(f"{k}={v}" for k, v in group.items())) if several else ""
        for measure in measures:
            fig = Figure(figsize=SCATTER_INCHES, dpi=DPI, layout="constrained")
            _draw(fig, fig.add_subplot(1, 1, 1), members, measure, y, label, x_scale=x_scale)
            written.append(_save(fig, out_dir / f"{measure}{suffix}.png"))
            report(progress, "plots", len(written), total)
        fig = Figure(figsize=FIGURE1_INCHES, dpi=DPI, layout="constrained")
        left, right = fig.subplots(1, 2, sharey=True)
        _draw(fig, left, members, "hessian_trace", y, label, colorbar=False, x_scale=x_scale)
        _draw(fig, right, members, "normalized_sharpness", y, label, colorbar=True, x_scale=x_scale)
        written.append(_save(fig, out_dir / f"figure1{suffix}.png"))
        report(progress, "plots", len(written), total)
    return written
