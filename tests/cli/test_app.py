"""The CLI layer: help, version, one-line errors, stdout/stderr discipline, inspect."""
import json
import re
import subprocess
import sys

import pytest

from tests.conftest import sha256_of


def test_version_help_and_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "nfm_cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("nfm ")
    helped = subprocess.run([sys.executable, "-m", "nfm_cli", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "train" in helped.stdout and "inspect" in helped.stdout


WORKFLOW_ORDER = ["train", "import", "measure", "report", "sweep", "hessian-diag", "solve-variance", "rescale",
                  "inspect"]


def test_bare_nfm_prints_the_help_in_workflow_order(cli):
    res = cli()
    assert res.code == 0 and res.err == ""
    rows = [re.search(rf"(?m)^\W+{re.escape(name)}\s\s", res.out) for name in WORKFLOW_ORDER]
    assert all(rows), res.out
    assert [row.start() for row in rows] == sorted(row.start() for row in rows), res.out


def _commands():
    import typer

    from nfm_cli.cli import app
    commands = typer.main.get_command(app).commands
    return {name: cmd for name, cmd in commands.items() if not cmd.hidden}   # sweep-worker: started by sweep


@pytest.mark.parametrize("command", WORKFLOW_ORDER)
def test_help_shows_no_type_after_flags(cli, command):
    res = cli(command, "--help")
    assert res.code == 0 and "--help" in res.out and "<bool>" not in res.out


def test_measure_takes_every_option_hessian_diag_has():
    commands = _commands()
    assert set(commands) == set(WORKFLOW_ORDER)
    options = {name: {o for p in cmd.params for o in p.opts} for name, cmd in commands.items()}
    missing = options["hessian-diag"] - {"--loss"} - options["measure"]
    assert not missing, missing
    for name in ("hessian-diag", "measure"):
        for shared in ("--data-dir", "--quiet", "--finite-diff-scale", "--device", "--seed"):
            assert shared in options[name]


def test_measure_passes_data_dir_and_finite_diff_scale_on(cli, tiny_checkpoint, tmp_path):
    """--finite-diff-scale reaches the estimator (recorded in the Hessian file), --data-dir is used."""
    out = tmp_path / "m.safetensors"
    res = cli("measure", tiny_checkpoint, "--out", out, "--estimator", "finite-diff", "--probes", "1",
              "--samples", "16", "--finite-diff-scale", "0.05", "--data-dir", tmp_path, "--quiet")
    assert res.code == 0, res.err
    assert res.out == f"{out}\n" and res.err == ""
    from nfm_cli.store.artifacts import read_artifact
    hdiag = read_artifact(tmp_path / "m.hdiag-normalized-ce.safetensors", "hessian-diag")
    assert hdiag.meta["config"]["finite_diff"]["scale"] == 0.05
    measures = read_artifact(out, "measures")
    assert measures.meta["config"]["finite_diff_scale"] == 0.05
    again = cli("measure", tiny_checkpoint, "--out", out, "--estimator", "finite-diff", "--probes", "1",
                "--samples", "16", "--finite-diff-scale", "0.2", "--data-dir", tmp_path, "--quiet")
    assert again.code == 1 and "other options" in again.err


def test_train_prints_only_the_path_on_stdout(cli, tmp_path):
    out = tmp_path / "run.safetensors"
    res = cli("train", "--dataset", "synthetic", "--width", "8", "--epochs", "1", "--train-size", "64",
              "--test-size", "32", "--random-ratio", "0.3", "--out", out, "--quiet")
    assert res.code == 0, res.err
    assert res.out == f"{out}\n"
    again = cli("train", "--dataset", "synthetic", "--width", "8", "--epochs", "1", "--train-size", "64",
                "--test-size", "32", "--random-ratio", "0.3", "--out", out)
    assert again.code == 0 and "already complete" in again.err


@pytest.mark.parametrize("args, fragment", [
    (["train", "--model", "vgg", "--out", "{tmp}/x.safetensors"], "'--model': 'vgg' is not one of 'lenet', 'mlp'"),
    (["train", "--random-ratio", "1.2", "--out", "{tmp}/x.safetensors"],
     "'--random-ratio': Input should be less than or equal to 1"),
    (["train", "--epochs", "0", "--out", "{tmp}/x.safetensors"],
     "'--epochs': Input should be greater than or equal to 1"),
    (["train", "--batch-size", "-3", "--out", "{tmp}/x.safetensors"], "'--batch-size': Input should be greater"),
    (["train", "--lr", "0", "--out", "{tmp}/x.safetensors"], "'--lr': 0.0 is not a positive finite number"),
    (["measure", "{tmp}/x.safetensors", "--tol", "-1"], "'--tol': -1.0 is not a positive finite number"),
    (["measure", "{tmp}/x.safetensors", "--precision", "float16"],
     "'--precision': 'float16' is not one of 'float32', 'float64'"),
    (["hessian-diag", "{tmp}/x.safetensors", "--out", "{tmp}/h", "--estimator", "lanczos"],
     "'--estimator': 'lanczos' is not one of"),
    (["solve-variance", "{tmp}/x.safetensors", "{tmp}/h", "-o", "{tmp}/m", "--json", "true"],
     "unexpected extra argument(s) (true)"),   # (measure takes many checkpoints: there "true" is one)
    (["train", "--dataset", "synthetic", "--out", "{tmp}/missing/x.safetensors"], "does not exist"),
    (["train", "--dataset", "cifar10", "--data-dir", "{tmp}", "--out", "{tmp}/x.safetensors"],
     "does not hold the cifar10"),
    (["train", "--epochs", "many", "--out", "{tmp}/x.safetensors"], "epochs"),
    (["inspect", "{tmp}/absent.safetensors"], "no such file"),
    (["inspect", "{tmp}"], "is a directory"),
    (["frobnicate"], "No such command"),
])
def test_bad_input_is_one_line_without_traceback(cli, tmp_path, args, fragment):
    res = cli(*[a.format(tmp=tmp_path) for a in args])
    assert res.code not in (0, 3), res.err
    lines = [l for l in res.err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("nfm: error: "), res.err
    assert fragment in lines[0]
    assert "Traceback" not in res.err and res.out == ""


def test_inspect_truncated_and_foreign_files(cli, tmp_path, tiny_checkpoint):
    data = tiny_checkpoint.read_bytes()
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    for path in (truncated, junk):
        res = cli("inspect", path)
        assert res.code == 1 and str(path) in res.err and "not a valid safetensors" in res.err
        assert len(res.err.strip().splitlines()) == 1
    import torch
    from safetensors.torch import save_file
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    res = cli("inspect", foreign)
    assert res.code == 1 and "not an nfm artifact" in res.err


def test_inspect_json_and_table(cli, tiny_checkpoint):
    res = cli("inspect", tiny_checkpoint, "--json")
    assert res.code == 0
    info = json.loads(res.out)
    assert info["kind"] == "checkpoint" and info["sha256"] == sha256_of(tiny_checkpoint)
    assert info["tensors"]["data.labels"] == {"dtype": "int64", "shape": [128]}
    assert info["meta"]["config"]["random_ratio"] == 0.3 and info["nonfinite_tensors"] == []
    table = cli("inspect", tiny_checkpoint)
    assert table.code == 0 and "checkpoint" in table.err and "data.labels" in table.err


@pytest.mark.integration
def test_debug_shows_the_traceback(tmp_path):
    res = subprocess.run([sys.executable, "-m", "nfm_cli", "--debug", "inspect", str(tmp_path / "absent")],
                         capture_output=True, text=True)
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_artifacts_get_normal_file_permissions(tmp_path):
    import os

    import torch

    from nfm_cli.store.artifacts import write_artifact
    out = tmp_path / "a.safetensors"
    write_artifact(out, {"x": torch.zeros(1)}, "measures", {})
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
