"""Training axes for hyperparameter grids: --optimizer sgd|adamw, --momentum, --weight-decay, --warmup-epochs,
--stop-at-loss."""
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from nfm_cli import NfmError, load_checkpoint, train
from nfm_cli.runtime.rng import derive_seed, keyed_generator
from nfm_cli.store.artifacts import read_artifact, write_artifact
from nfm_cli.store.checkpoint import model_from_spec
from tests.conftest import tiny_config

SGD = dict(optimizer="sgd", momentum=0.9, weight_decay=1e-3, lr=0.05)


class Interrupt(Exception):
    pass


def test_sgd_interrupted_and_resumed_is_bit_identical(tmp_path):
    cfg = tiny_config(epochs=4, **SGD)
    full, part = tmp_path / "full.safetensors", tmp_path / "part.safetensors"
    train(cfg, full, device="cpu")

    def stop_after_two(event):
        if event.task == "epoch" and event.done == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, part, device="cpu", progress=stop_after_two)
    assert train(cfg, part, device="cpu").status == "resumed"
    a, b = load_file(full), load_file(part)
    assert a.keys() == b.keys() and any(k.endswith("momentum_buffer") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_artifact(full).meta["metrics"] == read_artifact(part).meta["metrics"]


def test_sgd_epoch_matches_a_hand_written_update(tmp_path):
    """One epoch of heavy-ball SGD with L2 decay, written out: buf = m buf + g + wd w; w -= lr buf."""
    cfg = tiny_config(epochs=1, **SGD)
    out = tmp_path / "sgd.safetensors"
    train(cfg, out, device="cpu")
    ck = load_checkpoint(out)
    x, y = ck.training_tensors()
    torch.manual_seed(derive_seed(cfg.seed, "init"))
    model = model_from_spec(ck.model_spec)
    params = list(model.parameters())
    bufs = [None] * len(params)
    order = torch.randperm(len(y), generator=keyed_generator(cfg.seed, "epoch", 0))
    for start in range(0, len(y), cfg.batch_size):
        idx = order[start:start + cfg.batch_size]
        grads = torch.autograd.grad(F.cross_entropy(model(x[idx]), y[idx]), params)
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                d = g + cfg.weight_decay * p
                bufs[i] = d.clone() if bufs[i] is None else cfg.momentum * bufs[i] + d
                p -= cfg.lr * bufs[i]
    for (name, p), q in zip(model.named_parameters(), ck.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    meta = read_artifact(out).meta
    assert {k: meta["config"][k] for k in SGD} == SGD and meta["config"]["stop_at_loss"] is None
    assert meta["optimizer"]["name"] == "sgd"


ADAMW = dict(optimizer="adamw", weight_decay=0.1, lr=1e-2, warmup_epochs=2)


def test_adamw_with_warmup_matches_a_hand_written_update(tmp_path):
    """Two epochs of AdamW written out (Loshchilov & Hutter: w <- w (1 - lr wd), then the Adam step with
    bias corrections), the lr of minibatch s being lr (s + 1) / (2 epochs x batches): the warm-up
    ends exactly at the end of epoch 2."""
    cfg = tiny_config(epochs=2, **ADAMW)
    out = tmp_path / "adamw.safetensors"
    train(cfg, out, device="cpu")
    ck = load_checkpoint(out)
    x, y = ck.training_tensors()
    torch.manual_seed(derive_seed(cfg.seed, "init"))
    model = model_from_spec(ck.model_spec)
    params = list(model.parameters())
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    batches, step = math.ceil(len(y) / cfg.batch_size), 0
    for epoch in range(2):
        order = torch.randperm(len(y), generator=keyed_generator(cfg.seed, "epoch", epoch))
        for start in range(0, len(y), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            grads = torch.autograd.grad(F.cross_entropy(model(x[idx]), y[idx]), params)
            step += 1
            lr = cfg.lr * step / (2 * batches)
            with torch.no_grad():
                for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                    p.mul_(1 - lr * cfg.weight_decay)
                    m[i] = 0.9 * m[i] + 0.1 * g
                    v[i] = 0.999 * v[i] + 0.001 * g * g
                    p -= lr * (m[i] / (1 - 0.9 ** step)) / ((v[i] / (1 - 0.999 ** step)).sqrt() + 1e-8)
    for (name, q), p in zip(ck.model.named_parameters(), params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    meta = read_artifact(out).meta
    assert {k: meta["config"][k] for k in ADAMW} == ADAMW and meta["optimizer"]["name"] == "adamw"
    assert meta["optimizer"]["param_groups"][0]["lr"] == cfg.lr       # the warm-up has ended on lr itself


def test_adamw_interrupted_during_the_warmup_resumes_bit_identically(tmp_path):
    cfg = tiny_config(epochs=3, **dict(ADAMW, warmup_epochs=3))
    full, part = tmp_path / "full.safetensors", tmp_path / "part.safetensors"
    train(cfg, full, device="cpu")

    def stop_after_one(event):
        if event.task == "epoch" and event.done == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, part, device="cpu", progress=stop_after_one, save_every=0)
    assert read_artifact(part).meta["progress"]["epochs_done"] == 1
    assert train(cfg, part, device="cpu").status == "resumed"
    a, b = load_file(full), load_file(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    plain = tmp_path / "plain.safetensors"
    train(tiny_config(epochs=3, **dict(ADAMW, warmup_epochs=0)), plain, device="cpu")
    assert not torch.equal(load_file(plain)["model.1.weight"], a["model.1.weight"])   # the warm-up mattered


def test_adam_weight_decay_changes_the_run_and_is_recorded(tmp_path):
    plain, decayed = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    train(tiny_config(epochs=1), plain, device="cpu")
    train(tiny_config(epochs=1, weight_decay=0.1), decayed, device="cpu")
    assert read_artifact(decayed).meta["config"]["weight_decay"] == 0.1
    assert read_artifact(plain).meta["config"]["optimizer"] == "adam"
    a, b = load_file(plain), load_file(decayed)
    assert not all(torch.equal(a[k], b[k]) for k in a if k.startswith("model."))


def test_stop_at_loss_stops_at_the_first_epoch_below(tmp_path):
    long = tmp_path / "long.safetensors"
    train(tiny_config(epochs=8, lr=1e-2), long, device="cpu")
    losses = [h["train_loss"] for h in read_artifact(long).meta["history"]]
    assert losses[3] < min(losses[:3])  # the tiny run still improves: epoch 4 is a fresh low
    target = losses[3]
    stop_epoch = next(e for e, v in enumerate(losses, 1) if v <= target)
    stopped, capped = tmp_path / "stopped.safetensors", tmp_path / "capped.safetensors"
    result = train(tiny_config(epochs=8, lr=1e-2, stop_at_loss=target), stopped, device="cpu")
    train(tiny_config(epochs=stop_epoch, lr=1e-2), capped, device="cpu")
    meta = read_artifact(stopped).meta
    assert result.epochs_done == stop_epoch == meta["progress"]["epochs_done"]
    assert meta["progress"]["complete"] and meta["metrics"]["train_loss"] <= target
    assert meta["config"]["stop_at_loss"] == target
    a, b = load_file(stopped), load_file(capped)
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("model."))
    again = train(tiny_config(epochs=8, lr=1e-2, stop_at_loss=target), stopped, device="cpu")
    assert again.status == "already complete" and again.epochs_done == stop_epoch
    assert load_checkpoint(stopped).complete


def test_checkpoint_from_before_the_axes_still_resumes(tmp_path):
    out = tmp_path / "old.safetensors"
    train(tiny_config(epochs=1), out, device="cpu")
    art = read_artifact(out)
    meta = dict(art.meta)
    meta["config"] = {k: v for k, v in meta["config"].items()
                      if k not in ("optimizer", "momentum", "weight_decay", "stop_at_loss", "warmup_epochs")}
    write_artifact(out, dict(art.tensors), "checkpoint", meta)
    assert train(tiny_config(epochs=2), out, device="cpu").status == "resumed"
    with pytest.raises(NfmError, match="another config.*optimizer"):
        train(tiny_config(epochs=3, optimizer="sgd"), out, device="cpu")
    with pytest.raises(NfmError, match="another config.*warmup_epochs"):
        train(tiny_config(epochs=3, warmup_epochs=1), out, device="cpu")


@pytest.mark.parametrize("overrides, match", [
    (dict(optimizer="rmsprop"), "unknown optimizer 'rmsprop'; valid optimizers: adam, sgd, adamw"),
    (dict(optimizer="adamw", momentum=0.9), "momentum applies to optimizer sgd only"),
    (dict(warmup_epochs=-1), "warmup_epochs must be a non-negative integer"),
    (dict(momentum=0.9), "momentum applies to optimizer sgd only"),
    (dict(optimizer="sgd", momentum=1.0), "momentum must be below 1"),
    (dict(optimizer="sgd", momentum=-0.1), "momentum must be a non-negative number"),
    (dict(weight_decay=-1e-4), "weight_decay must be a non-negative number"),
    (dict(weight_decay=math.nan), "weight_decay must be a non-negative number"),
    (dict(stop_at_loss=-0.5), "stop_at_loss must be a non-negative number"),
])
def test_impossible_axes(tmp_path, overrides, match):
    with pytest.raises(NfmError, match=match):
        train(tiny_config(**overrides), tmp_path / "x.safetensors", device="cpu")
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_train_with_sgd(cli, tmp_path):
    out = tmp_path / "c.safetensors"
    r = cli("train", "--out", out, "--dataset", "synthetic", "--width", "8", "--epochs", "1", "--train-size", "64",
            "--test-size", "32", "--optimizer", "sgd", "--momentum", "0.5", "--weight-decay", "1e-4",
            "--stop-at-loss", "0.01", "--quiet")
    assert r.code == 0, r.err
    config = read_artifact(out).meta["config"]
    assert (config["optimizer"], config["momentum"], config["weight_decay"], config["stop_at_loss"]) == \
        ("sgd", 0.5, 1e-4, 0.01)
    r = cli("train", "--out", tmp_path / "d.safetensors", "--dataset", "synthetic", "--optimizer", "lbfgs")
    # refused by the parser
    assert r.code == 2 and "'--optimizer': 'lbfgs' is not one of 'adam', 'sgd', 'adamw'" in r.err


def test_cli_trains_vit_tiny_with_adamw_and_warmup(cli, tmp_path):
    out = tmp_path / "vit.safetensors"
    r = cli("train", "--out", out, "--dataset", "synthetic", "--model", "vit-tiny", "--width", "16", "--depth", "1",
            "--epochs", "1", "--train-size", "64", "--test-size", "32", "--optimizer", "adamw", "--weight-decay",
            "0.05", "--warmup-epochs", "1", "--quiet")
    assert r.code == 0, r.err
    meta = read_artifact(out).meta
    assert (meta["config"]["optimizer"], meta["config"]["warmup_epochs"]) == ("adamw", 1)
    assert meta["model"]["name"] == "vit-tiny" and (meta["model"]["args"]["dim"],
                                                    meta["model"]["args"]["depth"]) == (16, 1)
    assert len(load_checkpoint(out).model.blocks) == 1
