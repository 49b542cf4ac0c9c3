"""Reliability (issue 7, part 1): SIGKILL the real CLI at seeded random moments, rerun, compare.

For ``train``, ``hessian-diag`` (exact, hutchinson, finite-diff) and ``measure``: start
``python -m nfm_cli ...`` as a subprocess, kill it with SIGKILL at a seeded moment (after a random
delay, when its output first appears, or while a save's temp file exists), rerun the same command
(several kills in a row in the slow run), and check that the final artifact equals an
uninterrupted run bit for bit: every tensor ``torch.equal`` with the same dtype and every metadata
entry equal, except ``nfm.wall_time`` (the seconds spent, which no two runs share). No ``.*.tmp``
file may remain after the successful rerun.

train, hessian-diag and measure save their partial state every 60 s by default; to kill them between
and during partial saves, the killed runs and the reruns pass ``--save-every 0`` (a save after every
minibatch or unit; the save interval does not change the numbers). Every kill must really happen: a
run that finished before its kill is thrown away (outputs deleted) and started again, at most
``ATTEMPTS`` times.

The uninterrupted reference is computed in-process with the same core functions the CLI calls
(same device, same thread count, same arguments). Default run (about a minute, marked
``integration``: ``make test`` runs it, ``make test-fast`` skips it): one kill each of train,
hessian-diag finite-diff and measure (exact); ``-m slow`` (``make fuzz``): three reruns each
interrupted at another moment, for three seeds.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nfm_cli.steps.hessian_diag import compute_hessian_diagonal
from nfm_cli.steps.measure import measure_checkpoint
from nfm_cli.steps.train import TrainConfig, train
from tests.conftest import assert_same_artifact, read_safetensors

pytestmark = pytest.mark.integration

TRAIN_ARGS = ["--dataset", "synthetic", "--width", "16", "--epochs", "6", "--train-size", "256",
              "--test-size", "64", "--random-ratio", "0.3", "--seed", "0", "--quiet", "--save-every", "0"]
TRAIN_CONFIG = dict(model="mlp", dataset="synthetic", width=16, epochs=6, train_size=256, test_size=64,
                    random_ratio=0.3, seed=0)
HDIAG_ARGS = {"exact": ["--estimator", "exact"],
              "hutchinson": ["--estimator", "hutchinson", "--probes", "6"],
              "finite-diff": ["--estimator", "finite-diff", "--probes", "6"]}
BATCH = 32  # small batches: more units, more partial saves to land a kill in

def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tmp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


def _mtimes(folder: Path) -> dict[str, int]:
    out = {}
    for p in folder.iterdir():
        try:
            out[p.name] = p.stat().st_mtime_ns
        except FileNotFoundError:  # a temp file renamed meanwhile
            pass
    return out


def run_killed(argv: list[str], folder: Path, rng: random.Random) -> str:
    """Start the CLI, SIGKILL it at a seeded moment; returns how it was stopped."""
    proc = subprocess.Popen([sys.executable, "-m", "nfm_cli", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    mode = rng.choice(("during-save", "after-first-write", "delay"))
    before = _mtimes(folder)
    extra = rng.uniform(0.0, 1.5)
    deadline = time.monotonic() + 120
    triggered_at = None
    while proc.poll() is None and time.monotonic() < deadline:
        now = _mtimes(folder)
        changed = any(before.get(k) != v for k, v in now.items())
        if mode == "during-save" and _tmp_files(folder):
            break
        if mode in ("after-first-write", "delay") and changed and triggered_at is None:
            triggered_at = time.monotonic()
        if triggered_at is not None and time.monotonic() - triggered_at >= (extra if mode == "delay" else 0):
            break
        time.sleep(0.001)
    if proc.poll() is not None:
        return f"{mode}: finished before the kill (rc {proc.returncode})"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return f"{mode}: killed"


def rerun(argv: list[str]) -> None:
    res = subprocess.run([sys.executable, "-m", "nfm_cli", *argv], capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted results, computed in-process with one thread (as the subprocesses)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("kill-ref")
        ckpt = root / "ref.safetensors"
        train(TrainConfig(**TRAIN_CONFIG), ckpt, device="cpu")
        hd = {}
        for est in HDIAG_ARGS:
            hd[est] = root / f"ref.hdiag-{est}.safetensors"
            compute_hessian_diagonal(ckpt, hd[est], estimator=est, probes=6, batch_size=BATCH, device="cpu")
        ms = root / "ref.measures.safetensors"
        measure_checkpoint(ckpt, ms, estimator="exact", batch_size=BATCH, device="cpu")
        return {"root": root, "ckpt": ckpt, "hdiag": hd, "measures": ms}
    finally:
        torch.set_num_threads(threads)


ATTEMPTS = 4


def _kill_and_finish(argv, folder, rng, kills) -> list[str]:
    """``kills`` real SIGKILLs in a row, then a plain rerun; no temp file may remain."""
    outcomes = []
    for _ in range(kills):
        for _attempt in range(ATTEMPTS):
            outcomes.append(run_killed(argv, folder, rng))
            if outcomes[-1].endswith(": killed"):
                break
            for done in folder.glob("*.safetensors"):   # finished too early: start again from nothing
                done.unlink()
        assert outcomes[-1].endswith(": killed"), f"no kill landed in {ATTEMPTS} attempts: {outcomes}"
    rerun(argv)
    assert _tmp_files(folder) == [], f"temp files left after a successful rerun: {_tmp_files(folder)}"
    return outcomes


def _train(folder, reference, seed, kills):
    out = folder / "ref.safetensors"  # same name as the reference: the checkpoint path is recorded downstream
    argv = ["train", *TRAIN_ARGS, "--out", str(out)]
    outcomes = _kill_and_finish(argv, folder, random.Random(f"train-{seed}"), kills)
    assert_same_artifact(out, reference["ckpt"])
    return outcomes


def _hdiag(folder, reference, est, seed, kills):
    # the checkpoint must be the reference's (the Hessian records its path and hash)
    out = folder / f"h-{est}.safetensors"
    argv = ["hessian-diag", str(reference["ckpt"]), "--out", str(out), "--batch-size", str(BATCH),
            *HDIAG_ARGS[est], "--save-every", "0", "--quiet"]
    outcomes = _kill_and_finish(argv, folder, random.Random(f"hdiag-{est}-{seed}"), kills)
    assert_same_artifact(out, reference["hdiag"][est])
    return outcomes


def _measure(folder, reference, seed, kills):
    out = folder / "ref.measures.safetensors"
    argv = ["measure", str(reference["ckpt"]), "--out", str(out), "--estimator", "exact",
            "--batch-size", str(BATCH), "--save-every", "0", "--json"]
    outcomes = _kill_and_finish(argv, folder, random.Random(f"measure-{seed}"), kills)
    got_t, got_m = read_safetensors(out)
    want_t, want_m = read_safetensors(reference["measures"])
    assert got_m["nfm.result"] == want_m["nfm.result"]  # exact equality of every measure (JSON text)
    # the parents are the hashes of the actual inputs (the Hessian files differ from the reference's
    # only in nfm.wall_time, compared below)
    parents = json.loads(got_m["nfm.parents"])
    assert parents["checkpoint"] == json.loads(want_m["nfm.parents"])["checkpoint"]
    assert parents["hessian"] == _sha(folder / "ref.measures.hdiag-normalized-ce.safetensors")
    assert parents["trace_hessian"] == _sha(folder / "ref.measures.hdiag-ce.safetensors")
    assert sorted(got_t) == sorted(want_t)
    for name in want_t:
        assert torch.equal(got_t[name], want_t[name]), name
    for loss in ("normalized-ce", "ce"):
        name = f"ref.measures.hdiag-{loss}.safetensors"
        assert_same_artifact(folder / name, reference["root"] / name)
    return outcomes


def test_kill_train(tmp_path, reference):
    _train(tmp_path, reference, seed=0, kills=1)


# default run: finite-diff here, exact through measure; all three estimators in test_kill_many (slow)
@pytest.mark.parametrize("est", ["finite-diff"])
def test_kill_hessian_diag(tmp_path, reference, est):
    _hdiag(tmp_path, reference, est, seed=0, kills=1)


def test_kill_measure(tmp_path, reference):
    _measure(tmp_path, reference, seed=0, kills=1)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("command", ["train", "exact", "hutchinson", "finite-diff", "measure"])
def test_kill_many(tmp_path, reference, command, seed):
    if command == "train":
        outcomes = _train(tmp_path, reference, seed, kills=3)
    elif command == "measure":
        outcomes = _measure(tmp_path, reference, seed, kills=3)
    else:
        outcomes = _hdiag(tmp_path, reference, command, seed, kills=3)
    print(f"\nkill {command} seed {seed}: {outcomes}")
