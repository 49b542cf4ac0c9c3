"""``nfm train``: Adam on (possibly partly random) labels, checkpointed every epoch, exactly resumable.

Appendix E of the paper: Adam with default betas, no weight decay, no augmentation, cross-entropy
(the default). For hyperparameter grids (Jiang et al. 2020): SGD with momentum, L2 weight decay
(``torch.optim``'s ``weight_decay``, for both optimizers), AdamW (``adamw``: Adam with decoupled weight
decay, Loshchilov & Hutter 2019, as ViTs are trained), a linear learning-rate warm-up over the first
``warmup_epochs`` epochs (minibatch s of the run at lr * (s + 1) / (warmup_epochs * batches), then lr)
and ``stop_at_loss``: training stops after
the first epoch whose training cross-entropy (eval mode, whole training set) is at most that value,
``epochs`` staying the cap.
Sec. 6.1: a seeded fraction of the training labels is replaced by uniformly random ones; the labels
actually trained on are stored in the checkpoint.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import nfm_models
from nfm_cli.choices import OPTIMIZERS, TRAIN_SAVE_EVERY_SECONDS
from nfm_cli.data.datasets import check_data_dir, dataset_info, load_split, randomize_labels, subset_indices
from nfm_cli.errors import NfmError
from nfm_cli.runtime import interrupt
from nfm_cli.runtime.devices import resolve_device
from nfm_cli.runtime.progress import ProgressFn, report
from nfm_cli.runtime.rng import derive_seed, keyed_generator
from nfm_cli.store.artifacts import COMPLETE, read_artifact, write_artifact
from nfm_cli.store.checkpoint import model_from_spec, tensor_hash
from nfm_cli.store.train_config import NON_IDENTITY, TrainFields

EVAL_BATCH = 1024
SAVE_EVERY_SECONDS = TRAIN_SAVE_EVERY_SECONDS
RUNNING_LOSS = "train.running_loss"  # the epoch's loss sum so far, in checkpoints saved inside an epoch
# a run is flagged as diverged when its training loss exceeds this many times ln K (the loss of a
# uniform guess over K classes), or any loss/accuracy is NaN/inf
DIVERGENCE_FACTOR = 10.0
# --width / --depth map to these constructor arguments (mlp: hidden width and hidden layers;
# wrn16-4: width factor k and total depth 6n+4, e.g. --depth 10 --width 1 for a tiny WRN-10-1)
# vit-tiny: embedding width (its heads must divide it) and number of blocks
_SIZE_ARGS = {"mlp": {"width": "width", "depth": "depth"},
              "wrn16-4": {"width": "widen_factor", "depth": "depth"},
              "vit-tiny": {"width": "dim", "depth": "depth"}}


@dataclass
class TrainConfig(TrainFields):
    """Everything that determines the trained weights (``data_dir`` only says where the data is): the
    fields of ``store.train_config.TrainFields`` (declared there, torch-free), checked and turned into a
    model spec and an optimizer here."""

    # fields that may differ between a run and its resumption
    NON_IDENTITY = NON_IDENTITY

    def validate(self) -> None:
        if self.model not in nfm_models.names():
            raise NfmError(f"unknown model {self.model!r}; valid models: {', '.join(nfm_models.names())}")
        dataset_info(self.dataset)
        check_data_dir(self.data_dir)
        if not 0.0 <= self.random_ratio <= 1.0 or math.isnan(self.random_ratio):
            raise NfmError(f"random_ratio must be in [0, 1], not {self.random_ratio}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise NfmError(f"{name} must be a positive integer, not {getattr(self, name)}")
        for name in ("train_size", "test_size", "width", "depth"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise NfmError(f"{name} must be a positive integer, not {value}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise NfmError(f"lr must be a positive number, not {self.lr}")
        self._validate_optimizer()
        for name in ("width", "depth"):
            if getattr(self, name) is not None and self.model not in _SIZE_ARGS:
                sized = list(_SIZE_ARGS)
                raise NfmError(f"{name} applies to {', '.join(sized[:-1])} and {sized[-1]} only, not {self.model}")
        try:
            model_from_spec(self.model_spec())
        except (TypeError, ValueError) as exc:
            raise NfmError(f"cannot build {self.model}: {exc}") from None

    def _validate_optimizer(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise NfmError(f"unknown optimizer {self.optimizer!r}; valid optimizers: {', '.join(OPTIMIZERS)}")
        for name in ("momentum", "weight_decay"):
            if not (0 <= getattr(self, name) < math.inf):
                raise NfmError(f"{name} must be a non-negative number, not {getattr(self, name)}")
        if self.momentum >= 1:
            raise NfmError(f"momentum must be below 1, not {self.momentum}")
        if self.optimizer in ("adam", "adamw") and self.momentum != 0:
            raise NfmError("momentum applies to optimizer sgd only (Adam uses its default betas)")
        if not (isinstance(self.warmup_epochs, int) and self.warmup_epochs >= 0):
            raise NfmError(f"warmup_epochs must be a non-negative integer, not {self.warmup_epochs}")
        if self.stop_at_loss is not None and not (0 <= self.stop_at_loss < math.inf):
            raise NfmError(f"stop_at_loss must be a non-negative number, not {self.stop_at_loss}")

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        if self.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)

    def warmup_lr(self, epoch: int, batch: int, batches: int) -> float | None:
        """The learning rate of minibatch ``batch`` of epoch ``epoch + 1`` during the warm-up, else None."""
        step, steps = epoch * batches + batch + 1, self.warmup_epochs * batches
        return self.lr * step / steps if step < steps else (self.lr if step == steps else None)

    def reached_stop_loss(self, metrics: dict[str, Any]) -> bool:
        loss = metrics.get("train_loss")
        return self.stop_at_loss is not None and loss is not None and loss <= self.stop_at_loss

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_json().items() if k not in self.NON_IDENTITY}

    def model_spec(self) -> dict[str, Any]:
        info = dataset_info(self.dataset)
        args: dict[str, Any] = {"in_channels": info.in_channels, "image_size": info.image_size,
                                "num_classes": info.num_classes}
        for name in ("width", "depth"):
            if getattr(self, name) is not None:
                args[_SIZE_ARGS[self.model][name]] = getattr(self, name)
        return {"name": self.model, "args": args}


@dataclass
class TrainResult:
    path: Path
    status: str  # "trained", "resumed", "already complete"
    epochs_done: int
    metrics: dict[str, Any]
    wall_time: float
    resumed_from: tuple[int, int] | None = None  # (epochs, batches of the next) found in the checkpoint
    epochs_run: int = 0        # epochs finished by this call (a resumed run counts only its new ones)
    session_time: float = 0.0  # training time of this call


def train(config: TrainConfig, out: str | os.PathLike, *, device: str = "auto", force: bool = False,
          download: bool = False, progress: ProgressFn = None,
          save_every: float = SAVE_EVERY_SECONDS) -> TrainResult:
    """Train (or resume training) and checkpoint to ``out``.

    The checkpoint is written every ``save_every`` seconds (checked after every minibatch, so a save
    may fall inside an epoch), at the end, and, when the training loop stops on an exception or a
    signal (see ``nfm_cli.runtime.interrupt``), with the progress made so far; a signal then raises
    ``Interrupted`` naming what was saved. An incomplete checkpoint at ``out`` with the same config
    is resumed from where it stopped, bit-identically; a complete one is left alone unless
    ``force``; one with another config or kind is refused. Epochs may be raised on an existing run:
    epoch e's randomness depends only on (seed, e).
    """
    config.validate()
    if not save_every >= 0:
        raise NfmError(f"save_every must be a number of seconds >= 0, not {save_every}")
    out = Path(out)
    if out.is_dir():
        raise NfmError("output path is a directory; give a file name such as run.safetensors", out)
    if not (out.parent if str(out.parent) else Path(".")).is_dir():
        raise NfmError(f"output folder {str(out.parent)!r} does not exist; create it first", out)
    dev = resolve_device(device)
    spec = config.model_spec()

    previous = None if force or not out.exists() else _previous_run(out, config)
    if previous is not None and (previous["progress"]["epochs_done"] >= config.epochs
                                 or config.reached_stop_loss(previous["metrics"])):
        return TrainResult(out, "already complete", previous["progress"]["epochs_done"],
                           previous["metrics"], previous["wall_time"])

    data = _training_data(config, spec, dev, download)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, "init"))
        model = model_from_spec(spec)
    model.to(dev)
    optimizer = config.make_optimizer(model.parameters())
    run = _Run(model, optimizer, running=torch.zeros((), device=dev))
    if previous is not None:
        _restore(previous, run, data, math.ceil(len(data.labels) / config.batch_size), out, dev)
    resumed_from = (run.epoch, run.batch) if previous is not None else None
    start_epoch, wall_before = run.epoch, run.wall
    _loop(run, data, config, spec, out, save_every, progress)
    return TrainResult(out, "resumed" if previous else "trained", run.epoch, run.metrics, run.wall,
                       resumed_from, epochs_run=run.epoch - start_epoch, session_time=run.wall - wall_before)


@dataclass
class _Data:
    indices: torch.Tensor
    labels: torch.Tensor
    inputs_hash: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass
class _Run:
    """The training state that a checkpoint holds: position (``batch`` minibatches into epoch
    ``epoch + 1``), weights, optimizer, the epoch's running loss sum, history and time spent."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    running: torch.Tensor
    epoch: int = 0
    batch: int = 0
    history: list = dataclasses.field(default_factory=list)
    metrics: dict = dataclasses.field(default_factory=dict)
    wall: float = 0.0


def _training_data(config: TrainConfig, spec, dev, download: bool) -> _Data:
    strict = config.data_dir is not None   # an explicit --data-dir must hold the data
    train_split = load_split(config.dataset, True, config.data_dir, download, strict=strict)
    test_split = load_split(config.dataset, False, config.data_dir, download, strict=strict)
    _check_sizes(config, len(train_split), len(test_split))
    indices = subset_indices(len(train_split), config.train_size, config.seed)
    labels = randomize_labels(train_split.y[indices], config.random_ratio, spec["args"]["num_classes"], config.seed)
    test_idx = subset_indices(len(test_split), config.test_size, config.seed, "test-subset")
    x = train_split.inputs(indices)
    return _Data(indices, labels, tensor_hash(x), x.to(dev), labels.to(dev),
                 test_split.inputs(test_idx).to(dev), test_split.y[test_idx].to(dev))


def _loop(run: _Run, data: _Data, config: TrainConfig, spec, out: Path, save_every: float,
          progress: ProgressFn) -> None:
    """The epochs from ``run``'s position on; saves as ``train`` describes."""
    n = len(data.y_train)
    batches = math.ceil(n / config.batch_size)
    start, wall_before = time.perf_counter(), run.wall
    saved = (run.epoch, run.batch)
    last_save = time.monotonic()

    def save() -> None:
        nonlocal saved, last_save
        run.wall = wall_before + time.perf_counter() - start
        _save(out, config, spec, run, data)
        saved, last_save = (run.epoch, run.batch), time.monotonic()

    consistent = True
    try:
        with interrupt.deferred():
            while run.epoch < config.epochs:
                consistent = False
                _train_epoch(run, data, config, batches, progress)
                consistent = True
                run.metrics = _epoch_metrics(run, data, n, spec)
                run.history.append(dict(run.metrics, epoch=run.epoch + 1))
                run.epoch, run.batch = run.epoch + 1, 0
                run.running = torch.zeros_like(run.running)
                stop = config.reached_stop_loss(run.metrics)
                if (run.epoch == config.epochs or stop or _nonfinite(run.metrics)
                        or time.monotonic() - last_save >= save_every):
                    save()
                report(progress, "epoch", run.epoch, config.epochs, loss=run.metrics["epoch_loss"],
                       train_acc=run.metrics["train_acc"], test_acc=run.metrics["test_acc"],
                       diverged=True if run.metrics.get("diverged") else None)
                if _nonfinite(run.metrics):
                    raise NfmError(f"training diverged at epoch {run.epoch} (loss is NaN/inf); the checkpoint "
                                   "records it; try a smaller --lr", out)
                if stop:
                    break
                _check_signal()
    except _StopRequested as stop:
        if (run.epoch, run.batch) != saved:
            save()
        raise interrupt.Interrupted(stop.signum, _describe_position(run, batches, out)) from None
    except BaseException:
        if consistent and (run.epoch, run.batch) != saved and not _nonfinite(run.metrics):
            try:
                save()
            except NfmError:
                pass
        raise
    run.wall = wall_before + time.perf_counter() - start


class _StopRequested(Exception):
    def __init__(self, signum: int):
        self.signum = signum


def _train_epoch(run: _Run, data: _Data, config: TrainConfig, batches: int, progress: ProgressFn) -> None:
    """Minibatches ``run.batch``.. of epoch ``run.epoch + 1``; stops early (raising ``_StopRequested``)
    between two minibatches when a signal is pending, with ``run`` consistent."""
    dev = data.y_train.device
    run.model.train()
    order = torch.randperm(len(data.y_train), generator=keyed_generator(config.seed, "epoch", run.epoch)).to(dev)
    for b in range(run.batch, batches):
        idx = order[b * config.batch_size:(b + 1) * config.batch_size]
        loss = F.cross_entropy(run.model(data.x_train[idx]), data.y_train[idx])
        lr = config.warmup_lr(run.epoch, b, batches)
        if lr is not None:
            for group in run.optimizer.param_groups:
                group["lr"] = lr
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        run.running += loss.detach() * len(idx)
        run.batch = b + 1
        report(progress, "batch", b + 1, batches, epoch=run.epoch + 1, epochs=config.epochs)
        _check_signal()


def _check_signal() -> None:
    signum = interrupt.take()
    if signum is not None:
        raise _StopRequested(signum)


def _epoch_metrics(run: _Run, data: _Data, n: int, spec: dict[str, Any]) -> dict[str, Any]:
    metrics = _evaluate(run.model, data.x_train, data.y_train, data.x_test, data.y_test)
    metrics["epoch_loss"] = float(run.running) / n
    limit = DIVERGENCE_FACTOR * math.log(spec["args"]["num_classes"])
    return _flag_divergence(metrics, run.history, run.epoch + 1, limit)


def _flag_divergence(metrics: dict[str, Any], history: list[dict], epoch: int, limit: float) -> dict[str, Any]:
    """Mark a diverged run in its metrics: a non-finite number (stored as null), or a training loss
    above ``limit`` (``DIVERGENCE_FACTOR`` x ln K, i.e. far worse than a uniform guess). Once
    flagged, the run stays flagged (``diverged_epoch`` is the first such epoch)."""
    metrics = {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}
    earlier = next((h.get("diverged_epoch") for h in history if h.get("diverged")), None)
    blown = any(v is None for v in metrics.values()) or any(
        metrics.get(k) is not None and metrics[k] > limit for k in ("epoch_loss", "train_loss"))
    if earlier is not None or blown:
        metrics["diverged"] = True
        metrics["diverged_epoch"] = earlier if earlier is not None else epoch
    return metrics


def _nonfinite(metrics: dict[str, Any]) -> bool:
    """A loss came out NaN/inf (stored as null): training cannot go on."""
    return bool(metrics.get("diverged")) and any(metrics.get(k) is None for k in ("epoch_loss", "train_loss"))


def _check_sizes(config: TrainConfig, n_train: int, n_test: int) -> None:
    """--train-size / --test-size larger than the split are refused (never silently capped)."""
    for option, size, n, split in (("--train-size", config.train_size, n_train, "training"),
                                   ("--test-size", config.test_size, n_test, "test")):
        if size is not None and size > n:
            raise NfmError(f"{option} {size} is more than the {n} samples of the {config.dataset} {split} "
                           "split; leave it out to use them all")


def _describe_position(run: _Run, batches: int, out: Path) -> str:
    where = f"{run.epoch} epochs" + (f" and {run.batch}/{batches} batches of the next" if run.batch else "")
    return f"saved {where} to {out}"


@torch.no_grad()
def _evaluate(model, x_train, y_train, x_test, y_test) -> dict[str, float]:
    model.eval()
    result, counts = {}, {}
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        loss_sum, correct = 0.0, 0
        for start in range(0, len(y), EVAL_BATCH):
            logits = model(x[start:start + EVAL_BATCH])
            target = y[start:start + EVAL_BATCH]
            loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
            correct += int((logits.argmax(1) == target).sum())
        result[f"{split}_loss"] = loss_sum / len(y)
        result[f"{split}_acc"] = correct / len(y)
        counts[split] = (correct, len(y))
    result["gap"] = accuracy_gap(*counts["train"], *counts["test"])
    return result


def accuracy_gap(train_correct: int, n_train: int, test_correct: int, n_test: int) -> float:
    """train accuracy - test accuracy, computed exactly and rounded once (1.0 - 0.774 is 0.226, not
    the 0.22599999999999998 a float subtraction gives)."""
    return float(Fraction(train_correct, n_train) - Fraction(test_correct, n_test))


def _previous_run(out: Path, config: TrainConfig) -> dict[str, Any]:
    art = read_artifact(out, ("checkpoint", "hessian-diag", "measures"))
    if art.kind != "checkpoint":
        raise NfmError(f"exists and is a {art.kind} file, not a checkpoint; choose another --out", out)
    old = art.require("config", dict)
    new = config.identity()
    defaults = TrainConfig().to_json()  # fields added later: a checkpoint without them used the default
    diff = [k for k in new if old.get(k, defaults[k]) != new[k]]
    if diff:
        k = diff[0]
        raise NfmError(f"exists with another config ({k}: {old.get(k)!r} there, {new[k]!r} now); "
                       "use --force to overwrite it or choose another --out", out)
    prog = art.require("progress", dict)
    if prog.get("epochs_done", 0) > config.epochs:
        raise NfmError(f"already has {prog['epochs_done']} epochs, more than --epochs {config.epochs}; "
                       "use --force to retrain or choose another --out", out)
    inside = prog.get("batches_done", 0)
    if not isinstance(inside, int) or isinstance(inside, bool) or inside < 0:
        raise NfmError("checkpoint has a malformed nfm.progress.batches_done entry", out)
    if inside and prog.get("epochs_done", 0) >= config.epochs:
        raise NfmError(f"is partway through epoch {prog.get('epochs_done', 0) + 1}, beyond --epochs "
                       f"{config.epochs}; give --epochs {prog.get('epochs_done', 0) + 1} or more, or --force", out)
    if (art.meta.get("metrics") or {}).get("diverged"):
        raise NfmError("holds a run that diverged; use --force to retrain it", out)
    return {"art": art, "progress": prog, "metrics": art.meta.get("metrics") or {},
            "history": art.meta.get("history") or [], "wall_time": float(art.meta.get("wall_time") or 0.0),
            "optimizer": art.require("optimizer", dict)}


def _restore(previous, run: _Run, data: _Data, batches: int, out: Path, dev) -> None:
    art = previous["art"]
    if art.meta.get("data", {}).get("inputs_sha256") != data.inputs_hash:
        raise NfmError("exists but was trained on other input data (dataset files changed?); "
                       "use --force or another --out", out)
    if not (torch.equal(art.tensor("data.indices"), data.indices)
            and torch.equal(art.tensor("data.labels"), data.labels)):
        raise NfmError("exists but its training data differs from what this config draws "
                       "(dataset files changed?); use --force or another --out", out)
    try:
        run.model.load_state_dict({k[6:]: v for k, v in art.tensors.items() if k.startswith("model.")})
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, tensor in art.tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = tensor
        run.optimizer.load_state_dict({"state": state, "param_groups": previous["optimizer"]["param_groups"]})
    except (RuntimeError, ValueError, KeyError) as exc:
        raise NfmError(f"cannot resume from it: {str(exc).splitlines()[0][:120]}; use --force", out) from None
    run.model.to(dev)
    run.epoch, run.batch = previous["progress"]["epochs_done"], previous["progress"].get("batches_done", 0)
    if run.batch >= batches:
        raise NfmError(f"records {run.batch} minibatches into an epoch of {batches} (corrupt file?); use --force", out)
    if run.batch:
        run.running = art.tensor(RUNNING_LOSS).to(dev)
    run.history, run.wall, run.metrics = list(previous["history"]), previous["wall_time"], dict(previous["metrics"])


def _save(out: Path, config: TrainConfig, spec, run: _Run, data: _Data) -> None:
    tensors = {f"model.{k}": v for k, v in run.model.state_dict().items()}
    tensors["data.indices"] = data.indices
    tensors["data.labels"] = data.labels
    opt = run.optimizer.state_dict()
    for idx, state in opt["state"].items():
        for name, value in state.items():
            tensors[f"optim.{idx}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    complete = run.batch == 0 and (run.epoch >= config.epochs or config.reached_stop_loss(run.metrics))
    progress = {"epochs_done": run.epoch, "epochs": config.epochs, COMPLETE: complete}
    if run.batch:  # saved inside an epoch: the position in it and the epoch's loss sum so far
        progress["batches_done"] = run.batch
        tensors[RUNNING_LOSS] = run.running
    from nfm_cli import __version__
    meta = {
        "config": config.to_json(),
        "model": spec,
        "progress": progress,
        "metrics": dict(run.metrics, random_ratio=config.random_ratio),
        "history": run.history,
        "optimizer": {"name": config.optimizer, "param_groups": opt["param_groups"]},
        "wall_time": run.wall,
        "data": {"inputs_sha256": data.inputs_hash, "samples": len(data.labels)},
        "version": __version__,
    }
    write_artifact(out, tensors, "checkpoint", meta)
