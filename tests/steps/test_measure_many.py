"""steps.measure_many: many files through one step, each file's outcome a value, interrupts not."""
import signal
from pathlib import Path

import pytest

from nfm_cli.errors import NfmError
from nfm_cli.runtime import interrupt
from nfm_cli.steps import measure_many
from nfm_cli.steps.measure_many import check_distinct_outputs, count_line, each_file, exit_code
from nfm_cli.store.locks import EXIT_LOCKED


def _work(log):
    def work(path: Path):
        log.append(path.name)
        if path.name == "bad":
            raise NfmError("not a checkpoint", path)
        if path.name == "other":
            raise NfmError("refers to another file", "elsewhere.safetensors")
        if path.name == "bug":
            raise KeyError("layers")
        if path.name == "stop":
            raise interrupt.Interrupted(signal.SIGTERM, "saved the Hessian in progress")
        return path.name.upper()
    return work


def test_every_file_gets_its_outcome_in_order_and_errors_are_values():
    log, seen = [], []
    outcomes = each_file(["a", "bad", "other", "bug", "c"], _work(log), on_outcome=seen.append)
    assert log == ["a", "bad", "other", "bug", "c"] and seen == outcomes
    assert [o.result for o in outcomes] == ["A", None, None, None, "C"]
    assert outcomes[1].error == "bad: not a checkpoint" and outcomes[1].exit_code == 1
    assert outcomes[2].error == "other: elsewhere.safetensors: refers to another file"   # named, once
    assert outcomes[3].error.startswith("bug: internal error KeyError: 'layers'") and outcomes[3].exit_code == 3
    assert all(o.seconds >= 0 for o in outcomes) and [o.index for o in outcomes] == list(range(5))
    assert exit_code(outcomes) == 1                      # two different codes: the general one
    assert count_line(outcomes) == "5 checkpoints: 2 measured, 3 failed (bad, other, bug)"


def test_an_interrupt_stops_the_loop_with_the_count():
    log = []
    with pytest.raises(interrupt.Interrupted) as stop:
        each_file(["a", "stop", "c"], _work(log))
    assert log == ["a", "stop"]                          # nothing new started
    assert stop.value.signum == signal.SIGTERM
    assert stop.value.saved == "saved the Hessian in progress; 1 of 3 files were done before it"


def test_internal_errors_raise_under_debug_and_codes_combine():
    with pytest.raises(KeyError):
        each_file(["bug"], _work([]), raise_internal=True)
    locked = measure_many.FileOutcome(0, Path("x"), 0.0, error="x: busy", exit_code=EXIT_LOCKED)
    fine = measure_many.FileOutcome(1, Path("y"), 0.0, result=1)
    assert exit_code([locked, fine]) == EXIT_LOCKED and exit_code([fine]) == 0
    assert count_line([fine], "files", "written") == "1 files: 1 written, 0 failed"


def test_two_inputs_with_one_output_are_refused(tmp_path):
    check_distinct_outputs([(tmp_path / "a", tmp_path / "a.m"), (tmp_path / "a", tmp_path / "a.m")])  # one file twice
    with pytest.raises(NfmError, match="would both write"):
        check_distinct_outputs([(tmp_path / "a", tmp_path / "m"), (tmp_path / "b", tmp_path / "m")])
