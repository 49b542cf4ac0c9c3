"""Checkpoints: the model's weights, the exact training data, optimizer state and metrics in one file.

Tensors: ``model.<state_dict key>``, ``data.indices`` (subset of the training split, int64),
``data.labels`` (labels actually trained on, random ones included), ``optim.<i>.<key>`` (Adam state
per parameter index). Metadata (JSON): ``config`` (the training config), ``model`` (registry name and
constructor arguments), ``progress`` (epochs done), ``metrics`` (accuracies, gap, losses),
``history`` (per-epoch metrics), ``optimizer`` (param groups), ``wall_time``.
Randomness is keyed by (seed, purpose, epoch), so (seed, epochs done) is the whole RNG state.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nfm_cli.data.datasets import Split, check_data_dir, subset_indices
from nfm_cli.data.specs import DataSpec, load_spec_split
from nfm_cli.errors import NfmError
from nfm_cli.store.artifacts import Artifact, is_complete, read_artifact
from nfm_cli.store.model_source import build_model


@dataclass
class Checkpoint:
    """A validated checkpoint with its rebuilt model (eval mode)."""

    path: Path
    artifact: Artifact
    model: nn.Module
    config: dict[str, Any]
    model_spec: dict[str, Any]
    metrics: dict[str, Any]
    progress: dict[str, Any]
    indices: torch.Tensor
    labels: torch.Tensor
    data_dir: str | None = None
    dtype: torch.dtype = torch.float32
    data_dir_given: bool = False  # data_dir came from the user (--data-dir): the data must be there
    _split_cache: dict = field(default_factory=dict, repr=False)

    @property
    def sha256(self) -> str:
        return self.artifact.sha256

    @property
    def complete(self) -> bool:
        return is_complete(self.progress)

    @property
    def num_classes(self) -> int:
        return int(self.model_spec.get("num_classes") or self.model_spec["args"]["num_classes"])

    @property
    def data_spec(self) -> DataSpec:
        """What the training data is: a registered dataset (``nfm train``) or an imported spec."""
        recorded = self.config.get("data_spec")
        if recorded is None:
            return DataSpec("registered", self.config["dataset"])
        return DataSpec.from_json(recorded, self.path)

    def _split(self, train: bool) -> Split:
        if train not in self._split_cache:
            try:
                self._split_cache[train] = load_spec_split(self.data_spec, train, self.data_dir,
                                                           strict=self.data_dir_given)
            except NfmError as err:
                raise NfmError(f"{err} (needed by checkpoint {self.path})") from None
        return self._split_cache[train]

    def training_tensors(self, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """The training inputs, preprocessed as in training, and the labels exactly as trained on.
        The files are read and the inputs checked against the recorded hash once per ``Checkpoint``."""
        cached = self._training_inputs()
        x = as_precision(cached, device, self.dtype)
        return (x.clone() if x is cached else x), self.labels.to(device)  # callers may change their copy

    def _training_inputs(self) -> torch.Tensor:
        if "train-inputs" in self._split_cache:
            return self._split_cache["train-inputs"]
        split = self._split(True)
        if int(self.indices.max()) >= len(split):
            raise NfmError(f"checkpoint indexes sample {int(self.indices.max())} but the "
                           f"{self.config['dataset']} training split has {len(split)}", self.path)
        x = split.inputs(self.indices)
        recorded = (self.artifact.meta.get("data") or {}).get("inputs_sha256")
        if recorded is not None and recorded != tensor_hash(x):
            raise NfmError(f"the {self.config['dataset']} files found now differ from those it was trained on "
                           "(another copy or version of the dataset?); point --data-dir at the original files",
                           self.path)
        self._split_cache["train-inputs"] = x
        return x

    def test_tensors(self, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """The test split (or its seeded subset, as used for the test accuracy)."""
        split = self._split(False)
        idx = subset_indices(len(split), self.config.get("test_size"), self.config["seed"], "test-subset")
        return as_precision(split.inputs(idx), device, self.dtype), split.y[idx].to(device)


def as_precision(x: torch.Tensor, device: str | torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Inputs on ``device``, float ones in the measuring ``dtype``; integer ones (token ids) stay integers."""
    return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device=device)


def tensor_hash(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (CPU, contiguous): the fingerprint of the training inputs."""
    import hashlib
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def model_from_spec(spec: dict[str, Any]) -> nn.Module:
    """The architecture a checkpoint's ``model`` entry names (``model_source.build_model``)."""
    return build_model(spec)


def load_checkpoint(path: str | os.PathLike, data_dir: str | os.PathLike | None = None,
                    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Checkpoint:
    """Read, validate and rebuild a checkpoint; raises ``NfmError`` naming the file for any problem.

    ``data_dir`` overrides the folder recorded at training time when the data is needed.
    ``dtype=torch.float64`` gives a float64 model and inputs (for measurements at full precision).
    """
    check_data_dir(data_dir)
    art = read_artifact(path, "checkpoint")
    return checkpoint_from_artifact(art, data_dir, device, dtype)


def checkpoint_from_artifact(art: Artifact, data_dir=None, device="cpu", dtype=torch.float32) -> Checkpoint:
    """Validate an already read checkpoint artifact and rebuild its model (see ``load_checkpoint``)."""
    path = art.path
    config = art.require("config", dict)
    spec = art.require("model", dict)
    progress = art.require("progress", dict)
    metrics = art.meta.get("metrics") or {}
    if not isinstance(spec.get("name"), str) or not isinstance(spec.get("args"), dict):
        raise NfmError("checkpoint has a malformed model entry", path)
    for key in ("dataset", "seed"):
        if key not in config:
            raise NfmError(f"checkpoint config lacks {key!r}", path)
    try:
        model = model_from_spec(spec)
    except NfmError as err:  # an unknown model name or code that is gone: say which file names it
        hint = "" if ":" in spec["name"] else " (corrupt file or a newer nfm?)"
        raise NfmError(f"{err.message}{hint}", path) from None
    except (TypeError, ValueError) as exc:
        raise NfmError(f"cannot rebuild model {spec.get('name')!r}: {exc}", path) from None
    state = {k[len("model."):]: v for k, v in art.tensors.items() if k.startswith("model.")}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing tensors {missing[:3]}" if missing else f"unexpected tensors {unexpected[:3]}"
        raise NfmError(f"weights do not match model {spec['name']!r}: {what}", path)
    for key, ref in expected.items():
        got = state[key]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            raise NfmError(f"tensor model.{key} has shape {tuple(got.shape)} {got.dtype}, model "
                           f"{spec['name']!r} needs {tuple(ref.shape)} {ref.dtype}", path)
        if got.is_floating_point() and not torch.isfinite(got).all():
            raise NfmError(f"tensor model.{key} contains NaN or inf (training diverged?); "
                           "this checkpoint cannot be measured", path)
    model.load_state_dict(state)
    model.eval().to(device=device, dtype=dtype)
    indices, labels = art.tensor("data.indices"), art.tensor("data.labels")
    k = spec.get("num_classes", spec["args"].get("num_classes", 0))
    if not isinstance(k, int) or isinstance(k, bool):
        raise NfmError("checkpoint has a malformed model.num_classes entry", path)
    if (indices.dtype != torch.int64 or labels.dtype != torch.int64 or indices.ndim != 1
            or labels.shape != indices.shape):
        raise NfmError("data.indices / data.labels must be int64 vectors of the same length", path)
    if len(labels) == 0:
        raise NfmError("checkpoint has an empty training set", path)
    if int(labels.min()) < 0 or int(labels.max()) >= k or int(indices.min()) < 0:
        raise NfmError(f"data.labels outside [0, {k}) or negative data.indices (corrupt file)", path)
    for name, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise NfmError(f"metric {name} is {value} (training diverged?)", path)
    return Checkpoint(path, art, model, config, spec, metrics, progress, indices, labels,
                      str(data_dir) if data_dir else config.get("data_dir"), dtype,
                      data_dir_given=data_dir is not None)
