"""nfm_cli.report.protocol against direct, slow implementations of each definition on a hand-made table."""
import itertools
import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from nfm_cli.errors import NfmError
from nfm_cli.report.protocol import make_grid, protocol_scores, varying_axes
from nfm_cli.store.artifacts import write_artifact

# A hand-made 2 (lr) x 3 (width) grid, 2 seeds, one run missing, ties in the measure and the gap.
ROWS = [  # lr, width, seed, measure, gap
    (1e-3, 8, 0, 1.0, 0.10), (1e-3, 16, 0, 2.0, 0.25), (1e-3, 32, 0, 2.0, 0.12),
    (1e-2, 8, 0, 0.5, 0.02), (1e-2, 16, 0, 3.0, 0.30), (1e-2, 32, 0, 1.5, 0.12),
    (1e-3, 8, 1, 1.2, 0.15), (1e-3, 16, 1, 1.8, 0.22), (1e-3, 32, 1, 2.5, 0.40),
    (1e-2, 8, 1, 0.7, 0.05), (1e-2, 16, 1, 2.9, 0.02),
]
N_TEST = 500


def runs(rows=ROWS, **extra):
    return [dict(lr=lr, width=w, seed=s, m=m, gap=g, model="mlp", test_samples=N_TEST, **extra)
            for lr, w, s, m, g in rows]


def sgn(x):
    return (x > 0) - (x < 0)


# ---- direct references, one loop per definition -------------------------------------------------

def ref_tau(table):
    """Jiang eq. 4: mean over ordered pairs of distinct entries of sgn * sgn."""
    pairs = [(a, b) for a, b in itertools.permutations(range(len(table)), 2)]
    if not pairs:
        return math.nan
    return sum(sgn(table[a]["m"] - table[b]["m"]) * sgn(table[a]["gap"] - table[b]["gap"])
               for a, b in pairs) / len(pairs)


def ref_psi(table, axis, axes):
    """Jiang eq. 5: loop over every combination of the other axes' values (and the seed)."""
    others = [a for a in axes if a != axis] + ["seed"]
    values = [sorted({r[a] for r in table}, key=repr) for a in others]
    taus = []
    for combo in itertools.product(*values):
        cell = [r for r in table if all(r[a] == v for a, v in zip(others, combo, strict=True))]
        if len(cell) >= 2:
            taus.append(ref_tau(cell))
    return sum(taus) / len(taus) if taus else math.nan


def entropy(counter):
    total = sum(counter.values())
    return -sum(c / total * math.log(c / total) for c in counter.values() if c > 0)


def ref_cmi(table, axes):
    """K = min over |S| <= 2 of I(V_m; V_g | U_S) / H(V_g | U_S), with I = H(V_g|U) - H(V_g|V_m,U)."""
    pairs = list(itertools.permutations(range(len(table)), 2))
    best = math.inf
    for size in range(3):
        for subset in itertools.combinations(axes, size):
            by_u = {}
            for a, b in pairs:
                u = tuple((table[a][x], table[b][x]) for x in subset)
                vm = sgn(table[a]["m"] - table[b]["m"])
                vg = sgn(table[a]["gap"] - table[b]["gap"])
                by_u.setdefault(u, []).append((vm, vg))
            h_g = h_g_given_m = 0.0
            for items in by_u.values():
                p_u = len(items) / len(pairs)
                h_g += p_u * entropy({v: sum(1 for _, g in items if g == v) for v in (-1, 0, 1)})
                for vm in (-1, 0, 1):
                    sub = [g for m, g in items if m == vm]
                    if sub:
                        h_g_given_m += len(sub) / len(pairs) * entropy({v: sub.count(v) for v in (-1, 0, 1)})
            if h_g > 1e-12:
                best = min(best, (h_g - h_g_given_m) / h_g)
    return best


def ref_rse(table, axes, n_test=N_TEST):
    """Dziugaite et al.: environments = config pairs differing in one axis, Hoeffding-weighted sign error."""
    configs = sorted({tuple(r[a] for a in axes) for r in table}, key=repr)
    losses = []
    for c1, c2 in itertools.combinations(configs, 2):
        if sum(x != y for x, y in zip(c1, c2, strict=True)) != 1:
            continue
        num = den = 0.0
        for ra in [r for r in table if tuple(r[a] for a in axes) == c1]:
            for rb in [r for r in table if tuple(r[a] for a in axes) == c2]:
                if ra.get("copy_of") is not None and ra.get("copy_of") == rb.get("copy_of"):
                    continue
                d = abs(ra["gap"] - rb["gap"])
                w = max(0.0, 1 - 2 * math.exp(-2 * n_test * (d / 2) ** 2)) ** 2 if n_test else 1.5
                w = max(w - 0.5, 0.0)
                num += w * (1 - sgn(ra["m"] - rb["m"]) * sgn(ra["gap"] - rb["gap"])) / 2
                den += w
        if den > 0:
            losses.append(num / den)
    if not losses:
        return math.nan, math.nan
    losses.sort()
    pos = 0.9 * (len(losses) - 1)  # the linear-interpolation percentile, by hand
    lo = int(math.floor(pos))
    p90 = losses[lo] + (pos - lo) * (losses[min(lo + 1, len(losses) - 1)] - losses[lo])
    return max(losses), p90


# ---- the tests -------------------------------------------------------------------------------------

def test_axes_are_the_varying_config_fields_without_the_seed():
    assert varying_axes(runs(), ["model", "lr", "width", "seed", "batch_size"]) == ["lr", "width"]
    with_nan = runs() + [dict(lr=1e-3, width=8, seed=2, m=1.0, gap=0.1, stop_at_loss=math.nan)]
    assert "stop_at_loss" not in varying_axes(with_nan, ["stop_at_loss"])  # NaN and absent are both "unset"


def test_hand_computed_three_runs():
    table = [dict(lr=1, seed=0, m=1.0, gap=0.1), dict(lr=2, seed=0, m=2.0, gap=0.3), dict(lr=3, seed=0, m=3.0, gap=0.2)]
    scores = protocol_scores(make_grid(table, "m", "gap", ["lr"], None), bootstrap=0)
    # pairs (1,2) +, (1,3) +, (2,3) -: tau = 1/3; one cell holds all three: psi_lr = 1/3
    assert scores["kendall_tau"] == pytest.approx(1 / 3)
    assert scores["granulated_kendall"] == {"lr": pytest.approx(1 / 3)}
    # without test sizes every pair weighs 1 (shifted: 1/2); environments are the 3 config pairs,
    # with sign errors 0, 0, 1
    assert scores["robust_sign_error_max"] == 1.0
    assert scores["robust_sign_error_p90"] == pytest.approx(0.8)
    assert scores["ci95"] is None and scores["n_seeds"] == 1


def test_tau_matches_scipy_without_ties():
    rng = np.random.default_rng(3)
    table = [dict(lr=k % 3, seed=0, m=float(a), gap=float(b)) for k, (a, b) in enumerate(rng.normal(size=(9, 2)))]
    got = protocol_scores(make_grid(table, "m", "gap", ["lr"], None), bootstrap=0)["kendall_tau"]
    assert got == pytest.approx(stats.kendalltau([r["m"] for r in table], [r["gap"] for r in table])[0])


def test_every_score_matches_the_direct_implementation():
    table = runs()
    axes = varying_axes(table, ["lr", "width"])
    scores = protocol_scores(make_grid(table, "m", "gap", axes), bootstrap=0)
    assert scores["kendall_tau"] == pytest.approx(ref_tau(table))
    for axis in axes:
        assert scores["granulated_kendall"][axis] == pytest.approx(ref_psi(table, axis, axes)), axis
    assert scores["granulated_kendall_mean"] == pytest.approx(np.mean([ref_psi(table, a, axes) for a in axes]))
    assert scores["cmi_score"] == pytest.approx(ref_cmi(table, axes))
    rse_max, rse_p90 = ref_rse(table, axes)
    assert scores["robust_sign_error_max"] == pytest.approx(rse_max)
    assert scores["robust_sign_error_p90"] == pytest.approx(rse_p90)
    assert 0 < scores["cmi_score"] < 1 and scores["environments"] > 3


def test_runs_without_the_measure_are_left_out():
    table = runs() + [dict(lr=1e-2, width=32, seed=1, m=math.nan, gap=0.3, test_samples=N_TEST)]
    grid = make_grid(table, "m", "gap", ["lr", "width"])
    assert len(grid.mu) == len(ROWS)


def test_bootstrap_intervals_match_resampled_tables():
    """Each replicate: the table with the runs of a seed drawn k times repeated k times, copies as seeds
    of their own; the interval is the 2.5/97.5 percentiles, checked against the references."""
    table = runs()
    axes = ["lr", "width"]
    reps = 25
    scores = protocol_scores(make_grid(table, "m", "gap", axes), bootstrap=reps, seed=7)
    rng = np.random.default_rng(7)
    ref = {"kendall_tau": [], "cmi_score": [], "robust_sign_error_max": [], "lr": []}
    for _ in range(reps):
        counts = rng.multinomial(2, [0.5, 0.5])
        big = [dict(r, seed=(r["seed"], k), copy_of=i) for i, r in enumerate(table) for k in range(counts[r["seed"]])]
        pairs_ok = [(a, b) for a, b in itertools.permutations(range(len(big)), 2)
                    if big[a]["copy_of"] != big[b]["copy_of"]]
        ref["kendall_tau"].append(sum(sgn(big[a]["m"] - big[b]["m"]) * sgn(big[a]["gap"] - big[b]["gap"])
                                      for a, b in pairs_ok) / len(pairs_ok))
        ref["lr"].append(ref_psi(big, "lr", axes))
        ref["robust_sign_error_max"].append(ref_rse(big, axes)[0])
        ref["cmi_score"].append(_cmi_without_self_pairs(big, axes))
    ci = scores["ci95"]
    for key in ("kendall_tau", "cmi_score", "robust_sign_error_max"):
        assert ci[key] == pytest.approx(list(np.percentile(ref[key], [2.5, 97.5]))), key
    assert ci["granulated_kendall"]["lr"] == pytest.approx(list(np.percentile(ref["lr"], [2.5, 97.5])))


def _cmi_without_self_pairs(big, axes):
    """ref_cmi on a table with copies: the pairs of a run with its own copy are not pairs."""
    groups = {}
    for r in big:
        groups.setdefault(r["copy_of"], []).append(r)
    pairs = [(a, b) for a, b in itertools.permutations(range(len(big)), 2) if big[a]["copy_of"] != big[b]["copy_of"]]
    best = math.inf
    for size in range(3):
        for subset in itertools.combinations(axes, size):
            by_u = {}
            for a, b in pairs:
                u = tuple((big[a][x], big[b][x]) for x in subset)
                by_u.setdefault(u, []).append((sgn(big[a]["m"] - big[b]["m"]), sgn(big[a]["gap"] - big[b]["gap"])))
            h_g = h_gm = 0.0
            for items in by_u.values():
                h_g += len(items) / len(pairs) * entropy({v: sum(1 for _, g in items if g == v) for v in (-1, 0, 1)})
                for vm in (-1, 0, 1):
                    sub = [g for m, g in items if m == vm]
                    if sub:
                        h_gm += len(sub) / len(pairs) * entropy({v: sub.count(v) for v in (-1, 0, 1)})
            if h_g > 1e-12:
                best = min(best, (h_g - h_gm) / h_g)
    return best


def test_a_perfect_measure_scores_perfectly():
    table = [dict(r, m=r["gap"] * 10) for r in runs()]
    scores = protocol_scores(make_grid(table, "m", "gap", ["lr", "width"]), bootstrap=0)
    assert scores["kendall_tau"] == pytest.approx(ref_tau(table))
    assert scores["cmi_score"] == pytest.approx(1.0)
    assert scores["robust_sign_error_max"] == 0.0


def test_negative_bootstrap_is_refused():
    with pytest.raises(NfmError, match="bootstrap"):
        protocol_scores(make_grid(runs(), "m", "gap", ["lr"]), bootstrap=-1)


# ---- nfm report --protocol: measures files -> grid -> scores, against the references above ----


def write_grid(folder, rows=ROWS, test_size=500):
    paths = []
    for i, (lr, width, seed, m, gap) in enumerate(rows):
        result = {"normalized_sharpness": m, "hessian_trace": 1.0 + i, "converged": True, "layers": {},
                  "metrics": {"train_acc": 1.0, "test_acc": 1.0 - gap, "gap": gap, "random_ratio": 0.0,
                              "model": "mlp", "dataset": "synthetic", "seed": seed, "train_size": 256,
                              "test_size": test_size, "epochs": 3, "lr": lr, "width": width, "depth": None,
                              "batch_size": 32, "optimizer": "adam", "momentum": 0.0, "weight_decay": 0.0,
                              "stop_at_loss": None}}
        path = folder / f"run{i}.measures.safetensors"
        write_artifact(path, {"sigma_row.w": torch.ones(2)}, "measures", {"result": result})
        paths.append(path)
    return paths


def test_protocol_json_matches_the_direct_references(cli, tmp_path):
    paths = write_grid(tmp_path)
    res = cli("report", *paths, "--json", "--protocol", "--bootstrap", "20", "--x", "normalized_sharpness")
    assert res.code == 0, res.err
    group = json.loads(res.out)["groups"][0]
    assert group["axes"] == ["width", "lr"]  # seed excluded; optimizer, batch size ... do not vary
    p = group["protocol"]["normalized_sharpness"]
    table = [dict(lr=lr, width=w, seed=s, m=m, gap=g) for lr, w, s, m, g in ROWS]
    axes = ["lr", "width"]
    assert p["kendall_tau"] == pytest.approx(ref_tau(table))
    assert p["granulated_kendall"] == {a: pytest.approx(ref_psi(table, a, axes)) for a in axes}
    assert p["granulated_kendall_mean"] == pytest.approx((ref_psi(table, "lr", axes) + ref_psi(table, "width",
                                                                                               axes)) / 2)
    assert p["cmi_score"] == pytest.approx(ref_cmi(table, axes))
    rse_max, rse_p90 = ref_rse(table, axes, n_test=500)  # the test size recorded in the files
    assert (p["robust_sign_error_max"], p["robust_sign_error_p90"]) == (pytest.approx(rse_max), pytest.approx(rse_p90))
    assert p["n_runs"] == len(ROWS) and p["n_seeds"] == 2
    for key in ("kendall_tau", "granulated_kendall_mean", "cmi_score", "robust_sign_error_max",
                "robust_sign_error_p90"):
        lo, hi = p["ci95"][key]
        assert lo <= hi
    assert set(p["ci95"]["granulated_kendall"]) == {"width", "lr"}


def test_protocol_without_test_size_uses_the_full_split(cli, tmp_path):
    paths = write_grid(tmp_path, test_size=None)
    p = json.loads(cli("report", *paths, "--json", "--protocol", "--bootstrap", "0", "--x",
                       "normalized_sharpness").out)["groups"][0]["protocol"]["normalized_sharpness"]
    table = [dict(lr=lr, width=w, seed=s, m=m, gap=g) for lr, w, s, m, g in ROWS]
    assert p["robust_sign_error_max"] == pytest.approx(ref_rse(table, ["lr", "width"], n_test=512)[0])  # synthetic
    assert p["ci95"] is None


def test_protocol_table_is_printed(cli, tmp_path):
    paths = write_grid(tmp_path)
    res = cli("report", *paths, "--protocol", "--bootstrap", "5", "--x", "normalized_sharpness,hessian_trace")
    assert res.code == 0, res.err
    assert "protocol scores over axes width, lr" in res.out and "RSE p90" in res.out
    assert "hessian_trace" in res.out


def test_protocol_needs_no_flag_to_stay_off(cli, tmp_path):
    paths = write_grid(tmp_path)
    group = json.loads(cli("report", *paths, "--json").out)["groups"][0]
    assert "protocol" not in group
