"""nfm_cli.store.train_config: the run fields declared once, and what is derived from them, checked
against the places that consume them (the train command's parser, the sweep's parser, real measures
files, report's protocol axes and CSV)."""
import dataclasses
import inspect
import typing

import pytest

import nfm_cli.steps.train as train_step
from nfm_cli.cli.train_cmd import train_command
from nfm_cli.errors import NfmError
from nfm_cli.report.correlations import add_protocol, correlation_table, csv_columns, load_runs
from nfm_cli.steps.sweep import parse_values
from nfm_cli.steps.train import TrainConfig
from nfm_cli.store.artifacts import read_metadata
from nfm_cli.store.checkpoint import load_checkpoint
from nfm_cli.store.train_config import (
    AXIS_FIELDS,
    GRID_FIELDS,
    LABEL_FIELDS,
    RESULT_FIELDS,
    TRAIN_DEFAULTS,
    TRAIN_FIELDS,
    TrainFields,
    field_type,
)
from tests.conftest import make_result, write_measures


def _option_type(name: str) -> tuple[type, bool]:
    """(int, float or str, None allowed) of ``nfm train``'s option ``name``, from the command's own
    annotations (a declaration independent of ``TrainFields``); choices and paths parse as text."""
    hint = typing.get_type_hints(train_command)[name]
    args = typing.get_args(hint) or (hint,)
    kind = next(a for a in args if a is not type(None))
    return (kind if kind in (int, float) else str), type(None) in args


def test_train_config_is_the_declared_fields():
    assert [f.name for f in dataclasses.fields(TrainConfig)] == list(TRAIN_FIELDS)
    assert dataclasses.asdict(TrainConfig()) == TRAIN_DEFAULTS
    assert set(TrainConfig.NON_IDENTITY) == {"epochs", "data_dir"}


def test_train_command_has_each_field_as_an_option_of_its_type():
    """Each field is an ``nfm train`` option of the field's value type (None allowed alike)."""
    options = inspect.signature(train_command).parameters
    for name in TRAIN_FIELDS:
        assert name in options, f"TrainFields.{name} has no nfm train option"
        assert _option_type(name) == field_type(name), name


def _captured_config(cli, monkeypatch, tmp_path, *args) -> TrainConfig:
    seen = []

    def fake_train(config, out, **kwargs):
        seen.append(config)
        raise NfmError("stopped by the test")

    monkeypatch.setattr(train_step, "train", fake_train)
    res = cli("train", "--out", tmp_path / "run.safetensors", *args)
    assert res.code == 1 and "stopped by the test" in res.err and len(seen) == 1
    return seen[0]


def test_train_command_defaults_and_options_reach_the_config(cli, monkeypatch, tmp_path):
    """No options: exactly the dataclass defaults. Every option set to a non-default value: that
    value lands in its own field (a swapped or dropped option fails)."""
    assert _captured_config(cli, monkeypatch, tmp_path) == TrainConfig()
    values = dict(model="lenet", dataset="cifar10", seed=7, width=3, depth=2, random_ratio=0.25, train_size=11,
                  epochs=5, batch_size=9, lr=0.5, optimizer="sgd", momentum=0.75, weight_decay=0.125,
                  stop_at_loss=0.0625, test_size=13, data_dir=str(tmp_path), warmup_epochs=3)
    assert set(values) == set(TRAIN_FIELDS)
    args = [a for name, value in values.items() for a in (f"--{name.replace('_', '-')}", str(value))]
    assert _captured_config(cli, monkeypatch, tmp_path, *args) == TrainConfig(**values)


@pytest.mark.parametrize("name", GRID_FIELDS)
def test_sweep_parses_each_grid_field_as_the_train_command_does(name):
    """A grid value typed as the train command's parser types it (``"3"`` -> 3, 3.0 or ``"3"``)."""
    expected = _option_type(name)[0]("3")
    (got,) = parse_values(name, "3")
    assert got == expected and type(got) is type(expected)
    if TrainFields.__dataclass_fields__[name].default is None:
        assert parse_values(name, "none") == [None]


def test_measures_file_carries_the_result_fields(tiny_checkpoint, tiny_measures):
    """Each result field is copied from the checkpoint's config; random_ratio comes from its metrics."""
    ck = load_checkpoint(tiny_checkpoint)
    metrics = read_metadata(tiny_measures, "measures").meta["result"]["metrics"]
    for name in RESULT_FIELDS:
        assert metrics[name] == ck.config[name], name
    assert metrics["random_ratio"] == ck.metrics["random_ratio"] == 0.3
    assert "data_dir" not in metrics


def test_protocol_axes_are_the_varying_hyperparameters(tmp_path):
    """Runs varying in weight decay, width and the test size over two seeds: the first two are axes,
    the test size (how a run is evaluated) and the seed are not."""
    paths = []
    for i, (wd, width, test_size, seed) in enumerate([(0.0, 8, 100, 0), (0.1, 8, 200, 0), (0.0, 16, 100, 1),
                                                      (0.1, 16, 200, 1)]):
        result = make_result(0.1 + 0.1 * i, 0.0, seed=seed, normalized_sharpness=1.0 + i)
        result["metrics"].update(weight_decay=wd, width=width, test_size=test_size)
        paths.append(write_measures(tmp_path / f"run{i}.safetensors", result))
    runs, skipped = load_runs(paths)
    assert not skipped
    (entry,) = add_protocol(correlation_table(runs, ["normalized_sharpness"], group_by=()), runs,
                            ["normalized_sharpness"], group_by=(), bootstrap=0)
    assert entry["axes"] == ["width", "weight_decay"]


def test_derived_lists_keep_the_orders_of_before():
    """The refactoring kept report's CSV label columns, the protocol axes and the copied fields (these
    lists were written out by hand before the fields were declared once)."""
    assert LABEL_FIELDS == ("model", "dataset", "seed", "train_size", "epochs", "optimizer")
    assert AXIS_FIELDS == ("model", "dataset", "width", "depth", "random_ratio", "train_size", "epochs",
                           "batch_size", "lr", "optimizer", "momentum", "weight_decay", "stop_at_loss",
                           "warmup_epochs")   # warmup_epochs: new with vit-tiny (issue 21)
    assert set(RESULT_FIELDS) == {"model", "dataset", "seed", "train_size", "test_size", "epochs", "width", "depth",
                                  "lr", "batch_size", "optimizer", "momentum", "weight_decay", "stop_at_loss",
                                  "warmup_epochs"}
    # the estimator column (issue 20: Hessian and Gauss-Newton runs told apart) follows the labels
    assert csv_columns([])[-len(LABEL_FIELDS) - 2:] == [*LABEL_FIELDS, "estimator", "path"]
