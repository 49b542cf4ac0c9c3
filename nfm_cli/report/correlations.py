"""``nfm report``'s core: read many measures files, correlate each flatness measure with the
generalization gap, write the per-run table.

A run is one measures file flattened into a dict: every top-level number of its ``nfm.result``
(``normalized_sharpness``, ``hessian_trace``, ...), its metrics (``train_acc``, ``test_acc``, ``gap``,
``random_ratio``, ``model``, ``dataset``, ``seed``, ...) and ``path``. Missing or null numbers are NaN.

Correlations (Pearson r, Spearman rho, Kendall tau-b, with their two-sided p-values) come from
``scipy.stats`` (p-values exact by permutation for n <= ``EXACT_P_MAX_N``) and use, per measure, only
the runs where both the measure and y are finite; ``n`` says how many. A correlation that is undefined (fewer than 3
such runs, or a constant measure or y) is NaN, never an error. Ties are handled by scipy (average ranks for Spearman,
tau-b for Kendall).
"""
from __future__ import annotations

import csv
import io
import itertools
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nfm_cli.choices import REPORT_GROUP_BY as DEFAULT_GROUP_BY
from nfm_cli.data.registry import DATASET_SPECS
from nfm_cli.errors import NfmError
from nfm_cli.measures.registry import DIAGNOSTICS as DIAGNOSTIC_KEYS
from nfm_cli.measures.registry import RUN_METRICS, measure_keys, rival_keys, summary_keys
from nfm_cli.report.protocol import make_grid, protocol_scores, varying_axes
from nfm_cli.runtime.progress import ProgressFn, report
from nfm_cli.store.artifacts import atomic_write, read_metadata
from nfm_cli.store.inflight import in_flight_reason
from nfm_cli.store.train_config import AXIS_FIELDS, GROUP_FIELDS

DEFAULT_MEASURES = summary_keys()     # the measures correlated by default

# Names come from the measure registry (one place for each measure; see measure_registry.py).
MEASURES = measure_keys()                    # flatness / norm measures, in table and CSV column order
DIAGNOSTICS = tuple(DIAGNOSTIC_KEYS)           # other top-level numbers of a result, not measures
METRIC_NUMBERS = tuple(RUN_METRICS)
# "estimator": the one that made the Hessian diagonals (exact, ggn, hutchinson...): runs of Hessian and
# Gauss-Newton curvature are grouped apart whenever files differ (``group_runs``)
METRIC_LABELS = GROUP_FIELDS
CSV_COLUMNS = MEASURES + DIAGNOSTICS + METRIC_NUMBERS + METRIC_LABELS + ("path",)

EXACT_P_MAX_N = 8  # up to this many runs, p-values are exact permutation p-values (8! orderings)
STATS = ("pearson_r", "pearson_p", "spearman_rho", "spearman_p", "kendall_tau", "kendall_p")


def _value(value: Any) -> Any:
    """An int stays an int (batch_size 128, not 128.0), any other number becomes a float, the rest NaN."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return _number(value)


def _number(value: Any) -> float:
    """A float, NaN for null/absent/non-numeric (bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def valid_columns(runs: Sequence[dict] = ()) -> list[str]:
    """The numeric names ``--x``/``--y`` accept: the known measures, diagnostics and metrics, plus
    any other number found in the given runs (a measure added by a later nfm)."""
    known = list(MEASURES) + [c for c in DIAGNOSTICS if c != "converged"] + list(METRIC_NUMBERS)
    extra = sorted({k for run in runs for k, v in run.items()
                    if k not in known and k not in METRIC_LABELS and k not in ("path", "converged")
                    and isinstance(v, (int, float)) and not isinstance(v, bool)})
    return known + extra


def default_measures(runs: Sequence[dict]) -> list[str]:
    """What ``report`` correlates when no ``--x`` is given: the registry's summary measures, and the
    rivals of ``measure --rivals`` wherever a file holds them; never diagnostics, nor the variants left out
    of the summary (the weights-only trace, the log of the spectral product)."""
    held = [k for k in rival_keys() if any(math.isfinite(_number(run.get(k))) for run in runs)]
    return [*DEFAULT_MEASURES, *held]


def check_names(measures: Iterable[str], y: str = "gap", runs: Sequence[dict] = ()) -> list[str]:
    """Normalize (``-`` -> ``_``) and validate measure names and y; NfmError lists the valid ones."""
    valid = valid_columns(runs)
    names = [m.strip().replace("-", "_") for m in measures if m.strip()]
    unknown = [m for m in names + [y.replace("-", "_")] if m not in valid]
    if unknown:
        raise NfmError(f"unknown measure {unknown[0]!r}; valid names: {', '.join(valid)}")
    if not names:
        raise NfmError(f"no measure given; valid names: {', '.join(valid)}")
    return list(dict.fromkeys(names))


def load_run(path: str | os.PathLike, y: str = "gap") -> dict[str, Any]:
    """One measures file as a flat run dict; NfmError (naming the file) if unusable, including the
    temp and lock files of writes in flight (``inflight``)."""
    reason = in_flight_reason(path)
    if reason is not None:
        raise NfmError(reason, path)
    art = read_metadata(path, "measures")  # the tensors (sigmas) are not needed: header only
    result = art.meta.get("result")
    if not isinstance(result, dict):
        raise NfmError("measures file has no nfm.result entry (incomplete or made by an old nfm)", path)
    metrics = result.get("metrics")
    if not isinstance(metrics, dict):
        raise NfmError("measures file has no metrics (train/test accuracy); remeasure it from its checkpoint",
                       path)
    if y not in metrics and y not in result:
        raise NfmError(f"measures file has no {y!r} value", path)
    run: dict[str, Any] = {}
    for key, value in result.items():
        if key in ("layers", "metrics"):
            continue
        if key == "converged":
            run[key] = value if isinstance(value, bool) else None
        elif value is None or isinstance(value, (int, float)):
            run[key] = _value(value)
    for key in MEASURES:  # absent (e.g. fisher_rao_norm from solve-variance) -> NaN
        run.setdefault(key, math.nan)
    for key, value in metrics.items():
        if key in METRIC_LABELS:
            run[key] = value if isinstance(value, (str, int)) and not isinstance(value, bool) else None
        elif value is None or isinstance(value, (int, float)):
            run[key] = _value(value)
    for key in METRIC_NUMBERS:
        run.setdefault(key, math.nan)
    for key in METRIC_LABELS:
        run.setdefault(key, None)
    if not math.isfinite(_number(run.get(y))):
        raise NfmError(f"measures file has a non-finite {y!r} ({metrics.get(y, result.get(y))!r}; a diverged run?)",
                       path)
    run["estimator"] = result.get("estimator") or (art.meta.get("config") or {}).get("estimator")
    run["path"] = str(path)
    return run


def load_runs(paths: Sequence[str | os.PathLike], y: str = "gap",
              progress: ProgressFn = None) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Read every measures file; returns (runs, skipped) with skipped = [(path, reason), ...].

    Directories, missing, truncated, other-kind and incomplete files (no metrics, no or non-finite y)
    are skipped with their reason; a path given twice is counted once. Raises NfmError only when
    no usable file remains.
    """
    runs: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i, path in enumerate(paths):
        key = os.path.realpath(path)
        if key in seen:
            skipped.append((str(path), "given twice; counted once"))
        else:
            seen.add(key)
            try:
                runs.append(load_run(path, y))
            except NfmError as err:
                skipped.append((str(path), err.message))
        report(progress, "read", i + 1, len(paths))
    if not runs:
        first = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise NfmError(f"no usable measures files among {len(paths)} given{first}")
    return runs, skipped


def drop_unconverged(runs: Sequence[dict], max_train_loss: float) -> tuple[list[dict], list[tuple[str, str]]]:
    """Jiang et al. 2020 compare only models trained to one stopping criterion (training cross-entropy
    0.01) and leave out those that never reached it: returns (kept, dropped) with dropped = [(path,
    reason), ...] for the runs whose final training loss is above ``max_train_loss`` or unknown."""
    if not max_train_loss > 0:
        raise NfmError(f"the largest training loss must be a positive number, not {max_train_loss}")
    kept: list[dict] = []
    dropped: list[tuple[str, str]] = []
    for run in runs:
        loss = _number(run.get("train_loss"))
        if loss <= max_train_loss:
            kept.append(run)
        else:
            dropped.append((run["path"], f"final training loss {loss:.3g} is above {max_train_loss:g}: the run "
                                         "did not reach the stopping criterion"))
    if not kept:
        raise NfmError(f"none of the {len(runs)} runs has a final training loss of at most {max_train_loss:g}")
    return kept, dropped


def column(runs: Sequence[dict], name: str) -> np.ndarray:
    """The float64 values of ``name`` over ``runs`` (NaN where missing)."""
    return np.array([_number(run.get(name)) for run in runs], dtype=np.float64)


def correlations(x: Sequence[float], y: Sequence[float]) -> dict[str, Any]:
    """Pearson, Spearman and Kendall (tau-b) between x and y over the pairs where both are finite.

    Returns ``n`` (pairs used), the statistics and p-values (NaN when undefined: n < 3 or a
    constant side), and the ``min``/``max`` of x over those pairs (what min-max rescaling uses).
    """
    from scipy import stats  # here, not at import: it is slow to import and only the numbers need it

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    out: dict[str, Any] = {"n": int(ok.sum())}
    out.update({k: math.nan for k in STATS})
    out["min"] = float(x.min()) if x.size else math.nan
    out["max"] = float(x.max()) if x.size else math.nan
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out
    # Pearson is scale invariant: divide by max |.| first so huge values (spectral products) cannot overflow
    xs, ys = x / np.abs(x).max(), y / np.abs(y).max()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's near-constant/ties warnings: the NaN says it
        for (r_key, p_key), fn, args in (
                (("pearson_r", "pearson_p"), stats.pearsonr, (xs, ys)),
                (("spearman_rho", "spearman_p"), stats.spearmanr, (x, y)),
                (("kendall_tau", "kendall_p"), stats.kendalltau, (x, y))):
            try:
                res = fn(*args)
                out[r_key], out[p_key] = float(res[0]), float(res[1])
            except (ValueError, FloatingPointError):
                pass
    if x.size <= EXACT_P_MAX_N:
        out.update(exact_p_values(x, y))
    return out


def exact_p_values(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Two-sided permutation p-values of Pearson, Spearman and Kendall over all n! orderings of y.

    For small n scipy's p-values rest on large-sample approximations (a perfect Spearman rho at
    n = 3 gets p = 0); the exact null distribution is the statistic over every permutation, each
    equally likely under independence: p = share of permutations with |stat| >= |observed|
    (at n = 3, a perfect rank correlation has p = 2/6)."""
    from scipy import stats  # here, not at import: slow to import

    n = len(x)
    perms = np.array(list(itertools.permutations(range(n))))
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    i, j = np.triu_indices(n, 1)
    sign_x = np.sign(x[i] - x[j])

    def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # b: (perms, n); the norms do not change
        return (b - b.mean(axis=-1, keepdims=True)) @ (a - a.mean())

    def kendall(b: np.ndarray) -> np.ndarray:               # numerator of tau-b; the denominator is fixed
        return np.sign(b[..., i] - b[..., j]) @ sign_x

    result = {}
    for key, observed, permuted in (("pearson_p", pearson(x, y[None])[0], pearson(x, y[perms])),
                                    ("spearman_p", pearson(rx, ry[None])[0], pearson(rx, ry[perms])),
                                    ("kendall_p", kendall(y[None])[0], kendall(y[perms]))):
        scale = max(abs(observed), float(np.abs(permuted).max()), 1e-300)
        result[key] = float(np.mean(np.abs(permuted) >= abs(observed) - 1e-12 * scale))
    return result


def _label(value: Any) -> str:
    return "?" if value is None else str(value)


def check_group_by(group_by: Sequence[str]) -> None:
    """Refuse an unknown --group-by field before any file is read."""
    bad = [g for g in group_by if g not in METRIC_LABELS]
    if bad:
        raise NfmError(f"cannot group by {bad[0]!r}; choose from {', '.join(METRIC_LABELS)} (or none)")


def check_outputs(plot_dir: str | os.PathLike | None, csv_path: str | os.PathLike | None) -> None:
    """--plot must be a folder or creatable, --csv a file in an existing folder: checked before reading."""
    if plot_dir is not None:
        plot_dir = Path(plot_dir)
        parent = plot_dir.parent if str(plot_dir.parent) else Path(".")
        if plot_dir.exists() and not plot_dir.is_dir():
            raise NfmError("--plot needs a folder, this is a file", plot_dir)
        if not plot_dir.exists() and not parent.is_dir():
            raise NfmError(f"--plot: parent folder {str(parent)!r} does not exist; create it first", plot_dir)
    if csv_path is not None:
        csv_path = Path(csv_path)
        folder = csv_path.parent if str(csv_path.parent) else Path(".")
        if csv_path.is_dir():
            raise NfmError("--csv is a directory; give a file name such as runs.csv", csv_path)
        if not folder.is_dir():
            raise NfmError(f"--csv: folder {str(folder)!r} does not exist; create it first", csv_path)


def group_runs(runs: Sequence[dict], group_by: Sequence[str] = DEFAULT_GROUP_BY) -> list[tuple[dict, list[dict]]]:
    """Split runs by the values of ``group_by`` (in first-seen order); () -> one group of all runs.
    Runs made with different estimators (Hessian and Gauss-Newton numbers) are always split by
    ``estimator`` as well, never mixed."""
    check_group_by(group_by)
    if "estimator" not in group_by and len({run.get("estimator") for run in runs}) > 1:
        group_by = (*group_by, "estimator")
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault(tuple(_label(run.get(g)) for g in group_by), []).append(run)
    return [(dict(zip(group_by, key, strict=True)), members) for key, members in groups.items()]


def correlation_table(runs: Sequence[dict], measures: Sequence[str] = DEFAULT_MEASURES, y: str = "gap",
                      group_by: Sequence[str] = DEFAULT_GROUP_BY) -> list[dict[str, Any]]:
    """Per group: ``{"group": {"model": ..., "dataset": ...}, "n_runs": int,
    "correlations": {measure: {"n", "pearson_r", "pearson_p", "spearman_rho", "spearman_p",
    "kendall_tau", "kendall_p", "min", "max"}}}``."""
    measures = check_names(measures, y, runs)
    table = []
    for group, members in group_runs(runs, group_by):
        ys = column(members, y)
        table.append({"group": group, "n_runs": len(members),
                      "correlations": {m: correlations(column(members, m), ys) for m in measures}})
    return table


def minmax_rescale(values: Sequence[float]) -> np.ndarray:
    """Rescale to [0, 1] by the min and max of the finite values, as the paper's scatter plots do.

    Non-finite values stay NaN. When every finite value is the same (or there is only one), they all
    map to 0.5 (the middle of the axis: "no spread", not "the smallest").
    """
    v = np.asarray(values, dtype=np.float64).copy()
    ok = np.isfinite(v)
    v[~ok] = np.nan
    if not ok.any():
        return v
    lo, hi = float(v[ok].min()), float(v[ok].max())
    if hi == lo:
        v[ok] = 0.5
        return v
    if not math.isfinite(hi - lo):  # the range overflows float64 (e.g. -1e308..1e308): halve first
        v, lo, hi = v / 2, lo / 2, hi / 2
    v[ok] = (v[ok] - lo) / (hi - lo)
    return v


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return repr(value)
    return str(value)


def csv_columns(runs: Sequence[dict]) -> list[str]:
    """The CSV header: the known columns, then any other key the runs carry (sorted), ``path`` last."""
    extra = sorted({k for run in runs for k in run} - set(CSV_COLUMNS))
    return list(CSV_COLUMNS[:-1]) + extra + ["path"]


def write_csv(runs: Sequence[dict], path: str | os.PathLike) -> Path:
    """One row per run; NaN/null cells are empty, floats written exactly (repr). Atomic."""
    columns = csv_columns(runs)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    for run in runs:
        writer.writerow([_csv_cell(run.get(c)) for c in columns])
    data = text.getvalue().encode("utf-8")
    return atomic_write(path, lambda handle: handle.write(data))


# ``--protocol``: the training-config fields that can be hyperparameter axes (those that vary within a
# group are), and the test split sizes that the Hoeffding weights need when --test-size was not given.
PROTOCOL_AXES = AXIS_FIELDS
TEST_SPLIT_SIZES = {name: spec.test_size for name, spec in DATASET_SPECS.items()}


def _test_samples(run: dict) -> float:
    size = _number(run.get("test_size"))
    return size if math.isfinite(size) and size > 0 else float(TEST_SPLIT_SIZES.get(run.get("dataset"), math.nan))


def add_protocol(table: list[dict[str, Any]], runs: Sequence[dict], measures: Sequence[str], y: str = "gap",
                 group_by: Sequence[str] = DEFAULT_GROUP_BY, bootstrap: int = 200, seed: int = 0,
                 progress: ProgressFn = None) -> list[dict[str, Any]]:
    """Adds ``axes`` and ``protocol: {measure: protocol.protocol_scores(...)}`` to every group of
    ``correlation_table``'s result (same grouping, same order)."""
    groups = group_runs(runs, group_by)
    for index, (entry, (_, members)) in enumerate(zip(table, groups, strict=True)):
        axes = varying_axes(members, PROTOCOL_AXES)
        rows = [dict(run, test_samples=_test_samples(run)) for run in members]
        entry["axes"] = axes
        entry["protocol"] = {m: protocol_scores(make_grid(rows, m, y, axes), bootstrap=bootstrap, seed=seed)
                             for m in measures}
        report(progress, "protocol", index + 1, len(table))
    return table
