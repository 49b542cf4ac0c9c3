"""solve-variance / measure end to end through the CLI: outputs, resume, refusals, invariance."""
import json

import pytest

from nfm_cli.steps.train import train
from nfm_cli.store.artifacts import read_artifact
from tests.conftest import sha256_of, tiny_config


@pytest.fixture(scope="module")
def trained(tiny_checkpoint, tmp_path_factory):
    """Tiny trained checkpoints: the session's mlp (conftest.py), a lenet, and a WRN-10-1 with BatchNorm,
    on synthetic data."""
    folder = tmp_path_factory.mktemp("runs")
    runs = {"mlp": tiny_checkpoint}
    for name, overrides in {
        "lenet": dict(model="lenet", width=None, epochs=2, train_size=64),
        "wrn": dict(model="wrn16-4", width=1, depth=10, epochs=1, train_size=48, batch_size=16),
    }.items():
        runs[name] = folder / f"{name}.safetensors"
        train(tiny_config(**overrides), runs[name], device="cpu")
    return runs


def measure_json(cli, ckpt, out, *extra):
    res = cli("measure", ckpt, "--out", out, "--json", *extra)
    assert res.code == 0, res.err
    return json.loads(res.out)


def test_measure_json_and_files(cli, trained, tmp_path):
    out = tmp_path / "m.safetensors"
    result = measure_json(cli, trained["mlp"], out)
    for key in ("normalized_sharpness", "matrix_normalized_sharpness", "hessian_trace", "fisher_rao_norm",
                "layers", "metrics"):
        assert key in result
    assert result["metrics"]["random_ratio"] == 0.3 and result["metrics"]["model"] == "mlp"
    from nfm_cli.measures.registry import DIAGNOSTICS, MEASURES, RUN_METRICS
    not_rivals = {k for k, m in MEASURES.items() if m.source != "rivals"}   # those need --rivals
    assert not_rivals | set(DIAGNOSTICS) <= set(result) and set(RUN_METRICS) <= set(result["metrics"])
    assert result["normalized_sharpness"] <= result["matrix_normalized_sharpness"]
    art = read_artifact(out, "measures")
    assert art.meta["parents"]["checkpoint"] == sha256_of(trained["mlp"])
    assert art.meta["result"]["normalized_sharpness"] == result["normalized_sharpness"]
    assert {"sigma_row.1.weight", "sigma_col.1.weight"} <= set(art.tensors)
    hdiags = sorted(p.name for p in tmp_path.glob("m.hdiag-*.safetensors"))
    assert hdiags == ["m.hdiag-ce.safetensors", "m.hdiag-normalized-ce.safetensors"]
    # the trace baseline is the ce Hessian (Sec. 6.2), the normalized measures use normalized-ce
    assert result["trace_loss"] == "ce" and result["hessian_loss"] == "normalized-ce"
    before = sha256_of(out)
    again = cli("measure", trained["mlp"], "--out", out)
    assert again.code == 0 and "already complete" in again.err and sha256_of(out) == before


def test_solve_variance_matches_measure(cli, trained, tmp_path):
    out = tmp_path / "m.safetensors"
    measured = measure_json(cli, trained["mlp"], out)
    res = cli("solve-variance", trained["mlp"], tmp_path / "m.hdiag-normalized-ce.safetensors",
              "--trace-hdiag", tmp_path / "m.hdiag-ce.safetensors", "--out", tmp_path / "s.safetensors", "--json")
    assert res.code == 0, res.err
    solved = json.loads(res.out)
    for key in ("normalized_sharpness", "matrix_normalized_sharpness", "hessian_trace"):
        assert solved[key] == measured[key]
    assert solved["fisher_rao_norm"] is None


def test_hessian_of_another_checkpoint_is_refused(cli, trained, tmp_path):
    measure_json(cli, trained["mlp"], tmp_path / "m.safetensors")
    res = cli("solve-variance", trained["lenet"], tmp_path / "m.hdiag-normalized-ce.safetensors",
              "--out", tmp_path / "s.safetensors")
    assert res.code == 1 and "another checkpoint" in res.err and len(res.err.strip().splitlines()) == 1
    assert not (tmp_path / "s.safetensors").exists()


@pytest.mark.parametrize("run, mode", [("mlp", "layer"), ("mlp", "neuron"), ("lenet", "layer"),
                                       ("lenet", "neuron"), pytest.param("wrn", "bn", marks=pytest.mark.heavy)])
def test_invariance_end_to_end(cli, trained, tmp_path, run, mode):
    """After nfm rescale, normalized sharpness is unchanged (< 1e-6 relative; measured in float64:
    in float32 the WRN's rounding alone moves it by ~1e-5) while the Hessian
    trace and the norms change; matrix-normalized sharpness is unchanged by whole-matrix (layer)
    scaling but not by per-unit factors (Sec. 5.1's point)."""
    base = measure_json(cli, trained[run], tmp_path / "a.safetensors", "--precision", "float64")
    rescaled = tmp_path / "r.safetensors"
    res = cli("rescale", trained[run], "--mode", mode, "--random-range", "0.25", "4", "--seed", "1", "--out", rescaled)
    assert res.code == 0, res.err
    after = measure_json(cli, rescaled, tmp_path / "b.safetensors", "--precision", "float64")
    assert after["normalized_sharpness"] == pytest.approx(base["normalized_sharpness"], rel=1e-6)
    matrix_ratio = after["matrix_normalized_sharpness"] / base["matrix_normalized_sharpness"]
    if mode == "layer":
        assert matrix_ratio == pytest.approx(1, rel=1e-6)
    else:
        assert abs(matrix_ratio - 1) > 1e-3
    assert abs(after["hessian_trace"] / base["hessian_trace"] - 1) > 1e-3
    assert abs(after["frobenius_norm_sq"] / base["frobenius_norm_sq"] - 1) > 1e-3
