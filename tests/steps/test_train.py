"""nfm_cli.steps.train: exact resume, checkpoint contents, refusal of mismatched outputs, the gap."""
import decimal
import random

import pytest
import torch
from safetensors.torch import load_file

from nfm_cli import NfmError, load_checkpoint, train
from nfm_cli.steps.train import accuracy_gap
from nfm_cli.store.artifacts import read_artifact, write_artifact
from tests.conftest import sha256_of, tiny_config


class Interrupt(Exception):
    pass


def stop_after_epoch(k):
    def progress(event):
        if event.task == "epoch" and event.done == k:
            raise Interrupt
    return progress


@pytest.mark.parametrize("model", ["mlp", "lenet"])
def test_interrupted_and_resumed_is_bit_identical(tmp_path, model):
    cfg = tiny_config(model=model, epochs=4, width=16 if model == "mlp" else None)
    full, part = tmp_path / "full.safetensors", tmp_path / "part.safetensors"
    train(cfg, full, device="cpu")
    with pytest.raises(Interrupt):
        train(cfg, part, device="cpu", progress=stop_after_epoch(2))
    assert read_artifact(part).meta["progress"]["epochs_done"] == 2
    result = train(cfg, part, device="cpu")
    assert result.status == "resumed"
    a, b = load_file(full), load_file(part)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ma, mb = read_artifact(full).meta, read_artifact(part).meta
    assert ma["metrics"] == mb["metrics"]
    assert [h["train_acc"] for h in ma["history"]] == [h["train_acc"] for h in mb["history"]]


def test_raising_epochs_continues_the_same_run(tmp_path):
    short, long = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    train(tiny_config(epochs=2), short, device="cpu")
    train(tiny_config(epochs=3), short, device="cpu")
    train(tiny_config(epochs=3), long, device="cpu")
    a, b = load_file(short), load_file(long)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_contents(tiny_checkpoint):
    art = read_artifact(tiny_checkpoint, "checkpoint")
    meta = art.meta
    assert meta["progress"] == {"epochs_done": 2, "epochs": 2, "complete": True}
    assert set(meta["metrics"]) >= {"train_acc", "test_acc", "gap", "train_loss", "test_loss", "random_ratio"}
    assert meta["metrics"]["gap"] == pytest.approx(meta["metrics"]["train_acc"] - meta["metrics"]["test_acc"])
    assert meta["model"]["name"] == "mlp" and meta["model"]["args"]["width"] == 16
    ck = load_checkpoint(tiny_checkpoint)
    _, y = ck.training_tensors()
    assert torch.equal(y, art.tensors["data.labels"])
    # the saved labels are the randomized ones: they differ from the true labels of the subset
    from nfm_cli.data.datasets import synthetic_split
    truth = synthetic_split(True).y[art.tensors["data.indices"]]
    assert 0.1 < (truth != y).float().mean().item() < 0.45


def test_train_accuracy_is_measured_on_the_labels_trained_on(tiny_checkpoint):
    ck = load_checkpoint(tiny_checkpoint)
    x, y = ck.training_tensors()
    with torch.no_grad():
        acc = (ck.model(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(ck.metrics["train_acc"])


def test_complete_run_is_left_alone_unless_forced(tiny_checkpoint, tmp_path):
    out = tmp_path / "c.safetensors"
    out.write_bytes(tiny_checkpoint.read_bytes())
    before = sha256_of(out)
    assert train(tiny_config(), out, device="cpu").status == "already complete"
    assert sha256_of(out) == before
    assert train(tiny_config(seed=1), out, device="cpu", force=True).status == "trained"
    assert sha256_of(out) != before


@pytest.mark.parametrize("overrides, match", [
    (dict(model="resnet"), "unknown model 'resnet'; valid models: lenet, mlp, vit-tiny, wrn16-4"),
    (dict(dataset="imagenet"), "unknown dataset"),
    (dict(random_ratio=1.5), r"random_ratio must be in \[0, 1\]"),
    (dict(random_ratio=-0.1), r"random_ratio must be in \[0, 1\]"),
    (dict(epochs=0), "epochs must be a positive integer"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(lr=0.0), "lr must be a positive number"),
    (dict(model="lenet", width=8), "width applies to mlp, wrn16-4 and vit-tiny only"),
    (dict(model="wrn16-4", width=None, depth=11), "depth must be 6n"),
])
def test_impossible_options(tmp_path, overrides, match):
    with pytest.raises(NfmError, match=match):
        train(tiny_config(**overrides), tmp_path / "x.safetensors", device="cpu")
    assert not (tmp_path / "x.safetensors").exists()


def test_output_in_missing_folder(tmp_path):
    with pytest.raises(NfmError, match="does not exist"):
        train(tiny_config(), tmp_path / "nope" / "x.safetensors", device="cpu")


def test_existing_output_of_another_kind_or_config_is_not_touched(tiny_checkpoint, tmp_path):
    other = tmp_path / "h.safetensors"
    write_artifact(other, {"w": torch.zeros(2)}, "hessian-diag", {"config": {}})
    before = sha256_of(other)
    with pytest.raises(NfmError, match="is a hessian-diag file"):
        train(tiny_config(), other, device="cpu")
    assert sha256_of(other) == before
    copy = tmp_path / "c.safetensors"
    copy.write_bytes(tiny_checkpoint.read_bytes())
    with pytest.raises(NfmError, match="another config.*random_ratio"):
        train(tiny_config(random_ratio=0.5), copy, device="cpu")
    assert sha256_of(copy) == sha256_of(tiny_checkpoint)


def test_corrupt_existing_output_is_refused_not_overwritten(tmp_path):
    out = tmp_path / "bad.safetensors"
    out.write_bytes(b"not a safetensors file at all")
    with pytest.raises(NfmError, match="not a valid safetensors"):
        train(tiny_config(), out, device="cpu")
    assert out.read_bytes() == b"not a safetensors file at all"


def test_changed_dataset_files_are_detected(tiny_checkpoint, monkeypatch):
    import nfm_cli.data.specs as data_spec_module  # checkpoints load their data through data_spec
    from nfm_cli.data.datasets import Split, synthetic_split

    def altered(name, train, data_dir=None, download=False, strict=False):
        split = synthetic_split(train)
        return Split(split.x + 1e-3, split.y)

    monkeypatch.setattr(data_spec_module, "load_split", altered)
    with pytest.raises(NfmError, match="differ from those it was trained on"):
        load_checkpoint(tiny_checkpoint).training_tensors()


def _gap_reference(train_correct: int, n_train: int, test_correct: int, n_test: int) -> float:
    """The gap to 60 significant digits in decimal arithmetic, then rounded once to a double."""
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        exact = decimal.Decimal(train_correct) / n_train - decimal.Decimal(test_correct) / n_test
        return float(exact)


def test_accuracy_gap_is_the_exact_difference_rounded_once():
    """``accuracy_gap`` against decimal arithmetic, on the case a float subtraction gets wrong
    (1.0 - 0.774 = 0.22599999999999998) and on seeded random counts, negative gaps included."""
    assert accuracy_gap(1000, 1000, 774, 1000) == _gap_reference(1000, 1000, 774, 1000) == 0.226
    rng = random.Random(0)
    for _ in range(2000):
        n_train, n_test = rng.randint(1, 60_000), rng.randint(1, 10_000)
        counts = (rng.randint(0, n_train), n_train, rng.randint(0, n_test), n_test)
        assert accuracy_gap(*counts) == _gap_reference(*counts), counts
