"""``torchrun -m nfm_cli hessian-diag|measure`` with 2 gloo processes on the CPU (issue 6).

Every run is a subprocess bounded by a timeout, on a free port, tagged with a marker in its
environment so the test can check that no process of it outlives it.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from nfm_cli.steps.hessian_diag import compute_hessian_diagonal, read_hessian_diagonal
from nfm_cli.steps.measure import measure_checkpoint
from nfm_cli.store.artifacts import read_artifact

pytestmark = pytest.mark.integration   # multi-process: `make test` runs these, `make test-fast` skips them

TIMEOUT = 120
MARKER = f"nfm-dist-test-{uuid.uuid4().hex}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    # the same thread count on both sides, so float32 per-batch work rounds the same way
    env.update(OMP_NUM_THREADS="1", NFM_DIST_TEST_MARKER=MARKER, **extra)
    return env


def _command(args, procs: int, entry: tuple[str, ...] = ("-m", "nfm_cli")) -> list[str]:
    if procs == 1:
        return [sys.executable, *entry, *map(str, args)]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs),
            "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *entry, *map(str, args)]


def _ranks_command(args, procs: int, entry: tuple[str, ...] = ("-m", "nfm_cli")) -> list[str]:
    """The ranks started directly, as ``srun`` starts them (one process per rank, the rendezvous in the
    environment), from a shell that exits with the highest rank status: the same job as torchrun's
    without its launcher process (a second torch import per run)."""
    line = " ".join(shlex.quote(a) for a in (sys.executable, *entry, *map(str, args)))
    # fd 3 keeps the shell's stdin for the ranks (a background job's stdin is /dev/null otherwise)
    starts = "; ".join(f"RANK={r} LOCAL_RANK={r} {line} <&3 & p{r}=$!" for r in range(procs))
    waits = "; ".join(f"wait $p{r}; s=$?; [ $s -gt $e ] && e=$s" for r in range(procs))
    return ["sh", "-c", f"export WORLD_SIZE={procs} MASTER_ADDR=127.0.0.1 MASTER_PORT={_free_port()}; "
                        f"exec 3<&0; {starts}; e=0; {waits}; exit $e"]


def nfm(*args, procs: int = 1, direct: bool = False, **env: str) -> subprocess.CompletedProcess:
    """``nfm ARGS`` over ``procs`` processes: under torchrun, or with ``direct`` started as srun starts ranks."""
    command = _ranks_command(args, procs) if direct and procs > 1 else _command(args, procs)
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=_env(**env))


def _units_saved(out: Path) -> int:
    """Units done in the partial file at ``out`` (0 while there is none or it is being replaced)."""
    try:
        progress = read_artifact(out).meta["progress"]
    except Exception:
        return 0
    return 0 if progress.get("complete") else int(progress.get("units_done", 0))


def kill_after_a_save(args, out: Path, procs: int) -> int:
    """Run ``nfm ARGS`` over ``procs`` ranks (started directly, as srun starts them) and SIGKILL the whole
    job (launching shell and every rank) as soon as ``out`` appears (its first partial save); returns the
    units saved in it. Fails if the job finished before the kill: the test is about a kill."""
    proc = subprocess.Popen(_ranks_command(args, procs), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=_env())
    deadline = time.monotonic() + TIMEOUT
    try:
        while proc.poll() is None and time.monotonic() < deadline and not out.exists():
            time.sleep(0.001)
        assert proc.poll() is None, f"finished before the kill: {proc.stderr.read()[-500:]}"
        # kill every process of this test's job (torchrun would start its ranks in sessions of their own)
        for pid in [proc.pid, *_marked_processes()]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    finally:
        proc.wait(timeout=30)
        proc.stderr.close()
    for _ in range(200):
        if not _marked_processes():
            break
        time.sleep(0.05)
    return _units_saved(out)


def _marked_processes() -> list[int]:
    """pids of live processes whose environment carries this module's marker (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if MARKER.encode() in environ:
            found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint) -> Path:
    """The session-wide tiny MLP (conftest.py): 128 samples, so 8 batches of 16."""
    return tiny_checkpoint


@pytest.fixture(scope="module")
def single_and_dist(ckpt, tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs")
    single, sharded = folder / "single.safetensors", folder / "dist.safetensors"
    compute_hessian_diagonal(ckpt, single, batch_size=16, device="cpu")     # in-process: compared to 1e-6
    r2 = nfm("hessian-diag", ckpt, "--out", sharded, "--batch-size", "16", "--device", "cpu", procs=2)
    assert r2.returncode == 0, r2.stderr
    return single, sharded, r2


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rel: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        scale = float(a[name].abs().max()) or 1.0
        assert float((a[name] - b[name]).abs().max()) <= rel * scale, name


def test_sharded_exact_diagonal_equals_single_process(single_and_dist):
    single, sharded, run = single_and_dist
    a, b = read_hessian_diagonal(single), read_hessian_diagonal(sharded)
    _assert_close(a.diagonal, b.diagonal, 1e-6)
    assert math.isclose(a.metrics["trace_total"], b.metrics["trace_total"], rel_tol=1e-6, abs_tol=1e-12)
    assert b.artifact.meta["progress"]["complete"] and b.artifact.meta["progress"]["units_done"] == 8
    assert run.stdout.strip() == str(sharded)          # rank 0 alone prints the path
    assert run.stderr.count("computed exact") == 1     # ... and the summary
    assert not _marked_processes()


# hutchinson, 16 probes over batches of 4: 16 chunks (one probe each, 32 units), 8 rounds of 2, a save after
# every round (--save-every 0): the kill lands at the first save, with 7 rounds still to run
KILLED_RUN = ("--estimator", "hutchinson", "--probes", "16", "--batch-size", "4", "--device", "cpu", "-q")
UNITS_PER_ROUND, UNITS_TOTAL = 2 * 32, 16 * 32


def test_killed_and_resumed_sharded_run_equals_uninterrupted(ckpt, tmp_path):
    """A real SIGKILL of the whole torchrun job after a partial save, then the same command: the result
    equals an uninterrupted run over the same batches and probes (per-unit work identical, only the
    float64 sums added in another order)."""
    reference, out = tmp_path / "reference.safetensors", tmp_path / "resumed.safetensors"
    assert nfm("hessian-diag", ckpt, "--out", reference, *KILLED_RUN).returncode == 0
    args = ("hessian-diag", ckpt, "--out", out, "--save-every", "0", *KILLED_RUN)
    saved = kill_after_a_save(args, out, procs=2)
    assert read_artifact(out).meta["progress"]["complete"] is False
    assert UNITS_PER_ROUND <= saved < UNITS_TOTAL and saved % UNITS_PER_ROUND == 0
    # the same process count continues it (another count works too: see the next test)
    resumed = nfm(*args, procs=2, direct=True)
    assert resumed.returncode == 0, resumed.stderr
    assert read_artifact(out).meta["progress"]["complete"] is True
    a, b = read_hessian_diagonal(reference), read_hessian_diagonal(out)
    _assert_close(a.diagonal, b.diagonal, 1e-12)
    _assert_close(a.stderr, b.stderr, 1e-10)
    assert not _marked_processes()


@pytest.mark.slow
def test_sharded_partial_file_continues_with_one_process(ckpt, tmp_path):
    reference, out = tmp_path / "reference.safetensors", tmp_path / "mixed.safetensors"
    assert nfm("hessian-diag", ckpt, "--out", reference, *KILLED_RUN).returncode == 0
    args = ("hessian-diag", ckpt, "--out", out, "--save-every", "0", *KILLED_RUN)
    assert kill_after_a_save(args, out, procs=2) >= UNITS_PER_ROUND
    resumed = nfm(*args)
    assert resumed.returncode == 0, resumed.stderr
    _assert_close(read_hessian_diagonal(reference).diagonal, read_hessian_diagonal(out).diagonal, 1e-12)
    assert not _marked_processes()


def test_sharded_measure_equals_single_process(ckpt, tmp_path):
    single, sharded = tmp_path / "m1.safetensors", tmp_path / "m2.safetensors"
    measure_checkpoint(ckpt, single, batch_size=32, device="cpu")                # in-process: compared to 1e-6
    r2 = nfm("measure", ckpt, "--out", sharded, "--batch-size", "32", "--device", "cpu", "--json", procs=2)
    assert r2.returncode == 0, r2.stderr
    a, b = read_artifact(single).meta["result"], read_artifact(sharded).meta["result"]
    for key in ("normalized_sharpness", "matrix_normalized_sharpness", "hessian_trace", "fisher_rao_norm"):
        assert math.isclose(a[key], b[key], rel_tol=1e-6), key
    assert r2.stdout.count("{") >= 1 and r2.stdout.count('"path"') == 1   # one JSON object, from rank 0
    assert not _marked_processes()


@pytest.mark.slow
def test_sharded_hutchinson_shards_probes(ckpt, tmp_path):
    single, sharded = tmp_path / "h1.safetensors", tmp_path / "h2.safetensors"
    common = ("--estimator", "hutchinson", "--probes", "5", "--batch-size", "32", "--device", "cpu", "-q")
    assert nfm("hessian-diag", ckpt, "--out", single, *common).returncode == 0
    r = nfm("hessian-diag", ckpt, "--out", sharded, *common, procs=2)
    assert r.returncode == 0, r.stderr
    a, b = read_hessian_diagonal(single), read_hessian_diagonal(sharded)
    _assert_close(a.diagonal, b.diagonal, 1e-6)
    _assert_close(a.stderr, b.stderr, 1e-5)
    assert not _marked_processes()


# Like tests/steps/test_hessian_diag_signals.py's launcher, as a script for the ranks: each worker prints its rank
# and pid; rank 0 echoes the driver's progress reports and waits for a line on stdin at one of them.
LAUNCH_SCRIPT = """\
import os, sys
sys.stdout.write(f"PID {os.environ.get('RANK', '0')} {os.getpid()}\\n")   # one write: the ranks share the pipe
sys.stdout.flush()
import nfm_cli.steps.hessian_diag as d
orig, calls = d._report, [0]
pause = int(os.environ.get('NFM_TEST_PAUSE_AT_REPORT', '-1'))
def report(progress, est, units):
    if os.environ.get('RANK', '0') == '0':
        calls[0] += 1
        sys.stdout.write(f'REPORT {calls[0]} {units}\\n')
        sys.stdout.flush()
        if calls[0] == pause:
            sys.stdin.readline()
    orig(progress, est, units)
d._report = report
from nfm_cli.cli import main
main(sys.argv[1:])
"""


@pytest.mark.integration
def test_sigterm_to_a_sharded_run_saves_the_round_and_resumes(ckpt, single_and_dist, tmp_path):
    """SIGTERM to both workers (as SLURM sends it to every task) while rank 0 waits after round 1
    (units 0-1): the ranks agree at the end of round 2, save 4 of 8 units, exit 143; a torchrun
    rerun starts at unit 4 and ends equal to the uninterrupted sharded run."""
    _, sharded, _ = single_and_dist
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCH_SCRIPT)
    out = tmp_path / "signalled.safetensors"
    # the ranks started directly, as srun starts them (the torchrun launch is tested above)
    cmd = _ranks_command(("hessian-diag", ckpt, "--out", out, "--batch-size", "16", "--device", "cpu", "-q"), 2,
                         entry=(str(launcher),))
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(NFM_TEST_PAUSE_AT_REPORT="2"))
    pids, seen = {}, []
    try:
        for line in proc.stdout:
            for rank, pid in re.findall(r"PID (\d+) (\d+)", line):
                pids[rank] = int(pid)
            reports = re.findall(r"REPORT (\d+) (\d+)", line)
            seen.extend((int(c), int(u)) for c, u in reports)
            if seen and seen[-1][0] == 2:
                break
        assert seen[-1] == (2, 2) and sorted(pids) == ["0", "1"], (seen, pids)
        for pid in pids.values():
            os.kill(pid, signal.SIGTERM)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in pids.values():           # workers orphaned by a failure above must not outlive the test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert f"interrupted by SIGTERM; 4 of 8 units of {out} are saved" in err, err
    assert err.count(" are saved") == 1                   # rank 0 alone saved (and says so)
    assert read_artifact(out).meta["progress"]["units_done"] == 4
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    assert resumed.returncode == 0, resumed.stderr
    reports = [int(line.split()[2]) for line in resumed.stdout.splitlines() if line.startswith("REPORT ")]
    assert reports == [4, 6, 8]                           # the first 4 units were not redone
    _assert_close(read_hessian_diagonal(sharded).diagonal, read_hessian_diagonal(out).diagonal, 1e-12)
    assert not _marked_processes()
