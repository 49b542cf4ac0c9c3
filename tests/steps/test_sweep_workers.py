"""steps.sweep_workers: the worker loop (runs in, one answer each) and the pool (runs shared as workers
come free, a dead worker fails only its run)."""
import io
import json
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from nfm_cli.steps import sweep_workers
from nfm_cli.steps.sweep import expand, parse_grid_args, run_one
from nfm_cli.steps.sweep_workers import TAG, WorkerPool, run_request, serve
from nfm_cli.store.artifacts import read_artifact

pytestmark = pytest.mark.usefixtures("one_thread")
GRID = ["dataset=synthetic", "width=8", "epochs=1", "train_size=64", "test_size=32", "batch_size=32"]


def test_a_worker_serves_each_run_as_run_one_would_and_a_bad_one_fails_alone(tmp_path):
    runs = expand(parse_grid_args(GRID), [0, 1], tmp_path / "served")
    (tmp_path / "served").mkdir()
    lost = expand(parse_grid_args(GRID), [2], tmp_path / "missing")[0]        # its folder does not exist
    lines = io.StringIO("".join(run_request(r, False, "cpu") + "\n" for r in (runs[0], lost, runs[1])))
    answers = []
    assert serve(lines, answers.append) == 3
    got = [json.loads(a[len(TAG):]) for a in answers]
    assert [g["index"] for g in got] == [0, 0, 1] and got[0]["error"] is None and got[2]["error"] is None
    assert "missing" in got[1]["error"] and "does not exist" in got[1]["error"]
    alone = expand(parse_grid_args(GRID), [0, 1], tmp_path / "alone")
    (tmp_path / "alone").mkdir()
    for run in alone:
        run_one(run, device="cpu")
    for served, ref in zip(runs, alone, strict=True):
        for a, b in ((served.checkpoint, ref.checkpoint), (served.measures, ref.measures)):
            x, y = read_artifact(a), read_artifact(b)
            assert sorted(x.tensors) == sorted(y.tensors)
            assert all(torch.equal(x.tensors[k], y.tensors[k]) for k in x.tensors)
        got, want = read_artifact(served.measures).meta["result"], read_artifact(ref.measures).meta["result"]
        assert got["normalized_sharpness"] == want["normalized_sharpness"] and got["layers"] == want["layers"]


FAKE_WORKER = textwrap.dedent("""
    import json, os, sys
    for line in iter(sys.stdin.readline, ""):
        req = json.loads(line)
        if req["name"] == "dies":
            sys.stderr.write("nfm: error: killed for memory\\n")
            sys.exit(137)
        print("a stray line a library printed")
        print("TAG" + json.dumps({"index": req["index"], "error": None if req["name"] != "bad" else "bad run",
                                   "pid": os.getpid()}), flush=True)
""").replace("TAG", TAG)


def _fake_runs(names):
    return [SimpleNamespace(index=i, name=n, config=SimpleNamespace(seed=i), checkpoint=f"{n}.safetensors",
                            measures=f"{n}.measures.safetensors") for i, n in enumerate(names)]


def test_the_pool_shares_the_runs_and_a_dead_worker_fails_only_its_run(monkeypatch):
    monkeypatch.setattr(sweep_workers, "WORKER_ARGV", ["-c", FAKE_WORKER])
    runs = _fake_runs(["r0", "dies", "r2", "bad", "r4", "r5"])
    pool = WorkerPool(runs, jobs=2, threads=1, rivals=False, device="cpu")
    assert pool.env["NFM_THREADS"] == "1" and sys.executable
    for slot in range(pool.jobs):      # the feeders, one after the other here (threads in run_all)
        pool.feed(slot)
    answers = {}
    while not pool.results.empty():
        run, error = pool.results.get()
        answers[run.name] = error
    assert set(answers) == {r.name for r in runs}                 # every run answered once
    assert answers["dies"] == "nfm: error: killed for memory" and answers["bad"] == "bad run"
    assert all(answers[n] is None for n in ("r0", "r2", "r4", "r5"))
    assert not pool.busy


def test_a_stopped_pool_hands_out_nothing_more(monkeypatch):
    monkeypatch.setattr(sweep_workers, "WORKER_ARGV", ["-c", FAKE_WORKER])
    pool = WorkerPool(_fake_runs(["r0", "r1"]), jobs=2, threads=1, rivals=False, device="cpu")
    assert pool.stop(15) == 0
    pool.feed(0)
    assert pool.results.empty() and len(pool.pending) == 2
