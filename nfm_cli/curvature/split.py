"""Out of memory inside a batch: split it into halves and retry.

Every per-batch rule of the estimators returns sums over the batch's samples (and the logits, row
per sample), so the contribution of a batch is the same, up to float rounding, whether it is
computed at once or as the sum of its parts. ``SubBatches`` runs a rule on the whole batch; when
the device runs out of memory (``torch.OutOfMemoryError``, e.g. the automatic batch size was too
optimistic or another process took GPU memory) it halves its sub-batch size, says so in one line through
the progress callback, and retries; the smaller size is kept for the rest of the run. Nothing is
added to the estimator's state before a unit's contribution is complete, so a retry never counts a
sample twice.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from nfm_cli.errors import NfmError
from nfm_cli.runtime.progress import ProgressFn, note


class SubBatches:
    """Runs ``rule(x, y)`` on sub-batches of at most ``size`` samples, halving ``size`` on OOM."""

    def __init__(self, size: int, progress: ProgressFn = None):
        self.size = max(1, int(size))
        self.progress = progress

    def run(self, rule: Callable[[torch.Tensor, torch.Tensor], Any], x: torch.Tensor, y: torch.Tensor,
            combine: Callable[[Sequence[Any]], Any]) -> Any:
        """``rule(x, y)``, or ``combine`` of the rule on consecutive parts of at most ``size`` samples."""
        while True:
            try:
                if len(y) <= self.size:
                    return rule(x, y)
                return combine([rule(x[i:i + self.size], y[i:i + self.size]) for i in range(0, len(y), self.size)])
            except torch.OutOfMemoryError:
                failed = min(self.size, len(y))
            # outside the except block: the exception (and the frames holding the batch's tensors) is gone
            if failed <= 1:
                raise NfmError(f"out of memory on {x.device} with a single sample per batch; the model does "
                               "not fit this device (free memory, or use another device)")
            self.size = failed // 2
            if x.is_cuda:
                torch.cuda.empty_cache()
            note(self.progress, f"out of memory on {x.device} with {failed} samples per batch; continuing "
                                f"with {self.size} (the result changes only at rounding level)")


def add_dicts(parts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Elementwise sum of {name: tensor} dicts, in order."""
    total = {name: value.clone() for name, value in parts[0].items()}
    for part in parts[1:]:
        for name, value in part.items():
            total[name] += value
    return total


def combine_with_logits(parts: Sequence[tuple[dict[str, torch.Tensor], torch.Tensor]]):
    """(summed dicts, concatenated logits) of (dict, logits) results."""
    return add_dicts([p[0] for p in parts]), torch.cat([p[1] for p in parts])
