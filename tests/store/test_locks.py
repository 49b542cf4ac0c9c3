"""Two writers, one output (issue 15, item 2): the advisory lock of ``nfm_cli.store.locks``.

In-process tests of the lock's rules (busy, stale on this host, another host's until its timeout,
--wait, folders that take no lock, torchrun ranks), then the real thing: two ``nfm train`` and two
``nfm measure`` processes started together on one ``--out``. The process that got the lock is
frozen (SIGSTOP) once its lock file names it, so the other one meets the lock for certain; the test
checks that it did (exit code 75 and the holder's pid, or the "waiting" line), then lets the holder
finish (or SIGKILLs it and reruns: a dead holder's lock is taken over), and compares the final file
with a single uninterrupted run computed in-process. No lock or temp file may be left behind.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from nfm_cli.runtime.progress import NOTE
from nfm_cli.steps.measure import measure_checkpoint
from nfm_cli.steps.train import TrainConfig, train
from nfm_cli.store import locks
from nfm_cli.store.locks import EXIT_LOCKED, OutputLocked, lock_path, output_lock, read_holder
from tests.conftest import assert_same_artifact, read_safetensors

HOST = socket.gethostname()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".lock", ".tmp")))


def _write_lock(out: Path, host: str, pid: int, age: float = 0.0) -> Path:
    path = lock_path(out)
    path.write_text(json.dumps({"host": host, "pid": pid, "started": time.time() - age, "command": "nfm train"}))
    if age:
        os.utime(path, (time.time() - age, time.time() - age))
    return path


# ----------------------------------------------------------------------------------- the rules

def test_lock_file_names_the_holder_and_is_removed(tmp_path):
    out = tmp_path / "run.safetensors"
    with output_lock(out, command="nfm test") as path:
        assert path == tmp_path / ".run.safetensors.lock"
        holder = read_holder(path)
        assert (holder.host, holder.pid, holder.command) == (HOST, os.getpid(), "nfm test")
        assert abs(holder.started - time.time()) < 60
    assert _leftovers(tmp_path) == []


def test_a_held_lock_is_refused_in_one_line_naming_the_holder(tmp_path):
    out = tmp_path / "run.safetensors"
    # flock is per open file: a second open, even in this process, meets the lock
    with output_lock(out, command="nfm train"), pytest.raises(OutputLocked) as info, output_lock(out):
        pass
    message = str(info.value)
    assert message.startswith(str(out)) and "\n" not in message
    assert f"host {HOST}, pid {os.getpid()}" in message and "nfm train" in message and "--wait" in message
    assert info.value.exit_code == EXIT_LOCKED
    assert _leftovers(tmp_path) == []


def test_a_holder_that_has_not_written_its_record_yet_is_read_again(tmp_path):
    """The holder takes flock before it writes its record: a second writer arriving in between must
    wait for the record and name the holder, not print "host ?, pid ?" (a race seen in the two-process
    test)."""
    import fcntl
    out = tmp_path / "run.safetensors"
    fd = os.open(lock_path(out), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    writer = threading.Timer(0.1, locks._write_holder, args=(fd, "nfm train"))
    writer.start()
    try:
        with pytest.raises(OutputLocked, match=f"host {HOST}, pid {os.getpid()}"), output_lock(out):
            pass
    finally:
        writer.join()
        os.close(fd)


def test_stale_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    out = tmp_path / "run.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)           # a process that has exited: its pid is (almost surely) free
    _write_lock(out, HOST, pid)
    with output_lock(out) as path:
        assert read_holder(path).pid == os.getpid()
    assert _leftovers(tmp_path) == []


def test_another_hosts_lock_is_respected_until_its_timeout(tmp_path, monkeypatch):
    out = tmp_path / "run.safetensors"
    _write_lock(out, "other-node", 4242, age=5.0)              # refreshed 5 s ago
    with pytest.raises(OutputLocked, match="host other-node, pid 4242"), output_lock(out):
        pass
    monkeypatch.setenv(locks.TIMEOUT_ENV, "3")                  # not refreshed for 5 s > 3 s: stale
    with output_lock(out) as path:
        assert read_holder(path).host == HOST
    assert _leftovers(tmp_path) == []
    _write_lock(out, "other-node", 4242, age=2 * locks.LOCK_TIMEOUT_SECONDS)
    monkeypatch.delenv(locks.TIMEOUT_ENV)
    with output_lock(out):                                      # the default timeout
        pass
    assert _leftovers(tmp_path) == []


def test_wait_notes_once_and_takes_the_lock_when_the_holder_is_done(tmp_path, monkeypatch):
    monkeypatch.setattr(locks, "POLL_SECONDS", 0.01)
    out = tmp_path / "run.safetensors"
    release, holding = threading.Event(), threading.Event()

    def holder():
        with output_lock(out, command="first"):
            holding.set()
            release.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    assert holding.wait(30)
    notes = []

    def on_event(event):
        assert event.task == NOTE
        notes.append(event.info["message"])
        release.set()                 # the holder finishes only once we are waiting

    with output_lock(out, wait=True, progress=on_event) as path:
        assert read_holder(path).pid == os.getpid()
    thread.join()
    assert len(notes) == 1 and "waiting for another nfm" in notes[0] and "(first)" in notes[0]
    assert _leftovers(tmp_path) == []


def test_a_folder_that_takes_no_lock_file_goes_on_without_one(tmp_path, monkeypatch):
    out = tmp_path / "missing-folder" / "run.safetensors"
    with output_lock(out) as path:
        assert path is None

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(locks.os, "open", refuse)
    with output_lock(tmp_path / "run.safetensors") as path:
        assert path is None


def test_only_rank_0_of_a_torchrun_job_takes_the_lock(tmp_path, monkeypatch):
    out = tmp_path / "run.safetensors"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with output_lock(out) as path:
        assert path is None and _leftovers(tmp_path) == []


def test_locked_output_exits_75_with_one_line(cli, tiny_checkpoint, tmp_path):
    out = tmp_path / "h.safetensors"
    with output_lock(out, command="nfm hessian-diag"):
        res = cli("hessian-diag", tiny_checkpoint, "--out", out, "--quiet", "--device", "cpu")
    assert res.code == EXIT_LOCKED and res.out == ""
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"nfm: error: {out}: is being written by another nfm")
    assert not out.exists() and _leftovers(tmp_path) == []


# ----------------------------------------------------------------- two real processes, one --out

TRAIN_ARGS = ["--dataset", "synthetic", "--width", "16", "--epochs", "6", "--train-size", "256",
              "--test-size", "64", "--random-ratio", "0.3", "--seed", "0", "--quiet"]
TRAIN_CONFIG = dict(model="mlp", dataset="synthetic", width=16, epochs=6, train_size=256, test_size=64,
                    random_ratio=0.3, seed=0)
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Single uninterrupted runs, in-process with one thread (as the subprocesses)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("lock-ref")
        ckpt = root / "run.safetensors"
        train(TrainConfig(**TRAIN_CONFIG), ckpt, device="cpu")
        measures = root / "m" / "run.measures.safetensors"
        measures.parent.mkdir()
        measure_checkpoint(ckpt, measures, estimator="exact", batch_size=64, device="cpu")
        return {"ckpt": ckpt, "measures": measures}
    finally:
        torch.set_num_threads(threads)


def _start_pair(argv: list[str]) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-m", "nfm_cli", *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=ENV) for _ in range(2)]


def _freeze_holder(procs: list[subprocess.Popen], out: Path) -> tuple[subprocess.Popen, subprocess.Popen]:
    """SIGSTOP whichever process holds the lock of ``out``; (holder, other). Asserts that it still
    holds it once stopped (its lock file names it and it has not exited)."""
    path = lock_path(out)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        holder = read_holder(path)
        pids = {p.pid: p for p in procs}
        if holder is not None and holder.pid in pids:
            proc = pids[holder.pid]
            proc.send_signal(signal.SIGSTOP)
            again = read_holder(path)
            assert proc.poll() is None and again is not None and again.pid == proc.pid, \
                "the lock holder finished before it could be frozen; the test did not create the conflict"
            return proc, next(p for p in procs if p is not proc)
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.001)
    raise AssertionError("no process took the lock")


@pytest.mark.integration
def test_two_trains_on_one_out(tmp_path, reference):
    out = tmp_path / "run.safetensors"
    procs = _start_pair(["train", *TRAIN_ARGS, "--out", str(out)])
    try:
        holder, other = _freeze_holder(procs, out)
        _, err = other.communicate(timeout=300)
        assert other.returncode == EXIT_LOCKED, err            # the second met the lock ...
        assert f"pid {holder.pid}" in err and err.count("\n") == 1 and "Traceback" not in err
        holder.send_signal(signal.SIGKILL)                      # ... and the holder dies holding it
        holder.wait()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert read_holder(lock_path(out)).pid == holder.pid        # a stale lock file is left ...
    rerun = subprocess.run([sys.executable, "-m", "nfm_cli", "train", *TRAIN_ARGS, "--out", str(out)],
                           capture_output=True, text=True, env=ENV, timeout=300)
    assert rerun.returncode == 0, rerun.stderr                  # ... and taken over by the rerun
    assert_same_artifact(out, reference["ckpt"])
    assert _leftovers(tmp_path) == []


@pytest.mark.integration
def test_two_measures_on_one_out_with_wait(tmp_path, reference):
    out = tmp_path / "run.measures.safetensors"
    procs = _start_pair(["measure", str(reference["ckpt"]), "--out", str(out), "--estimator", "exact",
                         "--batch-size", "64", "--device", "cpu", "--json", "--wait"])
    try:
        holder, other = _freeze_holder(procs, out)
        line = other.stderr.readline()                          # blocks until the other meets the lock
        assert "waiting for another nfm" in line and f"pid {holder.pid}" in line, line
        holder.send_signal(signal.SIGCONT)
        results = [p.communicate(timeout=300) for p in (holder, other)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert holder.returncode == 0 and other.returncode == 0, results
    assert json.loads(results[0][0])["path"] == json.loads(results[1][0])["path"] == str(out)
    assert results[1][1] == "" and results[0][1] == ""            # nothing else on stderr (--json)
    got_t, got_m = read_safetensors(out)
    want_t, want_m = read_safetensors(reference["measures"])
    assert got_m["nfm.result"] == want_m["nfm.result"] and got_m["nfm.config"] == want_m["nfm.config"]
    assert sorted(got_t) == sorted(want_t) and all(torch.equal(got_t[k], want_t[k]) for k in want_t)
    for loss in ("normalized-ce", "ce"):
        name = f"run.measures.hdiag-{loss}.safetensors"
        assert_same_artifact(tmp_path / name, reference["measures"].parent / name)
    assert _leftovers(tmp_path) == []


def test_an_in_process_sweep_run_takes_the_same_locks(tmp_path):
    from nfm_cli.steps.sweep import expand, parse_grid_args, run_one
    run = expand(parse_grid_args(["width=16", "dataset=synthetic", "epochs=1"]), [0], tmp_path)[0]
    with output_lock(run.checkpoint, command="nfm train"), pytest.raises(OutputLocked, match=f"pid {os.getpid()}"):
        run_one(run, device="cpu")
    assert not run.checkpoint.exists() and _leftovers(tmp_path) == []
