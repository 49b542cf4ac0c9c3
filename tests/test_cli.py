"""The CLI layer: help, version, one-line errors, stdout/stderr discipline, inspect."""
import json
import subprocess
import sys

import pytest

from tests.conftest import sha256_of


def test_version_help_and_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "nfm_cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("nfm ")
    helped = subprocess.run(["nfm", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "train" in helped.stdout and "inspect" in helped.stdout


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
    (["train", "--model", "vgg", "--out", "{tmp}/x.safetensors"], "unknown model 'vgg'"),
    (["train", "--random-ratio", "1.2", "--out", "{tmp}/x.safetensors"], "random-ratio"),
    (["train", "--epochs", "0", "--out", "{tmp}/x.safetensors"], "--epochs must be a positive integer"),
    (["train", "--batch-size", "-3", "--out", "{tmp}/x.safetensors"], "--batch-size must be a positive"),
    (["train", "--dataset", "synthetic", "--out", "{tmp}/missing/x.safetensors"], "does not exist"),
    (["train", "--dataset", "cifar10", "--data-dir", "{tmp}", "--out", "{tmp}/x.safetensors"], "does not hold the cifar10"),
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
    from safetensors.torch import save_file
    import torch
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


def test_debug_shows_the_traceback(tmp_path):
    res = subprocess.run(["nfm", "--debug", "inspect", str(tmp_path / "absent")], capture_output=True, text=True)
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_artifacts_get_normal_file_permissions(tmp_path):
    import os
    import torch
    from nfm_cli.artifacts import write_artifact
    out = tmp_path / "a.safetensors"
    write_artifact(out, {"x": torch.zeros(1)}, "measures", {})
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
