"""Memory limits (issue 15, item 3): the automatic batch size under cgroup / available-memory limits,
and the halving retry after an out-of-memory error.

The cgroup and /proc/meminfo readers run on fake trees written here (v2 and v1 layouts, limits on
an ancestor, "max" and v1's huge "no limit"); the expected numbers are computed by hand. The OOM
retry is exercised by a rule that raises ``torch.OutOfMemoryError`` once for a batch of more than
64 samples: the run must note it once and give the same diagonal as a run with ``--batch-size 64``
bit for bit (the parts are summed in the same order), and the unsplit run's up to float rounding.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from nfm_cli.curvature import batch_size as driver
from nfm_cli.curvature import estimators
from nfm_cli.curvature.registry import estimator_spec
from nfm_cli.errors import NfmError
from nfm_cli.runtime import memory
from nfm_cli.runtime.progress import NOTE
from nfm_cli.steps.hessian_diag import compute_hessian_diagonal
from nfm_cli.store.artifacts import read_artifact

GIB = 1 << 30


def _tree(root, files: dict[str, str]):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_cgroup_v2_smallest_limit_minus_usage_over_ancestors(tmp_path):
    _tree(tmp_path, {"proc": "0::/slurm/job7/step0\n",
                     "cg/memory.max": "max\n",
                     "cg/slurm/job7/memory.max": f"{4 * GIB}\n", "cg/slurm/job7/memory.current": f"{GIB}\n",
                     "cg/slurm/job7/step0/memory.max": "max\n", "cg/slurm/job7/step0/memory.current": "5\n"})
    assert memory.cgroup_available(tmp_path / "cg", tmp_path / "proc") == 3 * GIB
    _tree(tmp_path, {"cg/slurm/job7/step0/memory.max": f"{2 * GIB}\n"})
    assert memory.cgroup_available(tmp_path / "cg", tmp_path / "proc") == 2 * GIB - 5


def test_cgroup_v1_and_unlimited(tmp_path):
    _tree(tmp_path, {"proc": "9:name=systemd:/\n4:cpu,memory:/job\n0::/\n",
                     "cg/memory/memory.limit_in_bytes": "9223372036854771712\n",
                     "cg/memory/job/memory.limit_in_bytes": f"{GIB}\n",
                     "cg/memory/job/memory.usage_in_bytes": f"{GIB // 4}\n"})
    assert memory.cgroup_available(tmp_path / "cg", tmp_path / "proc") == 3 * GIB // 4
    _tree(tmp_path, {"cg/memory/job/memory.limit_in_bytes": "9223372036854771712\n"})
    assert memory.cgroup_available(tmp_path / "cg", tmp_path / "proc") is None
    assert memory.cgroup_available(tmp_path / "none", tmp_path / "no-proc") is None


def test_meminfo_and_the_environment_limit(tmp_path, monkeypatch):
    (tmp_path / "meminfo").write_text("MemTotal:       24684092 kB\nMemFree: 1 kB\nMemAvailable:   1000 kB\n")
    assert memory.mem_available(tmp_path / "meminfo") == 1_024_000
    for text, value in [("1000", 1000), ("512M", 512 << 20), ("2G", 2 * GIB), ("2GiB", 2 * GIB), ("1.5k", 1536)]:
        monkeypatch.setenv(memory.LIMIT_ENV, text)
        assert memory.env_limit() == value
    for bad in ("lots", "-1G", "0"):
        monkeypatch.setenv(memory.LIMIT_ENV, bad)
        with pytest.raises(NfmError, match=memory.LIMIT_ENV):
            memory.env_limit()


def test_available_is_the_smallest_of_all_known(tmp_path, monkeypatch):
    _tree(tmp_path, {"proc": "0::/job\n", "cg/job/memory.max": f"{3 * GIB}\n", "cg/job/memory.current": "0\n",
                     "meminfo": f"MemAvailable: {2 * GIB // 1024} kB\n"})
    monkeypatch.setattr(memory, "CGROUP_ROOT", tmp_path / "cg")
    monkeypatch.setattr(memory, "PROC_CGROUP", tmp_path / "proc")
    monkeypatch.setattr(memory, "MEMINFO", tmp_path / "meminfo")
    monkeypatch.delenv(memory.LIMIT_ENV, raising=False)
    assert memory.available_bytes("cpu") == 2 * GIB
    monkeypatch.setenv(memory.LIMIT_ENV, "1G")
    assert memory.available_bytes("cpu") == GIB


def _model() -> nn.Module:
    # leaf outputs for one 1x28x28 sample: Flatten 784, Linear 100, ReLU 100, Linear 10 = 994 floats
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 10)).eval()


def test_automatic_batch_size_respects_the_limit(monkeypatch):
    per_sample = 994 * 4 * estimator_spec("exact").memory_factor            # 15904 bytes
    monkeypatch.setattr(driver, "available_bytes", lambda device=None: None)
    assert driver.auto_batch_size(_model(), torch.zeros(1, 1, 28, 28), "exact", 10_000) == 512
    # half of the available memory is the budget: 100 samples fit, the largest power of two is 64
    monkeypatch.setattr(driver, "available_bytes", lambda device=None: 2 * 100 * per_sample)
    assert driver.auto_batch_size(_model(), torch.zeros(1, 1, 28, 28), "exact", 10_000) == 64
    monkeypatch.setattr(driver, "available_bytes", lambda device=None: 2 * 64 * per_sample - 1)
    assert driver.auto_batch_size(_model(), torch.zeros(1, 1, 28, 28), "exact", 10_000) == 32
    monkeypatch.setattr(driver, "available_bytes", lambda device=None: 0)      # nothing left: one sample
    assert driver.auto_batch_size(_model(), torch.zeros(1, 1, 28, 28), "exact", 10_000) == 1


def test_a_partial_run_keeps_its_batch_size_when_memory_changes(tiny_checkpoint, tmp_path, monkeypatch, one_thread):
    """Started under NFM_MEMORY_LIMIT (small batches), interrupted, resumed without it: the rerun
    continues with the saved batch size (instead of refusing a partial run of another batch size)
    and ends bit-identical to an uninterrupted run with that batch size."""
    out = tmp_path / "h.safetensors"
    monkeypatch.setenv(memory.LIMIT_ENV, "300K")
    seen = []

    def stop_after_two(event):
        seen.append(event.done)
        if event.task == "exact" and event.done >= 64:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compute_hessian_diagonal(tiny_checkpoint, out, device="cpu", progress=stop_after_two)
    progress = read_artifact(out).meta["progress"]
    small = progress["batch_size"]
    assert not progress["complete"] and 1 <= small < 128 and progress["units_done"] * small >= 64
    monkeypatch.delenv(memory.LIMIT_ENV)
    resumed = compute_hessian_diagonal(tiny_checkpoint, out, device="cpu")
    assert resumed.status == "resumed" and resumed.config["batch_size"] == small
    whole = compute_hessian_diagonal(tiny_checkpoint, tmp_path / "w.safetensors", device="cpu", batch_size=small)
    for name, value in whole.diagonal.items():
        assert torch.equal(resumed.diagonal[name], value), name
    assert compute_hessian_diagonal(tiny_checkpoint, tmp_path / "x.safetensors", device="cpu").config[
        "batch_size"] == 128                                        # without the limit: all 128 samples


RULES = {"exact": "exact_diagonal_batch", "hutchinson": "hessian_vector_sum", "finite-diff": "gradient_sum"}


@pytest.mark.parametrize("estimator", list(RULES))
def test_out_of_memory_halves_the_batch_and_retries(tiny_checkpoint, tmp_path, monkeypatch, one_thread, estimator):
    opts = dict(estimator=estimator, probes=2, device="cpu")
    plain = compute_hessian_diagonal(tiny_checkpoint, tmp_path / "plain.safetensors", batch_size=128, **opts)
    halves = compute_hessian_diagonal(tiny_checkpoint, tmp_path / "halves.safetensors", batch_size=64, **opts)
    rule = getattr(estimators, RULES[estimator])
    raised = []

    def once(model, *args):
        x = args[1] if estimator != "exact" else args[0]
        if len(x) > 64 and not raised:
            raised.append(len(x))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return rule(model, *args)

    monkeypatch.setattr(estimators, RULES[estimator], once)
    notes = []
    got = compute_hessian_diagonal(tiny_checkpoint, tmp_path / "oom.safetensors", batch_size=128,
                                   progress=lambda e: notes.append(e.info["message"]) if e.task == NOTE else None,
                                   **opts)
    assert raised == [128]                                          # the fault happened, once
    assert len(notes) == 1 and "out of memory" in notes[0] and "128" in notes[0] and "with 64" in notes[0]
    for name in plain.diagonal:
        assert torch.equal(got.diagonal[name], halves.diagonal[name]), name
        scale = float(plain.diagonal[name].abs().max())             # float32 rounding, relative to the tensor
        assert float((got.diagonal[name] - plain.diagonal[name]).abs().max()) <= 1e-5 * scale, name
    assert got.metrics["degenerate_samples"] == plain.metrics["degenerate_samples"]


def test_out_of_memory_with_one_sample_is_one_line(tiny_checkpoint, tmp_path, monkeypatch):
    def never(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(estimators, "exact_diagonal_batch", never)
    with pytest.raises(NfmError, match="out of memory on cpu with a single sample per batch"):
        compute_hessian_diagonal(tiny_checkpoint, tmp_path / "h.safetensors", batch_size=4, device="cpu")


def test_the_out_of_memory_note_reaches_stderr(cli, tiny_checkpoint, tmp_path, monkeypatch):
    """Through the CLI's progress renderer: one line, and the run still succeeds."""
    rule, raised = estimators.exact_diagonal_batch, []

    def once(model, x, *args):
        if len(x) > 64 and not raised:
            raised.append(len(x))
            raise torch.OutOfMemoryError("CUDA out of memory")
        return rule(model, x, *args)

    monkeypatch.setattr(estimators, "exact_diagonal_batch", once)
    res = cli("hessian-diag", tiny_checkpoint, "--out", tmp_path / "h.safetensors", "--batch-size", "128",
              "--device", "cpu")
    assert res.code == 0 and raised == [128], res.err
    notes = [line for line in res.err.splitlines() if "out of memory" in line]
    assert len(notes) == 1 and "with 128 samples per batch; continuing with 64" in notes[0], res.err
