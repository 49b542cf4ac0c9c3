"""``nfm hessian-diag`` end to end: artifact layout, resume bit-identical, refusals, the CLI."""
from __future__ import annotations

import shutil

import pytest
import torch

import nfm_models as models
from nfm_cli.curvature.batch_size import auto_batch_size
from nfm_cli.curvature.exact import exact_diagonal
from nfm_cli.errors import NfmError
from nfm_cli.runtime.progress import NOTE
from nfm_cli.steps.hessian_diag import compute_hessian_diagonal, read_hessian_diagonal
from nfm_cli.steps.train import train
from nfm_cli.store.artifacts import read_artifact
from nfm_cli.store.checkpoint import load_checkpoint
from tests.conftest import assert_same_artifact, sha256_of, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


class Interrupt(Exception):
    pass


def interrupt_after(units):
    """A progress callback that raises once ``units`` progress events past the first have arrived
    (notes, such as the estimator ``auto`` picked, are not progress)."""
    seen = []

    def callback(event):
        if event.task == NOTE:
            return
        seen.append(event)
        if len(seen) > units:
            raise Interrupt
    return callback


def test_exact_artifact_layout(tiny_checkpoint, tmp_path):
    out = tmp_path / "h.safetensors"
    result = compute_hessian_diagonal(tiny_checkpoint, out, loss="ce", device="cpu", batch_size=48)
    assert result.status == "computed"
    ck = load_checkpoint(tiny_checkpoint)
    art = read_artifact(out, "hessian-diag")
    params = dict(ck.model.named_parameters())
    assert set(art.tensors) == set(params)
    for name, p in params.items():
        assert art.tensors[name].shape == p.shape and art.tensors[name].dtype == torch.float64
    assert art.meta["parents"] == {"checkpoint": ck.sha256}
    assert art.meta["config"] == {"loss": "ce", "estimator": "exact", "samples": 128, "probes": None,
                                  "seed": None, "finite_diff": None, "batch_size": 48}
    assert art.meta["progress"]["complete"] is True and art.meta["progress"]["units_done"] == 3
    assert art.meta["wall_time"] > 0 and art.meta["source"]["checkpoint"] == str(tiny_checkpoint)
    assert art.meta["metrics"]["parameters"] == sum(p.numel() for p in params.values())
    # the numbers: the in-memory exact diagonal over the training set as trained
    x, y = ck.training_tensors()
    reference = exact_diagonal(ck.model, x, y, "ce", batch_size=48)
    assert all(torch.equal(art.tensors[n], reference[n]) for n in params)
    h = read_hessian_diagonal(out, ck)
    assert list(h.diagonal) == list(params) and h.sha256 == sha256_of(out) and h.config["loss"] == "ce"
    assert h.status == "read" and h.checkpoint_sha256 == ck.sha256


@pytest.mark.parametrize("estimator,units", [("exact", 1), ("hutchinson", 4), ("finite-diff", 5)])
def test_interrupted_and_resumed_is_bit_identical(tiny_checkpoint, tmp_path, estimator, units):
    options = dict(estimator=estimator, loss="normalized-ce", batch_size=48, device="cpu", seed=3)
    if estimator != "exact":
        options["probes"] = 3
    whole = tmp_path / "whole.safetensors"
    compute_hessian_diagonal(tiny_checkpoint, whole, **options)
    part = tmp_path / "part.safetensors"
    with pytest.raises(Interrupt):
        compute_hessian_diagonal(tiny_checkpoint, part, progress=interrupt_after(units),
                                 save_every_seconds=1e9, **options)
    partial = read_artifact(part, "hessian-diag")
    assert partial.meta["progress"]["complete"] is False and partial.meta["progress"]["units_done"] == units
    assert all(name.startswith("state.") for name in partial.tensors)
    with pytest.raises(NfmError, match="unfinished"):
        read_hessian_diagonal(part, tiny_checkpoint)
    # a second interruption, saving after every unit this time
    with pytest.raises(Interrupt):
        compute_hessian_diagonal(tiny_checkpoint, part, progress=interrupt_after(1), save_every_seconds=0,
                                 **options)
    assert read_artifact(part).meta["progress"]["units_done"] == units + 1
    resumed = compute_hessian_diagonal(tiny_checkpoint, part, **options)
    assert resumed.status == "resumed"
    a, b = read_artifact(whole), read_artifact(part)
    assert set(a.tensors) == set(b.tensors)
    assert all(torch.equal(a.tensors[n], b.tensors[n]) for n in a.tensors)
    assert a.meta["metrics"] == b.meta["metrics"]
    if estimator != "exact":
        assert any(n.startswith("stderr.") for n in b.tensors)


def test_complete_file_is_left_alone_and_other_configs_refused(tiny_checkpoint, tmp_path):
    out = tmp_path / "h.safetensors"
    compute_hessian_diagonal(tiny_checkpoint, out, estimator="hutchinson", probes=2, device="cpu")
    before = sha256_of(out)
    again = compute_hessian_diagonal(tiny_checkpoint, out, estimator="hutchinson", probes=2, device="cpu",
                                     batch_size=7)
    assert again.status == "already complete" and sha256_of(out) == before
    with pytest.raises(NfmError, match=r"another config \(probes: 2 there, 3 now\).*--force"):
        compute_hessian_diagonal(tiny_checkpoint, out, estimator="hutchinson", probes=3, device="cpu")
    with pytest.raises(NfmError, match=r"loss: 'normalized-ce' there, 'ce' now"):
        compute_hessian_diagonal(tiny_checkpoint, out, estimator="hutchinson", probes=2, loss="ce", device="cpu")
    assert sha256_of(out) == before
    forced = compute_hessian_diagonal(tiny_checkpoint, out, estimator="hutchinson", probes=3, device="cpu",
                                      force=True)
    assert forced.status == "computed" and forced.config["probes"] == 3


def test_partial_run_must_continue_with_its_batch_size(tiny_checkpoint, tmp_path):
    out = tmp_path / "h.safetensors"
    with pytest.raises(Interrupt):
        compute_hessian_diagonal(tiny_checkpoint, out, batch_size=32, device="cpu", progress=interrupt_after(1))
    with pytest.raises(NfmError, match="--batch-size 32"):
        compute_hessian_diagonal(tiny_checkpoint, out, batch_size=64, device="cpu")


def test_another_checkpoint_is_refused(tiny_checkpoint, other_checkpoint, tmp_path):
    out = tmp_path / "h.safetensors"
    compute_hessian_diagonal(tiny_checkpoint, out, device="cpu")
    with pytest.raises(NfmError, match="computed from another checkpoint"):
        read_hessian_diagonal(out, load_checkpoint(other_checkpoint))
    with pytest.raises(NfmError, match="another checkpoint.*--force"):
        compute_hessian_diagonal(other_checkpoint, out, device="cpu")


def test_bad_outputs_and_inputs_are_refused(tiny_checkpoint, tmp_path):
    with pytest.raises(NfmError, match="checkpoint itself"):
        compute_hessian_diagonal(tiny_checkpoint, tiny_checkpoint, device="cpu", force=True)
    copy = tmp_path / "copy.safetensors"
    shutil.copyfile(tiny_checkpoint, copy)
    with pytest.raises(NfmError, match="is a checkpoint file, not a hessian-diag file"):
        compute_hessian_diagonal(tiny_checkpoint, copy, device="cpu")
    assert sha256_of(copy) == sha256_of(tiny_checkpoint)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(NfmError, match="not a readable hessian-diag file.*--force"):
        compute_hessian_diagonal(tiny_checkpoint, junk, device="cpu")
    for kwargs, message in (({"samples": 10_000}, "more than the 128 training samples"),
                            ({"samples": 0}, "at least 1"), ({"estimator": "lanczos"}, "unknown estimator"),
                            ({"estimator": "hutchinson", "probes": 0}, "probes must be at least 1"),
                            ({"batch_size": 0}, "batch_size must be at least 1")):
        with pytest.raises(NfmError, match=message):
            compute_hessian_diagonal(tiny_checkpoint, tmp_path / "y.safetensors", device="cpu", **kwargs)


def test_unfinished_checkpoint_is_refused(tmp_path):
    ck = tmp_path / "partial.safetensors"
    with pytest.raises(Interrupt):
        train(tiny_config(epochs=3), ck, device="cpu",
              progress=lambda e: (_ for _ in ()).throw(Interrupt) if e.task == "epoch" else None)
    with pytest.raises(NfmError, match=r"unfinished training run \(1 of 3 epochs\)"):
        compute_hessian_diagonal(ck, tmp_path / "h.safetensors", device="cpu")


def test_samples_subset_is_seeded(tiny_checkpoint, tmp_path):
    a = compute_hessian_diagonal(tiny_checkpoint, tmp_path / "a.safetensors", samples=40, seed=1, device="cpu")
    b = compute_hessian_diagonal(tiny_checkpoint, tmp_path / "b.safetensors", samples=40, seed=2, device="cpu")
    assert a.config["samples"] == 40 and a.config["seed"] == 1
    assert any(not torch.equal(a.diagonal[n], b.diagonal[n]) for n in a.diagonal)


def test_cli_writes_the_path_and_fails_in_one_line(tiny_checkpoint, tmp_path, cli):
    out = tmp_path / "h.safetensors"
    result = cli("hessian-diag", tiny_checkpoint, "--out", out, "--estimator", "hutchinson", "--probes", "2",
                 "--device", "cpu")
    assert result.code == 0, result.err
    assert result.out.strip() == str(out)
    assert "hutchinson" in result.err
    again = cli("hessian-diag", tiny_checkpoint, "--out", out, "--estimator", "hutchinson", "--probes", "2", "-q")
    assert again.code == 0 and "already complete" in again.err
    bad = cli("hessian-diag", tiny_checkpoint, "--out", out, "--loss", "mse")
    assert bad.code == 2 and bad.out == ""       # a usage error, caught by the parser before any work
    assert bad.err.strip().count("\n") == 0 and "'--loss': 'mse' is not one of 'normalized-ce', 'ce'" in bad.err
    missing = cli("hessian-diag", tmp_path / "nope.safetensors", "--out", tmp_path / "z.safetensors")
    assert missing.code == 1 and "no such file" in missing.err


def test_automatic_batch_size(tiny_checkpoint, tmp_path, monkeypatch):
    # the fixed 2 GiB budget alone (free memory lowers it: tests/test_memory_limits.py)
    monkeypatch.setattr("nfm_cli.curvature.batch_size.available_bytes", lambda device=None: None)
    result = compute_hessian_diagonal(tiny_checkpoint, tmp_path / "h.safetensors", device="cpu")
    assert result.config["batch_size"] == 128                     # all 128 samples fit one batch
    wrn = models.build("wrn16-4").eval()
    assert auto_batch_size(wrn, torch.zeros(1, 3, 32, 32), "exact", 50_000) == 64
    assert auto_batch_size(wrn, torch.zeros(1, 3, 32, 32), "hutchinson", 50_000) == 32
    assert auto_batch_size(models.build("mlp"), torch.zeros(1, 1, 28, 28), "exact", 2048) == 512


def test_hessian_diag_over_many_checkpoints(cli, tiny_checkpoint, tmp_path):
    """Default names next to each checkpoint, a bad file in the middle fails alone, the results equal
    one call per file's; --out only with one checkpoint."""
    a, bad, c = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    shutil.copy(tiny_checkpoint, a)
    shutil.copy(tiny_checkpoint, c)
    bad.write_bytes(b"not a checkpoint")
    res = cli("hessian-diag", a, bad, c, "--loss", "ce", "--device", "cpu")
    assert res.code == 1
    assert res.out.split() == [str(tmp_path / "a.hdiag-ce.safetensors"), str(tmp_path / "c.hdiag-ce.safetensors")]
    assert res.err.count("nfm: error: ") == 1 and f"nfm: error: {bad}: " in res.err
    assert f"nfm: 3 checkpoints: 2 computed, 1 failed ({bad})" in res.err
    alone = cli("hessian-diag", c, "--loss", "ce", "--device", "cpu", "-o", tmp_path / "alone.safetensors")
    assert alone.code == 0, alone.err
    assert_same_artifact(tmp_path / "c.hdiag-ce.safetensors", tmp_path / "alone.safetensors")
    refused = cli("hessian-diag", a, c, "-o", tmp_path / "one.safetensors")
    assert refused.code == 1 and "--out names one hessian-diag file but 2 checkpoints" in refused.err
