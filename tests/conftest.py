"""Shared fixtures: isolated cache/data folders, a tiny synthetic checkpoint, an in-process CLI runner."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from nfm_cli.cli import main
from nfm_cli.training import TrainConfig, train


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


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A complete 2-epoch MLP checkpoint on 128 synthetic samples (session-wide, do not modify)."""
    out = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    train(tiny_config(), out, device="cpu")
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
