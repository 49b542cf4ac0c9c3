"""Shared fixtures: isolated cache/data folders, one chain of tiny session-wide artifacts, an in-process CLI runner."""
from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Callable

import pytest
import torch

from nfm_cli.cli import main
from nfm_cli.hessian import compute_hessian_diagonal
from nfm_cli.solving import solve_variance
from nfm_cli.training import TrainConfig, train


def _share_the_cores_between_workers() -> None:
    """Under pytest-xdist (make test runs ``-n auto``) each worker gets cores / workers torch threads,
    so two workers on two cores do not fight over them; alone, torch keeps its default."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


_share_the_cores_between_workers()


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """No test reads or writes the user's cache or $NFM_DATA; runs are single-threaded-stable."""
    monkeypatch.setenv("NFM_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("NFM_DATA", raising=False)
    monkeypatch.delenv("NFM_DEBUG", raising=False)


@pytest.fixture
def one_thread():
    """Tiny float64 models are overhead-bound: one thread is faster, and robust on a shared 2-core VM."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sha256_of(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tiny_config(**overrides) -> TrainConfig:
    base = dict(model="mlp", dataset="synthetic", width=16, epochs=2, batch_size=32, train_size=128,
                test_size=64, random_ratio=0.3, seed=0)
    base.update(overrides)
    return TrainConfig(**base)


# One chain of session-wide artifacts, made once and shared by every test module (never modify them;
# copy one into tmp_path first): checkpoint -> exact normalized-ce Hessian diagonal -> measures file,
# and a second checkpoint of the same config with another seed (for lineage refusals).

@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A complete 2-epoch MLP checkpoint on 128 synthetic samples."""
    out = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    train(tiny_config(), out, device="cpu")
    return out


@pytest.fixture(scope="session")
def other_checkpoint(tmp_path_factory) -> Path:
    """The same config as ``tiny_checkpoint`` with seed 1: another checkpoint, same model."""
    out = tmp_path_factory.mktemp("ckpt-other") / "other.safetensors"
    train(tiny_config(seed=1), out, device="cpu")
    return out


@pytest.fixture(scope="session")
def tiny_hdiag(tiny_checkpoint, tmp_path_factory) -> Path:
    """The exact normalized-ce Hessian diagonal of ``tiny_checkpoint``."""
    out = tmp_path_factory.mktemp("hdiag") / "tiny.hdiag.safetensors"
    compute_hessian_diagonal(tiny_checkpoint, out, loss="normalized-ce", estimator="exact", device="cpu")
    return out


@pytest.fixture(scope="session")
def tiny_measures(tiny_checkpoint, tiny_hdiag, tmp_path_factory) -> Path:
    """``solve-variance`` of ``tiny_checkpoint`` with ``tiny_hdiag``."""
    out = tmp_path_factory.mktemp("measures") / "tiny.measures.safetensors"
    solve_variance(tiny_checkpoint, tiny_hdiag, out)
    return out


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def cli(capsys):
    """Run ``nfm ARGS`` in-process; returns exit code, stdout, stderr."""

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def read_safetensors(path) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file, read directly (not through nfm's readers)."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def assert_same_artifact(got, want, ignore=("nfm.wall_time",)) -> None:
    """Bit-identical tensors (names, dtypes, values) and metadata, except the keys in ``ignore``."""
    gt, gm = read_safetensors(got)
    wt, wm = read_safetensors(want)
    assert sorted(gt) == sorted(wt), f"{got}: tensor names differ"
    for name in wt:
        assert gt[name].dtype == wt[name].dtype and torch.equal(gt[name], wt[name]), f"{got}: tensor {name} differs"
    strip = lambda m: {k: v for k, v in m.items() if k not in ignore}  # noqa: E731
    assert strip(gm) == strip(wm), f"{got}: metadata differs"


def signal_when_ready(cmd: list[str], ready: Callable[[str], bool], sig: int, env: dict[str, str] | None = None,
                      timeout: float = 300) -> tuple[int, str, list[str]]:
    """Run ``cmd`` (a launcher that prints its progress on stdout and, at the chosen point, waits for a
    line on stdin); once a stdout line satisfies ``ready`` the process is known to be there: send
    ``sig``, release it, and return (exit code, stderr, every stdout line). The process never outlives
    the call."""
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    seen: list[str] = []
    try:
        for line in proc.stdout:
            seen.append(line.rstrip("\n"))
            if ready(seen[-1]):
                break
        else:
            raise AssertionError(f"the run ended before the point to signal it: {proc.stderr.read()}")
        proc.send_signal(sig)             # it waits on stdin: the signal lands at a known point
        proc.stdin.write("go\n")
        proc.stdin.flush()
        rest, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err, seen + rest.splitlines()
