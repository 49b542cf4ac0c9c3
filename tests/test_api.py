"""``nfm_cli.measure_model``: the dict of ``nfm measure --json`` for an in-memory model, no file written."""
from __future__ import annotations

import json
import os

import pytest
import torch

import nfm_cli
from nfm_cli import load_checkpoint, measure_model
from nfm_cli.errors import NfmError


def test_measure_model_returns_what_measure_json_prints_and_writes_nothing(cli, tmp_path, tiny_checkpoint,
                                                                             monkeypatch):
    out = tmp_path / "m.safetensors"
    res = cli("measure", tiny_checkpoint, "--out", out, "--samples", "96", "--seed", "3", "--json")
    assert res.code == 0, res.err
    expected = json.loads(res.out)
    ck = load_checkpoint(tiny_checkpoint)
    x, y = ck.training_tensors()
    x_test, y_test = ck.test_tensors()

    def no_writes(*args, **kwargs):
        raise AssertionError("measure_model wrote a file")

    monkeypatch.setattr("nfm_cli.store.artifacts.atomic_write", no_writes)
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(tmp_path))
    got = measure_model(ck.model, x, y, x_test=x_test, y_test=y_test, samples=96, seed=3)
    assert sorted(os.listdir(tmp_path)) == before
    expected_metrics = expected.pop("metrics")
    expected.pop("path")
    metrics = got.pop("metrics")
    assert got == expected        # same estimator, subset, batch size and solve: the same numbers
    for key in ("train_acc", "test_acc", "gap", "train_loss", "test_loss"):
        assert metrics[key] == pytest.approx(expected_metrics[key], rel=1e-12), key


def test_measure_model_hutchinson_matches_the_cli_too(cli, tmp_path, tiny_checkpoint):
    out = tmp_path / "m.safetensors"
    res = cli("measure", tiny_checkpoint, "--out", out, "--estimator", "hutchinson", "--probes", "3",
              "--samples", "32", "--json")
    assert res.code == 0, res.err
    expected = json.loads(res.out)
    ck = load_checkpoint(tiny_checkpoint)
    got = measure_model(ck.model, *ck.training_tensors(), estimator="hutchinson", probes=3, samples=32)
    assert got["normalized_sharpness"] == expected["normalized_sharpness"]
    assert got["hessian_trace"] == expected["hessian_trace"]
    assert set(got["metrics"]) == {"train_acc", "train_loss", "random_ratio"}


def test_measure_model_refuses_bad_input():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x = torch.randn(5, 4)
    with pytest.raises(NfmError, match="int64 vector"):
        measure_model(model, x, torch.zeros(5))
    with pytest.raises(NfmError, match="unknown estimator"):
        measure_model(model, x, torch.zeros(5, dtype=torch.int64), estimator="magic")
    with pytest.raises(NfmError, match="x_test and y_test"):
        measure_model(model, x, torch.zeros(5, dtype=torch.int64), x_test=x)
    assert nfm_cli.measure_model is measure_model
