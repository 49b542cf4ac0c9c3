"""The automatic batch size of the curvature estimators, from the memory still available."""
from __future__ import annotations

import torch

from nfm_cli.curvature.registry import estimator_spec
from nfm_cli.runtime.memory import available_bytes

MAX_AUTO_BATCH = 512
AUTO_BATCH_BYTES = 2 << 30         # activation memory the automatic batch size aims at
MEMORY_SHARE = 0.5                 # ... at most this share of the memory still available (runtime.memory)


def auto_batch_size(model: torch.nn.Module, example: torch.Tensor, estimator: str, samples: int,
                    device: torch.device | str | None = None) -> int:
    """The default ``--batch-size``: the largest power of two <= ``MAX_AUTO_BATCH`` (or all samples if
    fewer) whose estimated live memory fits the budget: ``AUTO_BATCH_BYTES``, or ``MEMORY_SHARE`` of
    the memory still available on ``device`` if that is less (cgroup limit, MemAvailable, free GPU
    memory, ``NFM_MEMORY_LIMIT``: ``nfm_cli.runtime.memory``). The estimate is the total size of all leaf
    modules' outputs for ``example`` (one sample) times the estimator's ``memory_factor``
    (``curvature.registry``). A partial run is resumed with the batch size it was saved with, whatever
    memory is free then. E.g. MLP and LeNet on 28x28 inputs: 512; WRN-16-4 on CIFAR-10: 64 (exact),
    32 (hutchinson).
    """
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    per_sample = max(1, total) * estimator_spec(estimator).memory_factor
    budget = AUTO_BATCH_BYTES
    available = available_bytes(device)
    if available is not None:
        budget = min(budget, int(MEMORY_SHARE * available))
    fits = max(1, min(MAX_AUTO_BATCH, budget // per_sample))
    return min(samples, 1 << (int(fits).bit_length() - 1))
