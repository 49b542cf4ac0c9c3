"""nfm_cli.store.artifacts: the completion flag of nfm.progress, one name for writing (``complete``),
and hessian-diag files of earlier versions (``done``) still read as they did."""
import pytest
import torch

from nfm_cli.errors import NfmError
from nfm_cli.steps.hessian_diag import compute_hessian_diagonal, read_hessian_diagonal
from nfm_cli.steps.solve import solve_variance
from nfm_cli.store.artifacts import COMPLETE, has_completion_flag, is_complete, read_artifact, write_artifact
from nfm_cli.store.checkpoint import load_checkpoint


@pytest.mark.parametrize("progress, complete, flagged", [
    ({"complete": True}, True, True), ({"complete": False}, False, True),
    ({"done": True}, True, True), ({"done": False}, False, True),
    ({"complete": False, "done": True}, False, True),     # the current name wins
    ({"units_done": 3}, False, False), (None, False, False), ([True], False, False),
])
def test_is_complete_reads_both_names(progress, complete, flagged):
    assert is_complete(progress) is complete and has_completion_flag(progress) is flagged


def _as_old_file(src, dst, finished: bool):
    """``src`` rewritten as an earlier nfm wrote it: ``progress.done`` instead of ``progress.complete``."""
    art = read_artifact(src)
    meta = dict(art.meta)
    progress = dict(meta.pop("progress"))
    del progress[COMPLETE]
    meta["progress"] = dict(progress, done=finished)
    write_artifact(dst, art.tensors, art.kind, meta)
    return dst


def test_every_kind_is_written_with_the_one_flag(tiny_checkpoint, tiny_hdiag, tiny_measures):
    for path in (tiny_checkpoint, tiny_hdiag, tiny_measures):
        progress = read_artifact(path).meta["progress"]
        assert progress[COMPLETE] is True and "done" not in progress


def test_old_style_hessian_diag_files_still_read(tiny_checkpoint, tiny_hdiag, tmp_path):
    """A finished old file: read, solved on (same numbers as the new file) and left alone by a rerun;
    an unfinished old file: refused by the readers as unfinished."""
    old = _as_old_file(tiny_hdiag, tmp_path / "old.hdiag.safetensors", finished=True)
    new, before = read_hessian_diagonal(tiny_hdiag, tiny_checkpoint), read_hessian_diagonal(old, tiny_checkpoint)
    assert before.diagonal.keys() == new.diagonal.keys()
    assert all(torch.equal(before.diagonal[k], new.diagonal[k]) for k in new.diagonal)
    rerun = compute_hessian_diagonal(tiny_checkpoint, old, loss="normalized-ce", estimator="exact", device="cpu")
    left = read_artifact(old).meta["progress"]
    assert rerun.status == "already complete" and left["done"] is True and COMPLETE not in left  # not rewritten
    ck = load_checkpoint(tiny_checkpoint)
    got = solve_variance(ck, old, tmp_path / "old.measures.safetensors").result
    want = solve_variance(ck, tiny_hdiag, tmp_path / "new.measures.safetensors").result
    assert got["normalized_sharpness"] == want["normalized_sharpness"]
    partial = _as_old_file(tiny_hdiag, tmp_path / "partial.hdiag.safetensors", finished=False)
    with pytest.raises(NfmError, match="unfinished hessian-diag run"):
        read_hessian_diagonal(partial, tiny_checkpoint)


class _Stop(Exception):
    pass


def _stop_after(events: int):
    seen = []

    def callback(event):
        seen.append(event)
        if len(seen) > events:
            raise _Stop
    return callback


def test_old_style_partial_hessian_diag_resumes_bit_identically(tiny_checkpoint, tmp_path):
    """An unfinished old file (``done: false``) is a partial run to continue, as before: resuming it
    gives the tensors of an uninterrupted run, and the file is then written with the one flag."""
    options = dict(estimator="hutchinson", probes=3, loss="normalized-ce", batch_size=48, device="cpu", seed=3)
    whole = tmp_path / "whole.safetensors"
    compute_hessian_diagonal(tiny_checkpoint, whole, **options)
    part = tmp_path / "part.safetensors"
    with pytest.raises(_Stop):
        compute_hessian_diagonal(tiny_checkpoint, part, progress=_stop_after(2), save_every_seconds=1e9, **options)
    _as_old_file(part, part, finished=False)
    assert read_artifact(part).meta["progress"]["done"] is False
    resumed = compute_hessian_diagonal(tiny_checkpoint, part, **options)
    assert resumed.status == "resumed"
    a, b = read_artifact(whole), read_artifact(part)
    assert set(a.tensors) == set(b.tensors) and all(torch.equal(a.tensors[n], b.tensors[n]) for n in a.tensors)
    assert b.meta["progress"][COMPLETE] is True and "done" not in b.meta["progress"]
