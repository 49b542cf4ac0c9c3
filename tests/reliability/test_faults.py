"""Reliability (issue 7, parts 3-5): lineage, disk full / read-only output, numerical faults."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import nfm_cli.store.artifacts as artifacts
from tests.conftest import sha256_of

TRAIN = ["train", "--dataset", "synthetic", "--width", "16", "--epochs", "2", "--batch-size", "32",
         "--train-size", "128", "--test-size", "64", "--random-ratio", "0.3", "--quiet"]


def one_error_line(res, *fragments):
    lines = [line for line in res.err.splitlines() if line.strip()]
    assert res.code not in (0, 3), res.err
    assert len(lines) == 1 and lines[0].startswith("nfm: error: "), res.err
    assert "Traceback" not in res.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def tmp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def _read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


@pytest.fixture(scope="module")
def run(tiny_checkpoint, other_checkpoint, tiny_hdiag, tiny_measures):
    """The session-wide chain (conftest.py): a checkpoint, its Hessian and measures, another checkpoint."""
    return {"a": tiny_checkpoint, "b": other_checkpoint, "ha": tiny_hdiag, "ma": tiny_measures}


# ------------------------------------------------------------------------------------------ lineage

def test_hessian_of_another_checkpoint_is_refused(cli, run, tmp_path):
    res = cli("solve-variance", run["b"], run["ha"], "--out", tmp_path / "m.safetensors", "--json")
    one_error_line(res, str(run["ha"]), "another checkpoint")
    res = cli("solve-variance", run["b"], run["ha"], "--trace-hdiag", run["ha"], "--out", tmp_path / "m.safetensors")
    one_error_line(res, "another checkpoint")
    # continuing (or reusing) a Hessian file for another checkpoint
    res = cli("hessian-diag", run["b"], "--out", run["ha"], "--quiet")
    one_error_line(res, str(run["ha"]), "another checkpoint")
    assert not (tmp_path / "m.safetensors").exists() and tmp_files(tmp_path) == []


def test_measures_of_another_checkpoint_is_refused(cli, run):
    before = sha256_of(run["ma"])
    res = cli("measure", run["b"], "--out", run["ma"], "--json")
    one_error_line(res, str(run["ma"]), "another checkpoint")
    assert sha256_of(run["ma"]) == before


def test_checkpoint_retrained_in_place_invalidates_its_derived_files(cli, tmp_path):
    ckpt = tmp_path / "run.safetensors"
    assert cli(*TRAIN, "--seed", "0", "--out", ckpt).code == 0
    hdiag, measures = tmp_path / "run.hdiag.safetensors", tmp_path / "run.measures.safetensors"
    assert cli("hessian-diag", ckpt, "--out", hdiag, "--quiet").code == 0
    assert cli("solve-variance", ckpt, hdiag, "--out", measures, "--json").code == 0
    # the same config retrained with --force: other bytes (wall time), so another hash
    assert cli(*TRAIN, "--seed", "0", "--out", ckpt, "--force").code == 0
    one_error_line(cli("solve-variance", ckpt, hdiag, "--out", tmp_path / "m2.safetensors"), str(hdiag),
                   "another checkpoint")
    one_error_line(cli("measure", ckpt, "--out", measures, "--json"), str(measures), "another checkpoint")
    one_error_line(cli("hessian-diag", ckpt, "--out", hdiag, "--quiet"), str(hdiag), "another checkpoint")
    # retrained with another seed in place: refused too, and --force recomputes
    assert cli(*TRAIN, "--seed", "5", "--out", ckpt, "--force").code == 0
    one_error_line(cli("solve-variance", ckpt, hdiag, "--out", tmp_path / "m2.safetensors"), "another checkpoint")
    assert cli("hessian-diag", ckpt, "--out", hdiag, "--quiet", "--force").code == 0
    assert cli("solve-variance", ckpt, hdiag, "--out", tmp_path / "m2.safetensors", "--json").code == 0
    parents = json.loads(_read(tmp_path / "m2.safetensors")[1]["nfm.parents"])
    assert parents["checkpoint"] == sha256_of(ckpt) and parents["hessian"] == sha256_of(hdiag)


# ------------------------------------------------------------------------- disk full / read-only

def _fail_with(code):
    def boom(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return boom


@pytest.mark.parametrize("target, code, fragment", [
    ("replace", errno.ENOSPC, "no space left"),
    ("fsync", errno.ENOSPC, "no space left"),
    ("mkstemp", errno.EROFS, "read-only"),
    ("mkstemp", errno.EACCES, "read-only"),
    ("replace", errno.EROFS, "read-only"),
])
@pytest.mark.parametrize("step", ["train", "hessian-diag", "solve-variance"])
def test_write_failure_keeps_previous_artifact(cli, run, tmp_path, monkeypatch, target, code, fragment, step):
    folder = tmp_path / "out"
    folder.mkdir()
    if step == "train":
        out = folder / "run.safetensors"
        assert cli(*TRAIN, "--seed", "0", "--out", out).code == 0
        argv = [*TRAIN, "--seed", "0", "--out", out, "--force"]
    elif step == "hessian-diag":
        out = folder / "h.safetensors"
        out.write_bytes(run["ha"].read_bytes())
        argv = ["hessian-diag", run["a"], "--out", out, "--quiet", "--force"]
    else:
        out = folder / "m.safetensors"
        out.write_bytes(run["ma"].read_bytes())
        argv = ["solve-variance", run["a"], run["ha"], "--out", out, "--json"]
    before = out.read_bytes()
    if target == "replace":
        monkeypatch.setattr(artifacts.os, "replace", _fail_with(code))
    elif target == "fsync":
        monkeypatch.setattr(artifacts.os, "fsync", _fail_with(code))
    else:
        monkeypatch.setattr(artifacts.tempfile, "mkstemp", _fail_with(code))
    res = cli(*argv)
    monkeypatch.undo()
    one_error_line(res, str(out), fragment, "untouched")
    assert out.read_bytes() == before
    assert tmp_files(folder) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0555 folder anyway (see the monkeypatched test)")
def test_read_only_folder_for_real(cli, run, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    out = folder / "m.safetensors"
    out.write_bytes(run["ma"].read_bytes())
    folder.chmod(0o555)
    try:
        res = cli("solve-variance", run["a"], run["ha"], "--out", out, "--json")
        one_error_line(res, str(out), "read-only")
        assert out.read_bytes() == run["ma"].read_bytes() and tmp_files(folder) == []
    finally:
        folder.chmod(0o755)


def test_killed_writers_temp_files_are_removed_by_the_next_write(tmp_path):
    """A SIGKILLed writer cannot remove its temp file; the next successful write of that path does
    (only temp files of dead processes on this host; a live writer's file is kept)."""
    out = tmp_path / "x.safetensors"
    tag_host = artifacts._writer_tag().rsplit("-", 1)[0]
    dead = tmp_path / f".x.safetensors.{tag_host}-999999999.abc123.tmp"   # no such pid
    live = tmp_path / f".x.safetensors.{tag_host}-1.abc123.tmp"           # pid 1 is alive
    other = tmp_path / ".y.safetensors.host-999999999.abc.tmp"            # another artifact's
    for p in (dead, live, other):
        p.write_bytes(b"partial")
    artifacts.write_artifact(out, {"x": torch.zeros(1)}, "measures", {})
    assert not dead.exists() and live.exists() and other.exists()


# ------------------------------------------------------------------------------ numerical faults

@pytest.fixture(scope="module")
def nan_checkpoint(run, tmp_path_factory):
    tensors, meta = _read(run["a"])
    name = sorted(k for k in tensors if k.startswith("model.") and k.endswith("weight"))[0]
    tensors[name].view(-1)[3] = float("nan")
    path = tmp_path_factory.mktemp("nan") / "nan.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path, name


def test_nan_checkpoint_is_shown_by_inspect_and_refused_by_measure(cli, nan_checkpoint, tmp_path):
    path, name = nan_checkpoint
    res = cli("inspect", path, "--json")
    assert res.code == 0
    assert json.loads(res.out)["nonfinite_tensors"] == [name]
    res = cli("inspect", path)
    assert res.code == 0 and "NaN/inf" in res.err and name in res.err
    before = sha256_of(path)
    for argv in (["measure", path, "--out", tmp_path / "m.safetensors", "--json"],
                 ["hessian-diag", path, "--out", tmp_path / "h.safetensors", "--quiet"],
                 ["rescale", path, "--out", tmp_path / "r.safetensors", "--mode", "neuron", "--alpha", "2"]):
        one_error_line(cli(*argv), str(path), "NaN or inf")
    assert sha256_of(path) == before and sorted(p.name for p in tmp_path.iterdir()) == []


def test_nan_hessian_is_refused(cli, run, tmp_path):
    tensors, meta = _read(run["ha"])
    name = sorted(k for k in tensors if not k.startswith("stderr."))[0]
    tensors[name].view(-1)[0] = float("inf")
    bad = tmp_path / "h.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    one_error_line(cli("solve-variance", run["a"], bad, "--out", tmp_path / "m.safetensors"), str(bad),
                   "NaN or inf")
    assert not (tmp_path / "m.safetensors").exists()


def test_report_never_turns_a_nan_sharpness_into_a_correlation(cli, run, tmp_path):
    """A measures file whose normalized_sharpness is NaN (only a crafted or foreign file can be:
    nfm never writes NaN into metadata) is skipped as corrupt with its reason; the correlation uses
    only the finite runs."""
    tensors, meta = _read(run["ma"])
    result = json.loads(meta["nfm.result"])
    paths = []
    for i, (gap, ns) in enumerate([(0.1, 1.0), (0.2, 2.0), (0.3, 3.5), (0.4, float("nan"))]):
        r = json.loads(json.dumps(result))
        r["metrics"]["gap"], r["normalized_sharpness"] = gap, ns
        m = dict(meta, **{"nfm.result": json.dumps(r)})  # json writes NaN for the NaN run
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(tensors, str(paths[-1]), metadata=m)
    res = cli("report", *paths, "--json", "--quiet")
    assert res.code == 0, res.err
    out = json.loads(res.out)
    assert out["n_runs"] == 3
    assert [s["path"] for s in out["skipped"]] == [str(paths[3])] and "NaN" in out["skipped"][0]["reason"]
    c = out["groups"][0]["correlations"]["normalized_sharpness"]
    assert c["n"] == 3 and c["pearson_r"] is not None and c["pearson_r"] > 0.9
    assert c["max"] == 3.5  # min/max over finite values only
    # a run whose y (gap) is NaN is skipped with the reason, not averaged in
    r = json.loads(json.dumps(result))
    r["metrics"]["gap"] = float("nan")
    bad = tmp_path / "nan-gap.safetensors"
    save_file(tensors, str(bad), metadata=dict(meta, **{"nfm.result": json.dumps(r)}))
    res = cli("report", *paths, bad, "--json", "--quiet")
    out = json.loads(res.out)
    assert out["n_runs"] == 3 and str(bad) in [s["path"] for s in out["skipped"]]


def test_unknown_model_name_in_a_checkpoint_names_the_file(cli, tiny_checkpoint, tmp_path):
    """Found by the fuzzer in CI: a flipped byte turned "mlp" into "llp"; the error lacked the path."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(tiny_checkpoint), "pt") as handle:
        meta = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    meta["nfm.model"] = meta["nfm.model"].replace('"mlp"', '"llp"')
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    res = cli("measure", bad, "--out", tmp_path / "m.safetensors")
    assert res.code == 1 and str(bad) in res.err and "unknown model 'llp'" in res.err
