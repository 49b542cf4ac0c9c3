"""``nfm sweep``: grid expansion and validation, --list through xargs -P 2 equals --jobs 2 and --index."""
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nfm_cli.errors import NfmError
from nfm_cli.steps.sweep import expand, parse_grid_args, parse_values
from nfm_cli.store.artifacts import read_artifact
from tests.conftest import sha256_of

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--grid", "dataset=synthetic", "--grid", "width=8", "--grid", "epochs=1", "--grid", "train_size=64",
        "--grid", "test_size=32", "--grid", "batch_size=32"]


def test_ranges_lists_and_names():
    assert parse_values("random_ratio", "0:1:0.1") == [k / 10 for k in range(11)]
    assert parse_values("width", "64:256:64") == [64, 128, 192, 256]
    assert parse_values("stop_at_loss", "none,0.01") == [None, 0.01]
    grid = parse_grid_args(["lr=1e-3,3e-4", "width=16", "optimizer=adam,sgd", "dataset=synthetic"])
    runs = expand(grid, [0, 1], "out")
    assert len(runs) == 8 and [r.index for r in runs] == list(range(8))
    assert runs[0].name == "lr=0.001-optimizer=adam-seed=0"  # one-valued fields are settings, not in the name
    assert runs[3].name == "lr=0.001-optimizer=sgd-seed=1" and runs[4].name.startswith("lr=0.0003-")
    assert runs[5].config.width == 16 and runs[5].config.seed == 1 and runs[5].config.optimizer == "adam"
    assert runs[2].checkpoint == Path("out/lr=0.001-optimizer=sgd-seed=0.safetensors")
    assert runs[2].measures == Path("out/lr=0.001-optimizer=sgd-seed=0.measures.safetensors")


@pytest.mark.parametrize("args, match", [
    (["--grid", "lrr=1"], "grid field 'lrr' is not an nfm train config field"),
    (["--grid", "lr="], "grid field 'lr' has no values"),
    (["--grid", "lr=1e-3,-1"], r"grid run lr=-1.0: lr must be a positive number"),
    (["--grid", "width=8,x"], "grid field 'width': 'x' is not a number"),
    (["--grid", "seed=1,2"], "--seeds"),
    (["--grid", "optimizer=adam,sgd", "--grid", "momentum=0.9"], "momentum applies to optimizer sgd only"),
    (["--seeds", "0,0"], "seed twice"),
])
def test_bad_grids_fail_before_anything_runs(cli, tmp_path, args, match):
    out = tmp_path / "runs"
    res = cli("sweep", "--out", out, *args)
    assert res.code == 1 and len(res.err.strip().splitlines()) == 1
    assert re.search(match, res.err), res.err
    assert not out.exists()


def test_grid_files(tmp_path):
    from nfm_cli.steps.sweep import read_grid_file
    (tmp_path / "g.json").write_text(json.dumps({"lr": [1e-3, 3e-4], "width": 8, "seeds": [0, 2]}))
    (tmp_path / "g.toml").write_text('lr = [1e-3, 3e-4]\nwidth = 8\nseeds = [0, 2]\n')
    for name in ("g.json", "g.toml"):
        grid, seeds = read_grid_file(tmp_path / name)
        assert grid == {"lr": [1e-3, 3e-4], "width": [8]} and seeds == [0, 2]
    (tmp_path / "r.toml").write_text('random_ratio = "0:0.5:0.25"\nwidth = "4:8:2"\n')
    grid, seeds = read_grid_file(tmp_path / "r.toml")
    assert grid == {"random_ratio": [0.0, 0.25, 0.5], "width": [4, 6, 8]} and seeds is None
    (tmp_path / "bad.json").write_text('{"depthh": [1]}')
    with pytest.raises(NfmError, match="'depthh' is not an nfm train config field"):
        read_grid_file(tmp_path / "bad.json")


def _same_files(a: Path, b: Path) -> None:
    for path in sorted(a.glob("*.safetensors")):
        if "hdiag" in path.name:
            continue
        x, y = read_artifact(path), read_artifact(b / path.name)
        assert x.tensors.keys() == y.tensors.keys()
        assert all(torch.equal(x.tensors[k], y.tensors[k]) for k in x.tensors), path.name
        if x.kind == "measures":
            numbers = {k: v for k, v in x.meta["result"].items() if isinstance(v, (int, float))}
            assert numbers == {k: y.meta["result"][k] for k in numbers}, path.name


@pytest.mark.slow  # eight child processes: ~1 min here, 3.5 min on the loaded 2-core machine
def test_list_through_xargs_equals_jobs_and_index(cli, tmp_path):
    grid = TINY + ["--grid", "lr=1e-3,1e-2"]
    listed = cli("sweep", "--out", tmp_path / "xargs", *grid, "--list")
    assert listed.code == 0 and len(listed.out.splitlines()) == 2
    lines = listed.out.replace("nfm ", f"{sys.executable} -m nfm_cli ")
    env = dict(os.environ, PYTHONPATH=str(ROOT), NFM_THREADS="1")
    (tmp_path / "xargs").mkdir()
    subprocess.run(["xargs", "-d", "\n", "-P", "2", "-I", "CMD", "sh", "-c", "CMD"], input=lines, text=True,
                   env=env, check=True, capture_output=True)
    res = cli("sweep", "--out", tmp_path / "jobs", *grid, "--jobs", "2", "-q", "--device", "cpu")
    assert res.code == 0, res.err
    assert sorted(Path(p).name for p in res.out.split()) == sorted(
        p.name for p in (tmp_path / "xargs").glob("*.measures.safetensors"))
    _same_files(tmp_path / "xargs", tmp_path / "jobs")
    one = cli("sweep", "--out", tmp_path / "index", *grid, "--index", "1", "-q", "--device", "cpu")
    assert one.code == 0 and one.out.strip().endswith("lr=0.01-seed=0.measures.safetensors")
    assert [p.name for p in (tmp_path / "index").glob("*.measures.safetensors")] == [Path(one.out.strip()).name]
    for path in (tmp_path / "index").glob("*.safetensors"):
        if "hdiag" not in path.name:
            x, y = read_artifact(path), read_artifact(tmp_path / "jobs" / path.name)
            assert all(torch.equal(x.tensors[k], y.tensors[k]) for k in x.tensors)


def test_rerun_skips_finished_runs(cli, tmp_path):
    out = tmp_path / "runs"
    assert cli("sweep", "--out", out, *TINY, "--seeds", "0,1", "-q", "--device", "cpu").code == 0
    before = {p.name: sha256_of(p) for p in out.glob("*.safetensors")}
    res = cli("sweep", "--out", out, *TINY, "--seeds", "0,1", "-q", "--device", "cpu")
    assert res.code == 0 and len(res.out.split()) == 2
    assert {p.name: sha256_of(p) for p in out.glob("*.safetensors")} == before
    res = cli("sweep", "--out", out, *TINY, "--seeds", "0,1", "--index", "5")
    assert res.code == 1 and "outside the grid's 2 runs" in res.err


@pytest.mark.integration
def test_sigterm_to_a_jobs_sweep_stops_its_children_and_starts_no_more(tmp_path):
    """SIGTERM to the `nfm sweep --jobs 2` process alone (not its children, which run in sessions of
    their own): it passes the signal on, waits for both running children to stop, starts none of
    the queued runs, and exits 143 with one line; no child, lock or temp file is left."""
    from nfm_cli.store.locks import read_holder
    out = tmp_path / "grid"
    grid = ["model=mlp", "dataset=synthetic", "width=16", "train_size=256", "batch_size=256", "epochs=100000"]
    argv = [sys.executable, "-m", "nfm_cli", "sweep", *[a for g in grid for a in ("--grid", g)], "--seeds", "0,1,2",
            "--jobs", "2", "--out", str(out), "-q"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, NFM_THREADS="1"))
    children: dict[str, int] = {}
    deadline = time.monotonic() + 120
    while len(children) < 2 and time.monotonic() < deadline and proc.poll() is None:
        for lock in out.glob(".*.lock") if out.exists() else []:
            holder = read_holder(lock)
            if holder is not None and holder.pid:
                children[lock.name] = holder.pid       # a child is training: it holds its checkpoint's lock
        time.sleep(0.05)
    try:
        assert len(children) == 2, proc.stderr.read() if proc.poll() is not None else children
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    except BaseException:                            # on failure, leave no process behind
        for pid in [proc.pid, *children.values()]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        raise
    assert proc.returncode == 143, err
    assert err.count("\n") == 1 and "interrupted by SIGTERM" in err and "2 run(s) in progress" in err, err
    for pid in children.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not list(out.glob(".*.lock")) and not list(out.glob("*.tmp"))
    assert not list(out.glob("*seed=2*"))            # the queued third run never started
    for ckpt in out.glob("*.safetensors"):          # what was saved is a valid, unfinished checkpoint
        assert read_artifact(ckpt, "checkpoint").meta["progress"]["complete"] is False
