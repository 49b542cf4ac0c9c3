"""Progress without a terminal (issue 13, item 1): plain timestamped lines, written while the job runs."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from nfm_cli.cli.render import LogLines
from nfm_cli.runtime.progress import ProgressEvent

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_log_lines_throttle_and_eta_by_hand():
    lines: list[str] = []
    clock = Clock()
    log = LogLines(lines.append, interval=5.0, clock=clock, wall=lambda: 0.0)
    clock.now = 1001.0
    log(ProgressEvent("batch", 1, 10, {"epoch": 1, "epochs": 4}))      # first event: a line (the job started)
    clock.now = 1011.0
    log(ProgressEvent("epoch", 1, 4, {"loss": 2.5, "train_acc": 0.25, "test_acc": 0.125}))
    clock.now = 1013.0
    log(ProgressEvent("batch", 5, 10, {"epoch": 2, "epochs": 4}))      # batches: only after 60 s of silence
    clock.now = 1014.0
    log(ProgressEvent("epoch", 2, 4, {"loss": 2.0, "train_acc": 0.5, "test_acc": 0.25}))  # 3 s after the last: skipped
    clock.now = 1021.0
    log(ProgressEvent("epoch", 3, 4, {"loss": 1.5, "train_acc": 0.75, "test_acc": 0.5}))
    clock.now = 1022.0
    log(ProgressEvent("epoch", 4, 4, {"loss": 1.0, "train_acc": 1.0, "test_acc": 0.5}))   # the last: always
    clock.now = 1030.0
    log(ProgressEvent("saved", 3, 9, {"file": "h.safetensors"}))
    assert len(lines) == 5, lines
    assert all(re.match(STAMP + " ", line) and line.endswith("\n") for line in lines)
    body = [line[20:].strip() for line in lines]
    assert body[0] == "epoch 1/4 batch 1/10 elapsed 1s"
    # epoch 1 took 10 s (from the first event at 1001): 3 epochs left -> 30 s
    assert body[1] == "epoch 1/4 loss 2.5 train_acc 0.25 test_acc 0.125 elapsed 11s eta 30s"
    # 3 epochs in 20 s -> 1 left: 6.67 s, shown rounded
    assert body[2] == "epoch 3/4 loss 1.5 train_acc 0.75 test_acc 0.5 elapsed 21s eta 7s"
    assert body[3] == "epoch 4/4 loss 1 train_acc 1 test_acc 0.5 elapsed 22s"
    assert body[4].startswith("saved progress of h.safetensors (3/9 units)")


def test_log_lines_for_other_tasks_are_sparser():
    lines: list[str] = []
    clock = Clock()
    log = LogLines(lines.append, interval=5.0, clock=clock, wall=lambda: 0.0)
    for i in range(0, 61):              # one event per second for a minute: lines at 0, 30, 60 s
        clock.now = 1000.0 + i
        log(ProgressEvent("exact", i * 10, 1000, {"unit": "samples"}))
    assert [line[20:].split(" elapsed")[0] for line in lines] == [
        "exact 0/1000 samples", "exact 300/1000 samples", "exact 600/1000 samples"]
    assert lines[1].rstrip().endswith("eta 1m10s")  # 300 in 30 s, 700 left


@pytest.mark.integration
def test_train_logs_epochs_to_a_file_while_it_runs(tmp_path):
    """stderr to a file: lines must be readable before the process ends (no buffering until exit)."""
    log_path = tmp_path / "train.log"
    env = dict(os.environ, NFM_LOG_INTERVAL="0", PYTHONUNBUFFERED="")
    env.pop("PYTHONUNBUFFERED")
    cmd = [sys.executable, "-m", "nfm_cli", "train", "--dataset", "synthetic", "--width", "64", "--epochs", "500",
           "--train-size", "2048", "--out", str(tmp_path / "run.safetensors")]
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log_file, env=env)
    try:
        deadline = time.monotonic() + 120
        text = ""
        while time.monotonic() < deadline:
            text = log_path.read_text()
            if re.search(r"^.* epoch 2/500 loss ", text, re.M):
                break
            assert proc.poll() is None, f"train ended early: {text}"
            time.sleep(0.2)
        still_running = proc.poll() is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert still_running, "the log was only readable after the process ended"
    epoch_lines = [line for line in text.splitlines() if " epoch 1/500 loss " in line]
    assert len(epoch_lines) == 1, text
    assert re.match(STAMP + r" epoch 1/500 loss [\d.e+-]+ train_acc [\d.]+ test_acc [\d.]+ elapsed \d+s eta \S+$",
                    epoch_lines[0]), epoch_lines[0]
    assert "\u2501" not in text and "\x1b[" not in text  # no rich bar, no terminal escapes
