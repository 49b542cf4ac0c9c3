"""Chunk and cache sizes of the per-layer rules follow the memory budget (``rules.CacheBudget``)."""
from __future__ import annotations

import torch

from nfm_cli.curvature.exact import exact_diagonal
from nfm_cli.curvature.rules import CACHE_ELEMENTS, CHUNK_ELEMENTS, CHUNK_FLOOR, CacheBudget
from tests.conftest import dense_diagonal, max_relative_error, tiny_case


def test_budget_follows_the_memory_limit(monkeypatch):
    monkeypatch.setenv("NFM_MEMORY_LIMIT", "64M")
    budget = CacheBudget(CACHE_ELEMENTS, 9, torch.device("cpu"))
    assert budget.left == (64 << 20) // 4 // 4
    assert budget.chunk == (64 << 20) // 16 // 4
    monkeypatch.setenv("NFM_MEMORY_LIMIT", "1K")
    budget = CacheBudget(CACHE_ELEMENTS, 9, torch.device("cpu"))
    assert budget.left == 64 and budget.chunk == CHUNK_FLOOR
    monkeypatch.setenv("NFM_MEMORY_LIMIT", "1T")
    budget = CacheBudget(CACHE_ELEMENTS, 9, torch.device("cpu"))
    assert min(budget.left, CACHE_ELEMENTS) == budget.left and budget.chunk <= CHUNK_ELEMENTS


def test_a_tiny_memory_budget_gives_the_same_diagonal(monkeypatch, one_thread):
    """1 KiB: nothing cached, no position-pair buffers, smallest chunks -- still the dense Hessian diagonal."""
    model, x, y = tiny_case("conv-avgpool-groups")
    dense = dense_diagonal(model, x, y, "normalized-ce")
    monkeypatch.setenv("NFM_MEMORY_LIMIT", "1K")
    assert max_relative_error(exact_diagonal(model, x, y, "normalized-ce"), dense) <= 1e-10
