"""``nfm sweep --jobs N``'s workers: N processes, each training and measuring its share of the runs.

A worker (``nfm sweep-worker``, started by ``WorkerPool``) reads one run per line on stdin (JSON:
index, name, train config, output paths, rivals, device), trains and measures it in its own process
(``sweep.run_one``: the same locks, resume and skipping as alone) and answers one tagged JSON line on
stdout: the run's index and its error line or null. It pays the start-up (torch, the dataset files:
``data.datasets.shared_splits``) once for all its runs, not twice per run. The pool hands a run to
whichever worker is free, so the runs are shared as they finish; a worker that dies (killed, out of
memory) fails only the run it had, and a new one takes the next.

Signals (issue 15): each worker runs in a session of its own, so a terminal's Ctrl-C reaches it only
through the sweep; on SIGINT/SIGTERM the pool hands out no more runs, passes the signal to the busy
workers (their run saves its progress, as ``nfm train`` / ``nfm measure`` alone would), closes the
idle ones and waits for all of them.
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from nfm_cli.data.datasets import shared_splits
from nfm_cli.errors import NfmError
from nfm_cli.steps.measure_many import internal_error_line

TAG = "nfm-sweep-run "       # the prefix of a worker's answer lines (anything else on its stdout is ignored)
WORKER_ARGV = ["-m", "nfm_cli", "sweep-worker"]


def run_request(run, rivals: bool, device: str) -> str:
    """One run as a worker's input line (JSON)."""
    config = {k: v for k, v in vars(run.config).items() if k != "NON_IDENTITY"}
    return json.dumps({"index": run.index, "name": run.name, "config": config, "checkpoint": str(run.checkpoint),
                       "measures": str(run.measures), "rivals": rivals, "device": device})


def serve(lines: Iterable[str], answer: Callable[[str], None], *, raise_internal: bool = False) -> int:
    """The worker's loop: every input line's run trained and measured in this process, one answer line
    each; returns how many runs it served. An ``interrupt.Interrupted`` goes through (the run saved)."""
    from nfm_cli.steps.sweep import Run, run_one
    from nfm_cli.steps.train import TrainConfig
    served = 0
    with shared_splits():
        for line in lines:
            if not line.strip():
                continue
            req = json.loads(line)
            run = Run(req["index"], req["name"], TrainConfig(**req["config"]), Path(req["checkpoint"]),
                      Path(req["measures"]))
            try:
                run_one(run, rivals=req["rivals"], device=req["device"])
                error = None
            except NfmError as err:
                error = str(err)
            except Exception as exc:
                if raise_internal:
                    raise
                error = internal_error_line(exc)
            answer(TAG + json.dumps({"index": run.index, "error": error}) + "\n")
            served += 1
    return served


class _Worker:
    """One ``nfm sweep-worker`` process; its stderr goes to a temporary file (read when it dies)."""

    def __init__(self, env: dict[str, str]):
        self.stderr = tempfile.TemporaryFile(mode="w+")    # noqa: SIM115 (closed by close())
        self.proc = subprocess.Popen([sys.executable, *WORKER_ARGV], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, bufsize=1,
                                     start_new_session=True)

    def ask(self, request: str) -> tuple[bool, str | None]:
        """(still alive, the run's error or None) for one request line."""
        try:
            self.proc.stdin.write(request + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return False, self.death()
        for line in iter(self.proc.stdout.readline, ""):
            if line.startswith(TAG):
                return True, json.loads(line[len(TAG):])["error"]
        return False, self.death()

    def death(self) -> str:
        """The error line of a worker that stopped answering: its last stderr line, or its exit code."""
        code = self.proc.wait()
        self.stderr.seek(0)
        lines = self.stderr.read().strip().splitlines()
        return lines[-1] if lines else f"the worker process exited with code {code}"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        self.proc.wait()
        self.stderr.close()


class WorkerPool:
    """``jobs`` workers sharing ``runs`` as they come free; answers go to ``results`` as (run, error)."""

    def __init__(self, runs: Sequence[Any], jobs: int, threads: int, rivals: bool, device: str):
        self.pending = deque(runs)
        self.jobs = min(jobs, len(runs))
        self.env = dict(os.environ, NFM_THREADS=str(threads))
        self.rivals, self.device = rivals, device
        self.lock = threading.Lock()
        self.busy: dict[int, _Worker] = {}
        self.stopped = False
        self.results: queue.Queue = queue.Queue()

    def feed(self, slot: int) -> None:
        """One worker slot's loop: take the next run, ask a (live or new) worker, report the answer."""
        worker = None
        try:
            while True:
                with self.lock:
                    if self.stopped or not self.pending:
                        return
                    run = self.pending.popleft()
                    worker = worker or _Worker(self.env)
                    self.busy[slot] = worker
                alive, error = worker.ask(run_request(run, self.rivals, self.device))
                with self.lock:
                    self.busy.pop(slot, None)
                self.results.put((run, error))
                if not alive:
                    worker.close()
                    worker = None
        finally:
            if worker is not None:
                worker.close()

    def stop(self, signum: int) -> int:
        """Hand out no more runs, pass ``signum`` to the busy workers and wait for them; how many were busy."""
        with self.lock:
            self.stopped = True
            busy = list(self.busy.values())
        for worker in busy:
            with contextlib.suppress(ProcessLookupError):
                worker.proc.send_signal(signum)
        for worker in busy:
            worker.proc.wait()
        return len(busy)
