"""The measures nfm reports, in one place: key, title, what it is, which loss, direction, source and cost.

Everything that names a measure is driven by ``MEASURES``: the ``nfm measure`` totals table
(``summary_keys``), ``nfm report``'s known and default measures, the CSV columns, the plot titles,
and README's measure table (``readme_table``; a test checks README against it). A new measure is
one entry here plus the code that computes it (``measures.py`` for the Hessian- and weight-based
ones, ``fisher_rao.py`` for per-sample gradients); ``tests/measures/test_registry.py`` fails until
both exist.

``python scripts/measure_table.py`` prints README's table (the core itself never prints).
"""
from __future__ import annotations

from dataclasses import dataclass

# where a measure comes from (and so what it costs)
SOURCES = {
    "solve": "the normalized-ce Hessian diagonal and a per-layer solve of (17)",
    "hessian": "a Hessian diagonal (one pass over the training set per diagonal)",
    "gradients": "per-sample gradients (one pass over the training set)",
    "weights": "the weights alone (no data)",
    "rivals": "perturbed forward/backward passes over the training set (only with `measure --rivals`)",
}


@dataclass(frozen=True)
class MeasureSpec:
    """One flatness or norm measure of a trained network (a top-level number of a measures file)."""

    key: str            # the JSON / CSV / ``--x`` name
    title: str          # tables and plots
    description: str    # README's "what" (markdown)
    loss: str | None    # the loss whose Hessian/gradients it uses; None: weights only
    direction: int      # sign of the correlation with the gap the measure predicts (+1: larger = worse)
    source: str         # a key of SOURCES
    summary: bool = True  # in the ``measure`` totals table and ``report``'s default measures

    @property
    def cost(self) -> str:
        """What computing it takes, in words."""
        return SOURCES[self.source]


def _spec(key: str, title: str, description: str, loss: str | None, source: str, summary: bool = True,
          direction: int = +1) -> MeasureSpec:
    return MeasureSpec(key, title, description, loss, direction, source, summary)


MEASURES: dict[str, MeasureSpec] = {m.key: m for m in (
    _spec("normalized_sharpness", "normalized sharpness",
          "sum over weight matrices of the minimum of (17); h = normalized-ce Hessian diagonal clipped at 0 "
          "(Algorithm 1); conv: h and W^2 summed over kernel positions (Sec. 5.3)",
          "normalized-ce", "solve"),
    _spec("matrix_normalized_sharpness", "matrix-normalized sharpness",
          "(13) with the same lambda convention: 2 sqrt(\\|W\\|_F^2 H) per matrix (the paper drops the "
          "constant 2), so each layer's normalized value is at most its matrix-normalized one",
          "normalized-ce", "hessian"),
    _spec("hessian_trace", "trace of the Hessian",
          "(5): sum of the raw `ce` Hessian diagonal over all parameters", "ce", "hessian"),
    _spec("hessian_trace_weights", "trace of the Hessian (weight matrices)",
          "(5) over weight matrices only", "ce", "hessian", summary=False),
    _spec("fisher_rao_norm", "Fisher-Rao norm", "(25) over all parameters with the `ce` loss", "ce", "gradients"),
    _spec("frobenius_norm_sq", "squared Frobenius norm",
          "sum of the squared Frobenius norms of the weight matrices", None, "weights"),
    _spec("spectral_norm_product", "product of spectral norms",
          "product of the spectral norms of the weight matrices (conv reshaped to out x in*kh*kw)",
          None, "weights"),
    _spec("log_spectral_norm_product", "log product of spectral norms",
          "natural log of `spectral_norm_product` (finite where the product overflows float64)", None, "weights",
          summary=False),
    # the rivals of nfm_cli/measures/rivals.py (README: "Rival measures from the literature"); larger = sharper
    _spec("pacbayes_flatness", "PAC-Bayes flatness 1/sigma^2",
          "1/sigma^2 for the largest sigma with \\|E_u acc(w+u) - acc(w)\\| <= 0.1, u ~ N(0, sigma^2 I) "
          "(Jiang et al. 2020, eq. 53 and App. C)", "accuracy", "rivals", summary=False),
    _spec("pacbayes_mag_flatness", "magnitude-aware PAC-Bayes flatness 1/sigma'^2",
          "the same with magnitude-aware noise of variance sigma^2 w_i^2 + eps^2 (Jiang et al. 2020, eq. 61)",
          "accuracy", "rivals", summary=False),
    _spec("sharpness_worst", "worst-case sharpness 1/alpha^2",
          "1/alpha^2 for the largest alpha with max over \\|u_i\\| <= alpha of \\|acc(w+u) - acc(w)\\| <= 0.1 "
          "(Jiang et al. 2020, eq. 50)", "accuracy", "rivals", summary=False),
    _spec("sharpness_mag_worst", "magnitude-aware worst-case sharpness 1/alpha'^2",
          "the same over the box \\|u_i\\| <= alpha \\|w_i\\| + eps (Jiang et al. 2020, eq. 58)",
          "accuracy", "rivals", summary=False),
    _spec("adaptive_sharpness", "adaptive sharpness (rho = 0.5)",
          "max over \\|\\|u / \\|w\\|\\|\\|_2 <= rho of L(w+u) - L(w), rho = 0.5 (Kwon et al. 2021; "
          "Andriushchenko et al. 2023)", "ce", "rivals", summary=False),
)}

# Other top-level numbers of a measures file: diagnostics, not measures.
DIAGNOSTICS: dict[str, str] = {
    "clipped_fraction": "share of the diagonal's absolute mass over weight matrices that was negative and "
                        "clipped",
    "weight_matrices": "number of weight matrices (Linear and Conv layers)",
    "params_in_matrices": "parameters in weight matrices",
    "params_left_out": "parameters outside weight matrices (biases, normalization: footnote 5)",
    "converged": "every layer's solve reached `--tol`",
}
# Shown under the measures in ``nfm measure``'s totals table.
SUMMARY_DIAGNOSTICS = ("clipped_fraction",)

# The run's metrics copied from its checkpoint into every measures file (``result.metrics``).
RUN_METRICS: dict[str, str] = {
    "train_acc": "training accuracy (on the labels trained on)",
    "test_acc": "test accuracy",
    "gap": "generalization gap (train acc - test acc)",
    "train_loss": "training loss",
    "test_loss": "test loss",
    "random_ratio": "random-label ratio",
}


def measure_keys() -> tuple[str, ...]:
    """Every measure, in table order."""
    return tuple(MEASURES)


def summary_keys() -> tuple[str, ...]:
    """The measures shown by default (``measure``'s totals, ``report``'s correlations)."""
    return tuple(k for k, m in MEASURES.items() if m.summary)


def rival_keys() -> tuple[str, ...]:
    """The rival measures of ``nfm measure --rivals`` (shown in the totals only when computed)."""
    return tuple(k for k, m in MEASURES.items() if m.source == "rivals")


def title(key: str) -> str:
    """A measure's or metric's title for tables and plots; the key itself for anything else."""
    if key in MEASURES:
        return MEASURES[key].title
    return RUN_METRICS.get(key, key)


def readme_table() -> str:
    """README's measure table (markdown), one row per measure, then the diagnostics."""
    rows = ["| key | what | loss | from |", "|---|---|---|---|"]
    for m in MEASURES.values():
        rows.append(f"| `{m.key}` | {m.description} | {f'`{m.loss}`' if m.loss else '-'} | {m.source} |")
    for key, what in DIAGNOSTICS.items():
        rows.append(f"| `{key}` | {what} (diagnostic) | - | - |")
    rows.append("")
    rows.append("From: " + "; ".join(f"`{key}`, {what}" for key, what in SOURCES.items()) + ".")
    return "\n".join(rows) + "\n"

