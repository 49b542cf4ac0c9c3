"""measure reads and hashes the checkpoint and the training data once, and does not read back the
Hessian files it has just written; the result equals the solve from those files."""
import pytest

import nfm_cli.steps.solve as solving
import nfm_cli.store.artifacts as artifacts
import nfm_cli.store.checkpoint as checkpoint
from nfm_cli.steps.measure import measure_checkpoint
from nfm_cli.steps.solve import solve_variance


@pytest.fixture
def counts(monkeypatch):
    seen = {"checkpoint reads": 0, "input hashes": 0, "train split loads": 0, "content hashes": 0}
    read, hash_inputs, load_split = checkpoint.read_artifact, checkpoint.tensor_hash, checkpoint.load_spec_split
    content_hash = artifacts.content_hash

    def counting_read(*args, **kwargs):
        seen["checkpoint reads"] += 1
        return read(*args, **kwargs)

    def counting_hash(t):
        seen["input hashes"] += 1
        return hash_inputs(t)

    def counting_load(spec, train, *args, **kwargs):   # checkpoints load data through data_spec
        seen["train split loads"] += bool(train)
        return load_split(spec, train, *args, **kwargs)

    def counting_content_hash(data):
        seen["content hashes"] += 1
        return content_hash(data)

    monkeypatch.setattr(checkpoint, "read_artifact", counting_read)
    monkeypatch.setattr(checkpoint, "tensor_hash", counting_hash)
    monkeypatch.setattr(checkpoint, "load_spec_split", counting_load)
    monkeypatch.setattr(artifacts, "content_hash", counting_content_hash)
    return seen


def test_measure_reads_and_hashes_once(tiny_checkpoint, tmp_path, counts, monkeypatch, one_thread):
    def no_reading_back(*args, **kwargs):
        raise AssertionError("measure read back a Hessian file it had just computed")

    monkeypatch.setattr(solving, "read_hessian_diagonal", no_reading_back)
    out = tmp_path / "m.measures.safetensors"
    result = measure_checkpoint(tiny_checkpoint, out, device="cpu")
    assert counts["checkpoint reads"] == 1
    assert counts["input hashes"] == 1
    assert counts["train split loads"] == 1
    # one content hash per file read or written: the checkpoint, two Hessian files, the measures file
    assert counts["content hashes"] == 4

    monkeypatch.undo()
    solved = solve_variance(tiny_checkpoint, tmp_path / "m.measures.hdiag-normalized-ce.safetensors",
                            tmp_path / "s.safetensors",
                            trace_hdiag=tmp_path / "m.measures.hdiag-ce.safetensors",
                            fisher_rao=result.result["fisher_rao_norm"])
    assert solved.result == result.result
    parents = artifacts.read_artifact(out).meta["parents"]
    assert parents == artifacts.read_artifact(tmp_path / "s.safetensors").meta["parents"]
