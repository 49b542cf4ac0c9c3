"""``nfm import``: turn a model trained elsewhere (code + weights + data) into an ordinary checkpoint.

The checkpoint holds what ``nfm train`` writes (``model.*`` tensors, ``data.indices``, ``data.labels``,
metadata ``config``, ``model``, ``progress`` (complete), ``metrics``, ``data``), so every later step works
on it unchanged, plus ``source`` = {"kind": "import", "model", "model_args", "code", "weights", "data",
"labels"}: where weights, code and data came from, with their SHA-256 content hashes. The model entry
is ``{"name": SOURCE, "args": MODEL_ARGS, "num_classes": K, "code": ...}`` and the config names the data
(``dataset`` = the spec text, ``data_spec`` = the spec and its preprocessing), the seed and the subsets.
At import the train and test loss and accuracy are evaluated (eval mode), so ``report`` has the gap.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nfm_cli.data.datasets import subset_indices
from nfm_cli.data.specs import DataSpec, content_record, load_spec_split, parse_data_spec
from nfm_cli.errors import NfmError
from nfm_cli.runtime.devices import resolve_device
from nfm_cli.runtime.files import file_sha256, read_safetensors
from nfm_cli.runtime.progress import ProgressFn, report
from nfm_cli.steps.train import _evaluate
from nfm_cli.store.artifacts import COMPLETE, read_artifact, write_artifact
from nfm_cli.store.checkpoint import tensor_hash
from nfm_cli.store.model_source import build_model, code_record, parse_model_args
from nfm_cli.store.weights import match_state_dict, read_state_dict


@dataclass
class ImportConfig:
    """``nfm import``'s inputs (paths as given; ``model_args`` as KEY=VALUE strings)."""

    model: str
    weights: str
    data: str
    model_args: list[str] = field(default_factory=list)
    train_size: int | None = None
    test_size: int | None = None
    seed: int = 0
    labels: str | None = None
    resize: int | None = None
    crop: int | None = None
    normalize: str | None = None
    data_dir: str | None = None     # where a registered dataset's files are (as nfm train --data-dir)


@dataclass
class ImportResult:
    path: Path
    metrics: dict[str, Any]
    source: dict[str, Any]
    num_classes: int
    samples: int


def import_checkpoint(config: ImportConfig, out: str | os.PathLike, *, device: str = "auto",
                      force: bool = False, progress: ProgressFn = None) -> ImportResult:
    """Build the model, load the weights (no code from the weights file runs), load the data, evaluate,
    and write a checkpoint to ``out``. Every problem is an ``NfmError``; nothing is written then."""
    out = Path(out)
    _check_out(out, force)
    for name in ("train_size", "test_size"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise NfmError(f"--{name.replace('_', '-')} must be a positive integer, not {value}")
    args = parse_model_args(config.model_args)
    spec = parse_data_spec(config.data, config.resize, config.crop, config.normalize)
    code = code_record(config.model)
    model = build_model({"name": config.model, "args": args})
    weights_path = Path(config.weights)
    state = read_state_dict(weights_path)
    tensors, stripped = match_state_dict(model, state.tensors, weights_path)
    model.load_state_dict(tensors)
    model.eval()
    if config.data_dir and spec.kind != "registered":
        raise NfmError("--data-dir applies to registered datasets; tensors: and imagefolder: name their own path")
    train_split, test_split = (load_spec_split(spec, split, config.data_dir) for split in (True, False))
    indices = subset_indices(len(train_split), config.train_size, config.seed)
    test_idx = subset_indices(len(test_split), config.test_size, config.seed, "test-subset")
    num_classes = _num_classes(model, train_split.x[:1], config.model)
    labels, labels_record = _labels(config.labels, train_split.y, indices, num_classes)
    _check_labels(test_split.y, num_classes, f"the test labels of {spec.text}")
    report(progress, "import", 0, 1, step="evaluate")  # every input is checked by now: no bar before an error
    dev = resolve_device(device)
    model.to(dev)
    x_train = train_split.x[indices]
    metrics = _evaluate(model, x_train.to(dev), labels.to(dev), test_split.x[test_idx].to(dev),
                        test_split.y[test_idx].to(dev))
    metrics["random_ratio"] = 0.0 if config.labels is None else None
    model.to("cpu")
    source = {"kind": "import", "model": config.model, "model_args": args, "code": code,
              "weights": {"path": str(weights_path.resolve()), "sha256": state.sha256, "format": state.format,
                          "wrapper": state.wrapper, "prefix_stripped": stripped or None},
              "data": content_record(spec), "labels": labels_record}
    _write(out, config, spec, args, code, num_classes, model, indices, labels, metrics, source,
           tensor_hash(x_train))
    report(progress, "import", 1, 1, step="written")
    return ImportResult(out, metrics, source, num_classes, len(labels))


def _check_out(out: Path, force: bool) -> None:
    if out.is_dir():
        raise NfmError("output path is a directory; give a file name such as model.safetensors", out)
    if not (out.parent if str(out.parent) else Path(".")).is_dir():
        raise NfmError(f"output folder {str(out.parent)!r} does not exist; create it first", out)
    if out.exists() and not force:
        try:
            kind = read_artifact(out).kind
        except NfmError:
            kind = "file that is not an nfm artifact"
        raise NfmError(f"exists (a {kind}); use --force to overwrite it or choose another --out", out)


def _num_classes(model: torch.nn.Module, example: torch.Tensor, source: str) -> int:
    """Classes = width of the logits on one training input (also checks that the input shape fits)."""
    try:
        with torch.no_grad():
            logits = model(example)
    except Exception as exc:  # the data does not fit the model
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise NfmError(f"model {source} cannot take the data's inputs of shape {tuple(example.shape[1:])}: "
                       f"{first}; check --data preprocessing (--resize, --crop) or --model-arg") from None
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[1] < 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise NfmError(f"model {source} must return logits [batch, classes] for a classifier, it returned {shape}")
    return int(logits.shape[1])


def _labels(labels_path: str | None, dataset_labels: torch.Tensor, indices: torch.Tensor,
            num_classes: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """The labels trained on: the dataset's, or ``--labels FILE`` (one int64 label per training sample)."""
    if labels_path is None:
        labels = dataset_labels[indices]
        _check_labels(labels, num_classes, "the training labels")
        return labels, {"from": "dataset"}
    path = Path(labels_path)
    found = read_safetensors(path)
    if len(found) != 1:
        raise NfmError(f"--labels file must hold one tensor (an int64 vector), it holds {len(found)}", path)
    (name, vector), = found.items()
    if vector.dtype != torch.int64 or vector.ndim != 1 or len(vector) != len(dataset_labels):
        raise NfmError(f"--labels tensor {name!r} must be an int64 vector of {len(dataset_labels)} labels (one per "
                       f"training sample, in the dataset's order), not {vector.dtype} {tuple(vector.shape)}", path)
    labels = vector[indices]
    _check_labels(labels, num_classes, f"--labels {path}")
    changed = float((labels != dataset_labels[indices]).double().mean())
    return labels, {"from": "file", "path": str(path.resolve()), "sha256": file_sha256(path),
                    "changed_fraction": changed}


def _check_labels(labels: torch.Tensor, num_classes: int, what: str) -> None:
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise NfmError(f"{what} range over [{int(labels.min())}, {int(labels.max())}] but the model has "
                       f"{num_classes} outputs; check --model-arg num_classes")


def _write(out, config: ImportConfig, spec: DataSpec, args, code, num_classes, model, indices, labels,
           metrics, source, inputs_hash) -> None:
    from nfm_cli import __version__

    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors["data.indices"] = indices
    tensors["data.labels"] = labels
    run_config = {"model": config.model, "dataset": spec.text, "data_spec": spec.to_json(), "seed": config.seed,
                  "train_size": config.train_size, "test_size": config.test_size, "data_dir": config.data_dir,
                  "random_ratio": metrics["random_ratio"], "source": "import"}
    meta = {"config": run_config,
            "model": {"name": config.model, "args": args, "num_classes": num_classes, "code": code},
            "progress": {COMPLETE: True, "imported": True},
            "metrics": metrics, "history": [], "wall_time": 0.0,
            "data": {"inputs_sha256": inputs_hash, "samples": len(labels)},
            "source": source, "version": __version__}
    write_artifact(out, tensors, "checkpoint", meta)
