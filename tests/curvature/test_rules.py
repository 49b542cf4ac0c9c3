"""Chunk and cache sizes of the per-layer rules follow the memory budget (``rules.CacheBudget``), and so does
the number of directions stacked into one ``add_batch`` (``exact.direction_group``): every size, same diagonal."""
from __future__ import annotations

import pytest
import torch

from nfm_cli.curvature import exact
from nfm_cli.curvature.estimators import estimate_diagonal
from nfm_cli.curvature.exact import exact_diagonal
from nfm_cli.curvature.rules import CACHE_ELEMENTS, CHUNK_ELEMENTS, CHUNK_FLOOR, CacheBudget
from tests.conftest import (
    MODERN,
    dense_diagonal,
    dense_gauss_newton_diagonal,
    max_relative_error,
    modern_case,
    tiny_case,
)


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


@pytest.mark.parametrize("group", [1, 2, 3])
@pytest.mark.parametrize("name", ["conv-avgpool-groups", "bn-residual", "conv1d-reflect-bn1d"])
def test_every_direction_group_gives_the_dense_hessian_diagonal(name, group, monkeypatch, one_thread):
    """The K-1 = 3 directions stacked 1, 2 (+1) or 3 at a time into the rules' ``add_batch``."""
    model, x, y = tiny_case(name)
    dense = dense_diagonal(model, x, y, "normalized-ce")
    calls = []

    def fixed(directions, elements, like):
        calls.append(directions)
        return group
    monkeypatch.setattr(exact, "direction_group", fixed)
    assert max_relative_error(exact_diagonal(model, x, y, "normalized-ce"), dense) <= 1e-10
    assert calls == [3]


@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("name", MODERN)
def test_every_direction_group_gives_the_dense_gauss_newton_diagonal(name, group, monkeypatch, one_thread):
    """LayerNorm, GroupNorm, Embedding, Linear on sequences and the per-sample (torch.func) rule, 2 directions."""
    model, x, y = modern_case(name)
    dense = dense_gauss_newton_diagonal(model, x, y, "ce")
    monkeypatch.setattr(exact, "direction_group", lambda directions, elements, like: group)
    estimate = estimate_diagonal(model, x, y, "ce", "ggn", batch_size=4)
    assert max_relative_error(estimate.diagonal, dense) <= 1e-10


def test_direction_group_follows_the_memory_limit(monkeypatch):
    like = torch.zeros(1)
    monkeypatch.setenv("NFM_MEMORY_LIMIT", "8M")                 # 1/8 of it: 1 MiB = 2^18 float32 elements
    assert exact.direction_group(9, 1 << 16, like) == 4
    assert exact.direction_group(9, 1 << 30, like) == 1
    monkeypatch.setenv("NFM_MEMORY_LIMIT", "1T")
    assert exact.direction_group(9, 1 << 16, like) == 9
