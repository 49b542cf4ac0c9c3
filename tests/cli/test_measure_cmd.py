"""``nfm measure --rivals``: stored next to the other measures, added to finished files, read by report."""
import csv
import json
import math
import shutil

import pytest

from nfm_cli import load_checkpoint
from nfm_cli.measures.rivals import RIVALS, RivalOptions, rival_measures
from nfm_cli.store.artifacts import read_artifact

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
