"""SIGTERM / SIGINT for ``hessian-diag`` (every estimator) and ``measure`` (issue 15, item 1).

The real CLI runs in a subprocess through a launcher that echoes every progress report of the
Hessian driver on stdout ("REPORT <call> <units done>") and, at one chosen report, waits for a line
on stdin. The test reads the echo up to that report, so the process is known to be there (units
done so far = the echoed number, the next unit not started), sends the signal, then lets it go on:
the signal is deferred to the end of the unit that follows, so the run must save exactly one more
unit, print one line saying what it saved and how to resume, and exit 143 (SIGTERM) / 130 (SIGINT).
The saved file's progress counter is checked, the same command is rerun, its echo must start at
that counter (the work before the signal is not redone) and run only the remaining units, and the
final file must equal an uninterrupted in-process run bit for bit (all tensors and metadata except
``nfm.wall_time``).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from nfm_cli.steps.hessian_diag import compute_hessian_diagonal
from nfm_cli.steps.measure import measure_checkpoint
from nfm_cli.store.artifacts import read_artifact
from tests.conftest import assert_same_artifact, read_safetensors, signal_when_ready

LAUNCH_ECHO = (
    "import os, sys, nfm_cli.steps.hessian_diag as d\n"
    "orig, calls = d._report, [0]\n"
    "pause = int(os.environ.get('NFM_TEST_PAUSE_AT_REPORT', '-1'))\n"
    "def report(progress, est, units):\n"
    "    calls[0] += 1\n"
    "    print(f'REPORT {calls[0]} {units}', flush=True)\n"
    "    if calls[0] == pause:\n"
    "        sys.stdin.readline()\n"
    "    orig(progress, est, units)\n"
    "d._report = report\n"
    "from nfm_cli.cli import main\n"
    "main(sys.argv[1:])\n")

HDIAG = {"exact": ["--estimator", "exact", "--batch-size", "16"],                        # 8 units
         "hutchinson": ["--estimator", "hutchinson", "--probes", "3", "--batch-size", "32"],  # 12 units
         "finite-diff": ["--estimator", "finite-diff", "--probes", "2", "--batch-size", "32"]}  # 16 units
UNITS = {"exact": 8, "hutchinson": 12, "finite-diff": 16}


def _env(pause: int) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", NFM_TEST_PAUSE_AT_REPORT=str(pause))


def _reports(stdout: str) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for line in stdout.splitlines() if line.startswith("REPORT ")
            for a, b in [line.split()[1:3]]]


def signal_at(argv: list[str], pause: int, sig: int) -> tuple[int, str, list[tuple[int, int]]]:
    """Run the CLI, send ``sig`` while it waits at report number ``pause``; (exit code, stderr, reports)."""
    code, err, lines = signal_when_ready([sys.executable, "-c", LAUNCH_ECHO, *argv],
                                         lambda line: line.startswith(f"REPORT {pause} "), sig, env=_env(pause))
    return code, err, _reports("\n".join(lines))


def rerun(argv: list[str]) -> list[tuple[int, int]]:
    done = subprocess.run([sys.executable, "-c", LAUNCH_ECHO, *argv], capture_output=True, text=True,
                          env=_env(-1), timeout=300)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    return _reports(done.stdout)


@pytest.fixture(scope="module")
def references(tiny_checkpoint, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("sig-hdiag-ref")
        out = {}
        for est, args in HDIAG.items():
            out[est] = root / f"{est}.safetensors"
            probes = int(args[args.index("--probes") + 1]) if "--probes" in args else None
            compute_hessian_diagonal(tiny_checkpoint, out[est], estimator=est, probes=probes,
                                     batch_size=int(args[args.index("--batch-size") + 1]), device="cpu")
        out["measures"] = root / "m" / "run.measures.safetensors"
        out["measures"].parent.mkdir()
        measure_checkpoint(tiny_checkpoint, out["measures"], estimator="exact", batch_size=16, device="cpu")
        return out
    finally:
        torch.set_num_threads(threads)


@pytest.mark.integration
@pytest.mark.parametrize("estimator", list(HDIAG))
def test_sigterm_saves_and_the_rerun_continues_bit_identically(tiny_checkpoint, tmp_path, references, estimator):
    out = tmp_path / "h.safetensors"
    argv = ["hessian-diag", str(tiny_checkpoint), "--out", str(out), "--device", "cpu", "--quiet", *HDIAG[estimator]]
    pause = 4                                            # report 4 = after 3 units (report 1 is the start)
    code, err, seen = signal_at(argv, pause, signal.SIGTERM)
    assert code == 143, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "interrupted by SIGTERM" in lines[0] and "rerun the same command" in lines[0], err
    assert f"4 of {UNITS[estimator]} units of {out} are saved" in lines[0]
    assert seen[-1] == (pause, 3)                        # it stopped at once: no unit reported after the signal
    progress = read_artifact(out).meta["progress"]
    assert progress == dict(progress, complete=False, units_done=4, units_total=UNITS[estimator])
    again = rerun(argv)
    assert again[0][1] == 4                              # the rerun starts from the saved counter ...
    assert [u for _, u in again] == list(range(4, UNITS[estimator] + 1))   # ... and runs only the rest
    assert_same_artifact(out, references[estimator])


@pytest.mark.integration
def test_sigint_during_measure_saves_and_the_rerun_finishes(tiny_checkpoint, tmp_path, references):
    """Ctrl-C in measure's shared run (both Hessians and Fisher-Rao from one forward per batch,
    steps/measure_shared.py): its state is saved in the normalized-ce file, the ce file not yet written."""
    out = tmp_path / "run.measures.safetensors"
    argv = ["measure", str(tiny_checkpoint), "--out", str(out), "--estimator", "exact", "--batch-size", "16",
            "--device", "cpu", "--json"]
    pause = 3                                            # reports 1..3: 0, 1, 2 of 8 units done
    code, err, seen = signal_at(argv, pause, signal.SIGINT)
    assert code == 130, err
    lines = err.strip().splitlines()
    first = tmp_path / "run.measures.hdiag-normalized-ce.safetensors"
    ce = tmp_path / "run.measures.hdiag-ce.safetensors"
    assert len(lines) == 1 and "interrupted by SIGINT" in lines[0] and f"3 of 8 units of {first} are saved" in lines[0]
    assert seen[-1] == (pause, 2) and not out.exists() and not ce.exists()
    assert read_artifact(first).meta["progress"]["units_done"] == 3
    again = rerun(argv)
    assert [u for _, u in again] == list(range(3, 9))   # only the last 5 units of the shared run
    got_t, got_m = read_safetensors(out)
    want_t, want_m = read_safetensors(references["measures"])
    assert got_m["nfm.result"] == want_m["nfm.result"] and got_m["nfm.config"] == want_m["nfm.config"]
    assert sorted(got_t) == sorted(want_t) and all(torch.equal(got_t[k], want_t[k]) for k in want_t)
    for loss in ("normalized-ce", "ce"):
        name = f"run.measures.hdiag-{loss}.safetensors"
        assert_same_artifact(tmp_path / name, references["measures"].parent / name)
    assert json.loads(got_m["nfm.parents"])["trace_hessian"] == read_artifact(ce).sha256
