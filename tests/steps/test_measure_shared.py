"""measure's shared forward (steps/measure_shared.py): one forward pass per batch for both Hessian diagonals
and the Fisher-Rao norm; the kept files equal separate ``hessian-diag`` runs bit for bit, a run stopped
mid-way and continued equals an uninterrupted one, and so does a run whose solve had not been written."""
from __future__ import annotations

import pytest

import nfm_cli.steps.measure_shared as shared
from nfm_cli.measures.fisher_rao import fisher_rao_norm_of_checkpoint
from nfm_cli.steps.hessian_diag import compute_hessian_diagonal
from nfm_cli.steps.measure import intermediate_paths, measure_checkpoint
from nfm_cli.store.checkpoint import load_checkpoint
from tests.conftest import assert_same_artifact, read_safetensors

BATCH = 32          # the tiny checkpoint's 128 samples: 4 units


@pytest.fixture
def forwards(monkeypatch):
    """Counts the forward passes of the shared run."""
    seen = []
    original = shared.CapturedForward

    def counting(*args, **kwargs):
        seen.append(1)
        return original(*args, **kwargs)
    monkeypatch.setattr(shared, "CapturedForward", counting)
    return seen


def _measure(checkpoint, out, **options):
    return measure_checkpoint(checkpoint, out, estimator="exact", batch_size=BATCH, device="cpu",
                              save_every_seconds=0, **options)


def test_kept_files_equal_separate_hessian_diag_runs(tiny_checkpoint, tmp_path, forwards, one_thread):
    out = tmp_path / "m.measures.safetensors"
    result = _measure(tiny_checkpoint, out)
    assert len(forwards) == 4                                   # one forward per batch for everything
    for loss, kept in intermediate_paths(out).items():
        alone = tmp_path / f"alone-{loss}.safetensors"
        compute_hessian_diagonal(tiny_checkpoint, alone, loss=loss, estimator="exact", batch_size=BATCH,
                                 device="cpu")
        assert_same_artifact(kept, alone)
    # the Fisher-Rao norm against the independent per-sample gradients of torch.func (float32 model)
    reference = fisher_rao_norm_of_checkpoint(load_checkpoint(tiny_checkpoint), method="vmap")
    assert result.result["fisher_rao_norm"] == pytest.approx(reference, rel=1e-5)


def test_a_stopped_shared_run_continues_to_the_same_files(tiny_checkpoint, tmp_path, monkeypatch, one_thread):
    whole = tmp_path / "whole" / "m.measures.safetensors"
    whole.parent.mkdir()
    want = _measure(tiny_checkpoint, whole)
    out = tmp_path / "m.measures.safetensors"
    run_unit = shared.SharedForwardEstimator.run_unit

    def stop_at_two(self, unit, state):
        if unit == 2:
            raise KeyboardInterrupt
        run_unit(self, unit, state)
    monkeypatch.setattr(shared.SharedForwardEstimator, "run_unit", stop_at_two)
    with pytest.raises(KeyboardInterrupt):
        _measure(tiny_checkpoint, out)
    partial = intermediate_paths(out)
    tensors, meta = read_safetensors(partial["normalized-ce"])
    assert any(name.startswith("state.shared.fisher.") for name in tensors)
    assert '"units_done": 2' in meta["nfm.progress"]
    assert not partial["ce"].exists() and not out.exists()
    monkeypatch.undo()
    got = _measure(tiny_checkpoint, out)
    assert got.result == want.result
    for loss, path in partial.items():
        assert_same_artifact(path, intermediate_paths(whole)[loss])


def test_a_run_stopped_before_the_solve_gives_the_same_measures(tiny_checkpoint, tmp_path, forwards, one_thread):
    """Both files complete, no measures file: the Fisher-Rao norm is recomputed with the Hessian's batches
    and plan, equal to the shared run's bit for bit."""
    out = tmp_path / "m.measures.safetensors"
    want = _measure(tiny_checkpoint, out)
    out.unlink()
    forwards.clear()
    got = _measure(tiny_checkpoint, out)
    assert forwards == [] and got.result == want.result
