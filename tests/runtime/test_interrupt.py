"""Stopping on SIGTERM / Ctrl-C: train saves on a time interval, at the end and on a signal, and a
stopped run resumes bit-identically without redoing work; the CLI says how to resume (exit 130/143)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from nfm_cli.errors import NfmError
from nfm_cli.runtime import interrupt
from nfm_cli.steps.train import train
from nfm_cli.store.artifacts import read_artifact
from tests.conftest import assert_same_artifact, tiny_config

# Launches the real CLI with training's progress events echoed on stdout ("BATCH", "EPOCH k"), so a
# test can see how far the run got before it signals it, and count the minibatches a rerun trains.
LAUNCH_ECHO = (
    "import sys, nfm_cli.steps.train as t\n"
    "orig = t.report\n"
    "def report(progress, task, done, total, **info):\n"
    "    if task in ('batch', 'epoch'):\n"
    "        print('BATCH' if task == 'batch' else f'EPOCH {done}', flush=True)\n"
    "    orig(progress, task, done, total, **info)\n"
    "t.report = report\n"
    "from nfm_cli.cli import main\n"
    "main(sys.argv[1:])\n")

EPOCHS, BATCHES = 15, 8  # 256 samples in minibatches of 32
SIGNAL_CFG = dict(epochs=EPOCHS, train_size=256, batch_size=32)


def _argv(out):
    cfg = tiny_config(**SIGNAL_CFG)
    return ["train", "--dataset", cfg.dataset, "--width", str(cfg.width), "--epochs", str(cfg.epochs),
            "--batch-size", str(cfg.batch_size), "--train-size", str(cfg.train_size),
            "--test-size", str(cfg.test_size), "--random-ratio", str(cfg.random_ratio), "--seed", str(cfg.seed),
            "--quiet", "--out", str(out)]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", NFM_THREADS="1")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, in-process with one thread like the subprocesses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("sig-ref") / "run.safetensors"
        train(tiny_config(**SIGNAL_CFG), out, device="cpu")
        return out
    finally:
        torch.set_num_threads(threads)


@pytest.mark.integration
@pytest.mark.parametrize("sig, code, rerun", [(signal.SIGTERM, 143, True), (signal.SIGINT, 130, False)])
def test_signal_saves_progress_and_rerun_finishes_bit_identically(tmp_path, reference, sig, code, rerun):
    out = tmp_path / "run.safetensors"
    argv = _argv(out) + ["--save-every", "3600"]  # no interval save: only the signal can write the file
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH_ECHO, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    seen = []
    for line in proc.stdout:
        seen.append(line.strip())
        if line.strip() == "EPOCH 3":  # the run got this far: three epochs done, not saved yet
            assert not out.exists()
            proc.send_signal(sig)
            break
    rest = proc.stdout.read()  # (not communicate(): it would skip lines already buffered by the loop)
    err = proc.stderr.read()   # little: the run is --quiet
    proc.wait(timeout=120)
    seen += rest.split()
    assert proc.returncode == code, err
    assert f"interrupted by {signal.Signals(sig).name}" in err
    assert "rerun the same command to resume" in err and str(out) in err and "Traceback" not in err
    progress = read_artifact(out, "checkpoint").meta["progress"]
    steps_before = seen.count("BATCH")
    assert progress["epochs_done"] >= 3 and not progress["complete"]
    # the save holds every minibatch trained before the signal, none lost and none redone
    assert progress["epochs_done"] * BATCHES + progress.get("batches_done", 0) == steps_before
    if not rerun:  # (the same path as SIGTERM's; one rerun keeps the default suite short)
        return
    res = subprocess.run([sys.executable, "-c", LAUNCH_ECHO, *argv], capture_output=True, text=True,
                         env=_env(), timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split().count("BATCH") == EPOCHS * BATCHES - steps_before
    assert_same_artifact(out, reference)


def test_stopped_inside_an_epoch_resumes_bit_identically(tmp_path, one_thread):
    """A signal between two minibatches of epoch 2: the checkpoint records the position inside the epoch
    (and the epoch's loss sum so far); the resumed run equals the uninterrupted one bit for bit."""
    cfg = tiny_config(epochs=3, train_size=128, batch_size=32)
    full, part = tmp_path / "full.safetensors", tmp_path / "part.safetensors"
    train(cfg, full, device="cpu")

    def progress(event):
        if event.task == "batch" and event.info["epoch"] == 2 and event.done == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    previous = interrupt.install()
    try:
        with pytest.raises(interrupt.Interrupted) as stopped:
            train(cfg, part, device="cpu", progress=progress, save_every=3600)
    finally:
        interrupt.restore(previous)
    assert stopped.value.exit_code == 143 and "1 epochs and 3/4 batches" in stopped.value.saved
    art = read_artifact(part, "checkpoint")
    assert art.meta["progress"] == {"epochs_done": 1, "batches_done": 3, "epochs": 3, "complete": False}
    result = train(cfg, part, device="cpu")
    assert result.status == "resumed" and result.resumed_from == (1, 3)
    assert_same_artifact(part, full)


def test_checkpoint_is_written_on_the_interval_and_at_the_end(tmp_path, one_thread):
    cfg = tiny_config(epochs=3)
    for every, exists_during in ((3600.0, False), (0.0, True)):
        out = tmp_path / f"every{every}.safetensors"
        seen = []
        train(cfg, out, device="cpu", save_every=every,
              progress=lambda e: seen.append(out.exists()) if e.task == "epoch" and e.done < 3 else None)
        assert seen == [exists_during] * 2
        assert read_artifact(out, "checkpoint").meta["progress"]["complete"]


def test_negative_save_interval_is_refused(tmp_path, cli):
    res = cli("train", "--dataset", "synthetic", "--save-every", "-1", "--out", tmp_path / "x.safetensors")
    assert res.code == 2 and "'--save-every'" in res.err and not (tmp_path / "x.safetensors").exists()
    with pytest.raises(NfmError, match="save_every must be a number of seconds >= 0"):   # the Python API
        train(tiny_config(), tmp_path / "x.safetensors", device="cpu", save_every=-1)
    assert not (tmp_path / "x.safetensors").exists()


def test_ctrl_c_caught_by_the_cli_framework_still_prints_how_to_resume(tmp_path, cli, monkeypatch):
    """A KeyboardInterrupt raised inside a command (typer turns it into exit 130 on its own)."""
    import nfm_cli.steps.train as training  # nfm train imports train from here when it runs

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train", interrupted)
    res = cli("train", "--dataset", "synthetic", "--out", tmp_path / "x.safetensors")
    assert res.code == 130
    assert "interrupted by SIGINT; rerun the same command to resume" in res.err


def test_threads_option_sizes_the_pools(tiny_checkpoint, cli):
    before = torch.get_num_threads()
    try:
        res = cli("--threads", "1", "inspect", tiny_checkpoint)
        assert res.code == 0, res.err
        assert torch.get_num_threads() == 1 and os.environ["OPENBLAS_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)
    assert cli("--threads", "0", "inspect", tiny_checkpoint).code == 2


def test_a_repeated_sigterm_stays_pending_and_a_second_ctrl_c_is_raised_at_once():
    """Inside deferred(): SIGTERM twice (a scheduler and a parent sweep both passing it on) is one
    request that lets the save finish; Ctrl-C twice is a user who will not wait."""
    previous = interrupt.install()
    try:
        saved = False
        with pytest.raises(interrupt.Interrupted) as after, interrupt.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            assert interrupt.pending() == signal.SIGTERM        # still here: not raised
            saved = True                                        # (the save would go here)
        assert saved and after.value.signum == signal.SIGTERM
        with pytest.raises(interrupt.Interrupted) as at_once, interrupt.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            assert interrupt.pending() == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)
            raise AssertionError("the second Ctrl-C was not raised at once")
        assert at_once.value.signum == signal.SIGINT
    finally:
        interrupt.take()
        interrupt.restore(previous)
