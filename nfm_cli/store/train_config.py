"""The fields of a training run (``nfm train``'s config, as its checkpoint records it), declared once.

``TrainFields`` holds the fields, types and defaults of ``steps.train.TrainConfig`` (which adds the
checks and the optimizer, and imports torch); this module imports no torch, so the command line, the
sweep and ``report`` read it freely. Everything else about run fields is derived from
``dataclasses.fields(TrainFields)``, in declaration order:

* ``TRAIN_DEFAULTS``: ``nfm train``'s option defaults;
* ``GRID_FIELDS`` and ``field_type``: what ``nfm sweep`` grids may vary, and how their values parse;
* ``RESULT_FIELDS``: the run fields copied into every measures file (``steps.solve``);
* ``AXIS_FIELDS``: the hyperparameter axes of ``report --protocol`` (Jiang et al. 2020);
* ``LABEL_FIELDS``: the run labels ``report`` groups by and writes as CSV columns;
* ``NON_IDENTITY``: the fields a resumed run may change.

A field's ``metadata`` gives its roles (``_field``): by default a field is a grid field, a result
field, an axis and part of the run's identity, but not a label. Adding a field: one ``_field`` line
here, its use in ``steps.train``, its option in ``cli/train_cmd.py``, and tests.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from types import NoneType
from typing import Any


def _field(default: Any, *, grid: bool = True, result: bool = True, axis: bool = True, label: bool = False,
           identity: bool = True) -> Any:
    """A field and its roles: ``grid`` (a sweep may vary it), ``result`` (copied into measures files),
    ``axis`` (a protocol axis), ``label`` (a report label: kept as text, a CSV column, a group-by
    choice), ``identity`` (a resumed run must have the same value)."""
    return dataclasses.field(default=default, metadata={"grid": grid, "result": result, "axis": axis,
                                                        "label": label, "identity": identity})


@dataclass
class TrainFields:
    """Everything that determines the trained weights (``data_dir`` only says where the data is)."""

    model: str = _field("mlp", label=True)
    dataset: str = _field("fashion-mnist", label=True)
    seed: int = _field(0, grid=False, axis=False, label=True)      # seeds repeat a run (sweep --seeds)
    width: int | None = _field(None)
    depth: int | None = _field(None)
    random_ratio: float = _field(0.0, result=False)   # measures files take it from the run's metrics
    train_size: int | None = _field(None, label=True)
    epochs: int = _field(50, label=True, identity=False)   # may be raised on resuming
    batch_size: int = _field(128)
    lr: float = _field(1e-3)
    optimizer: str = _field("adam", label=True)
    momentum: float = _field(0.0)
    weight_decay: float = _field(0.0)
    stop_at_loss: float | None = _field(None)
    test_size: int | None = _field(None, axis=False)   # how the run is evaluated, not trained
    data_dir: str | None = _field(None, result=False, axis=False, identity=False)   # where, not what
    warmup_epochs: int = _field(0)     # linear lr warm-up over the first E epochs (read as 0 from older files)


def _with(role: str) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(TrainFields) if f.metadata[role])


TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainFields))
TRAIN_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(TrainFields)}
GRID_FIELDS = _with("grid")
RESULT_FIELDS = _with("result")
AXIS_FIELDS = _with("axis")
LABEL_FIELDS = _with("label")
# what `report --group-by` accepts: the run labels and the estimator every measures file records
GROUP_FIELDS = (*LABEL_FIELDS, "estimator")
NON_IDENTITY = tuple(name for name in TRAIN_FIELDS if name not in _with("identity"))
_TYPES = typing.get_type_hints(TrainFields)


def field_type(name: str) -> tuple[type, bool]:
    """(``int``, ``float`` or ``str``, whether None is allowed) of field ``name``."""
    args = typing.get_args(_TYPES[name]) or (_TYPES[name],)
    return next(a for a in args if a is not NoneType), NoneType in args


def fields_of_type(kind: type) -> tuple[str, ...]:
    """The fields whose values are ``kind`` (or None)."""
    return tuple(name for name in TRAIN_FIELDS if field_type(name)[0] is kind)


OPTIONAL_FIELDS = tuple(name for name in TRAIN_FIELDS if field_type(name)[1])
