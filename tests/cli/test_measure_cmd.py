"""``nfm measure --rivals``: stored next to the other measures, added to finished files, read by report."""
import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch

from nfm_cli import load_checkpoint
from nfm_cli.data import datasets
from nfm_cli.measures.rivals import RIVALS, RivalOptions, rival_measures
from nfm_cli.steps.train import train
from nfm_cli.store.artifacts import read_artifact
from tests.conftest import assert_same_artifact, read_safetensors, sha256_of, tiny_config, write_idx

pytestmark = pytest.mark.usefixtures("one_thread")


def test_measure_rivals_json_and_report(cli, tiny_checkpoint, tmp_path):
    ckpt = tmp_path / "run.safetensors"
    shutil.copy(tiny_checkpoint, ckpt)
    res = cli("measure", ckpt, "--rivals", "--json", "--device", "cpu", "--seed", "3")
    assert res.code == 0, res.err
    result = json.loads(res.out)
    ck = load_checkpoint(ckpt)
    direct = rival_measures(ck.model, *ck.training_tensors(), RivalOptions(seed=3))
    for key in RIVALS:
        assert result[key] == direct[key] and math.isfinite(result[key]), key
    assert result["rivals"]["radii"] == direct["radii"] and result["rivals"]["options"]["seed"] == 3
    stored = read_artifact(tmp_path / "run.measures.safetensors").meta["result"]
    assert all(stored[key] == result[key] for key in RIVALS)

    table = tmp_path / "runs.csv"
    res = cli("report", tmp_path / "run.measures.safetensors", "--x", "pacbayes_flatness,adaptive_sharpness",
              "--csv", table, "--json")
    assert res.code == 0, res.err
    row = next(csv.DictReader(table.open()))
    assert float(row["pacbayes_mag_flatness"]) == result["pacbayes_mag_flatness"]


def test_rivals_are_opt_in_and_added_to_a_finished_file(cli, tiny_checkpoint, tmp_path):
    ckpt = tmp_path / "run.safetensors"
    shutil.copy(tiny_checkpoint, ckpt)
    out = tmp_path / "m.safetensors"
    assert cli("measure", ckpt, "-o", out, "--no-keep-intermediate", "--device", "cpu", "--json").code == 0
    before = read_artifact(out).meta["result"]
    assert not any(key in before for key in RIVALS)
    res = cli("measure", ckpt, "-o", out, "--rivals", "--device", "cpu")
    assert res.code == 0, res.err
    assert "rival measures added" in res.err
    after = read_artifact(out).meta["result"]
    assert all(math.isfinite(after[key]) for key in RIVALS)
    assert {k: v for k, v in after.items() if k not in RIVALS and k != "rivals"} == before
    assert not list(tmp_path.glob("*hdiag*"))  # the Hessians were not recomputed
    again = cli("measure", ckpt, "-o", out, "--rivals", "--device", "cpu")
    assert again.code == 0 and "already complete" in again.err


# ---- many checkpoints in one call (issue 23) ------------------------------------------------------

def _idx_checkpoints(folder, seeds):
    """Tiny MLPs trained on a 48-image MNIST written as IDX files: their data is read from files (the
    path the process cache of ``data.datasets`` shortens), unlike the synthetic set's."""
    rng = np.random.default_rng(0)
    data = folder / "mnist"
    write_idx(data, "train", rng.integers(0, 256, (48, 28, 28)), rng.integers(0, 10, 48), compress=True)
    write_idx(data, "t10k", rng.integers(0, 256, (16, 28, 28)), rng.integers(0, 10, 16), compress=True)
    paths = []
    for seed in seeds:
        path = folder / f"run{seed}.safetensors"
        train(tiny_config(dataset="mnist", data_dir=str(data), width=8, epochs=1, batch_size=16, train_size=None,
                          test_size=None, seed=seed), path, device="cpu")
        paths.append(path)
    return paths


MEASURE_OUTPUTS = (".measures.safetensors", ".measures.hdiag-normalized-ce.safetensors",
                   ".measures.hdiag-ce.safetensors")


def test_one_call_over_many_checkpoints_writes_what_separate_calls_write(cli, tmp_path, monkeypatch):
    paths = _idx_checkpoints(tmp_path, seeds=(0, 1, 2))
    reads = []
    real = datasets._decoded
    monkeypatch.setattr(datasets, "_decoded", lambda name, train, files: reads.append(train) or
                        real(name, train, files))
    for i, path in enumerate(reversed(paths)):      # alone, in another order, from another global RNG state
        torch.manual_seed(1000 + i)
        assert cli("measure", path, "--device", "cpu", "--quiet").code == 0
    alone = tmp_path / "alone"
    alone.mkdir()
    for path in paths:
        for suffix in MEASURE_OUTPUTS:
            stem = path.name[: -len(".safetensors")]
            (tmp_path / (stem + suffix)).rename(alone / (stem + suffix))
    separate_reads, reads[:] = list(reads), []

    res = cli("measure", *paths, "--device", "cpu")
    assert res.code == 0, res.err
    assert res.out.split() == [str(p.with_name(p.name.replace(".safetensors", ".measures.safetensors")))
                               for p in paths]
    assert "3 checkpoints: 3 measured, 0 failed" in res.err
    assert reads.count(True) == 1 and separate_reads.count(True) == 3   # the training split was read once
    for path in paths:
        stem = path.name[: -len(".safetensors")]
        for suffix in MEASURE_OUTPUTS[1:]:          # the Hessian files: all but their wall time
            assert_same_artifact(tmp_path / (stem + suffix), alone / (stem + suffix))
        # the measures file: all but its wall time and its parents' hashes (those of the Hessian files,
        # which hash their wall time too), its checkpoint parent included
        got, want = tmp_path / (stem + MEASURE_OUTPUTS[0]), alone / (stem + MEASURE_OUTPUTS[0])
        assert_same_artifact(got, want, ignore=("nfm.wall_time", "nfm.parents"))
        parents = [json.loads(read_safetensors(f)[1]["nfm.parents"]) for f in (got, want)]
        assert parents[0]["checkpoint"] == parents[1]["checkpoint"] == sha256_of(path)


def test_a_bad_checkpoint_in_the_middle_fails_alone(cli, tiny_checkpoint, tmp_path):
    a, bad, c = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    shutil.copy(tiny_checkpoint, a)
    shutil.copy(tiny_checkpoint, c)
    bad.write_bytes(tiny_checkpoint.read_bytes()[:1000])        # truncated
    res = cli("measure", a, bad, c, "--device", "cpu", "--no-keep-intermediate")
    assert res.code == 1
    errors = [line for line in res.err.splitlines() if line.startswith("nfm: error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"nfm: error: {bad}: ")
    assert f"nfm: 3 checkpoints: 2 measured, 1 failed ({bad})" in res.err
    assert res.out.split() == [str(tmp_path / "a.measures.safetensors"), str(tmp_path / "c.measures.safetensors")]
    assert not (tmp_path / "b.measures.safetensors").exists()

    # --json: one object per line on stdout, the finished files now "already complete"
    res = cli("measure", a, bad, c, "--device", "cpu", "--json")
    assert res.code == 1 and res.err.count("nfm: error: ") == 1
    lines = [json.loads(line) for line in res.out.splitlines()]
    assert [line["checkpoint"] for line in lines] == [str(a), str(bad), str(c)]
    assert lines[1]["exit_code"] == 1 and lines[1]["error"].startswith(f"{bad}: ")
    stored = read_artifact(tmp_path / "a.measures.safetensors").meta["result"]
    assert lines[0]["status"] == "already complete"
    assert lines[0]["normalized_sharpness"] == stored["normalized_sharpness"]


def test_many_checkpoints_refuse_one_out(cli, tiny_checkpoint, tmp_path):
    res = cli("measure", tiny_checkpoint, tiny_checkpoint, "-o", tmp_path / "m.safetensors")
    assert res.code == 1 and "--out names one measures file but 2 checkpoints" in res.err
    twins = cli("measure", tmp_path / "x.safetensors", tmp_path / "x")      # both default to x.measures...
    assert twins.code == 1 and "would both write" in twins.err
    assert not list(tmp_path.iterdir())
