"""``nfm report --protocol``: measures files -> grid -> scores, checked against the direct references."""
from __future__ import annotations

import json

import pytest
import torch

from nfm_cli.artifacts import write_artifact
from tests.test_protocol import ROWS, ref_cmi, ref_psi, ref_rse, ref_tau


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
    assert p["granulated_kendall_mean"] == pytest.approx((ref_psi(table, "lr", axes) + ref_psi(table, "width", axes)) / 2)
    assert p["cmi_score"] == pytest.approx(ref_cmi(table, axes))
    rse_max, rse_p90 = ref_rse(table, axes, n_test=500)  # the test size recorded in the files
    assert (p["robust_sign_error_max"], p["robust_sign_error_p90"]) == (pytest.approx(rse_max), pytest.approx(rse_p90))
    assert p["n_runs"] == len(ROWS) and p["n_seeds"] == 2
    for key in ("kendall_tau", "granulated_kendall_mean", "cmi_score", "robust_sign_error_max", "robust_sign_error_p90"):
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
