"""Losses on the logits: ce and the paper's normalized-ce (eqs. 20-22), and their closed-form Hessians."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import hessian, vmap

from nfm_cli.curvature.losses import (
    LOSS_NAMES,
    degenerate_mask,
    logit_hessian,
    mean_loss,
    normalized_logits,
    per_sample_loss,
    sum_loss,
)
from nfm_cli.errors import NfmError

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(n=12, k=5, scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=gen, dtype=torch.float64) * scale, torch.randint(0, k, (n,), generator=gen)


def _autograd_hessian(f, y, name):
    return vmap(hessian(lambda fi, yi: per_sample_loss(fi[None], yi[None], name)[0]))(f, y)


def test_normalized_ce_is_eq_20_to_22():
    f, y = _logits()
    mu = f.mean(1, keepdim=True)                                          # (21)
    f_prime = f / torch.sqrt(((f - mu) ** 2).mean(1, keepdim=True))      # (22)
    expected = -torch.log(torch.softmax(f_prime, 1)[torch.arange(len(y)), y])   # (20)
    assert torch.allclose(per_sample_loss(f, y, "normalized-ce"), expected, rtol=1e-13, atol=0)


def test_ce_is_softmax_cross_entropy_and_reductions():
    f, y = _logits()
    assert torch.allclose(per_sample_loss(f, y, "ce"), F.cross_entropy(f, y, reduction="none"), rtol=1e-14)
    for name in LOSS_NAMES:
        per = per_sample_loss(f, y, name)
        assert torch.allclose(mean_loss(f, y, name), per.mean(), rtol=1e-14)
        assert torch.allclose(sum_loss(f, y, name), per.sum(), rtol=1e-14)


def test_normalized_ce_invariant_to_scaling_and_shifting_logits():
    """Sec. 5.4: the surrogate must not change when the outputs are scaled or shifted."""
    f, y = _logits()
    base = per_sample_loss(f, y, "normalized-ce")
    for scale, shift in ((0.01, 0.0), (7.0, -3.0), (1.0, 100.0)):
        assert torch.allclose(per_sample_loss(scale * f + shift, y, "normalized-ce"), base, rtol=1e-10)
    assert not torch.allclose(per_sample_loss(7.0 * f, y, "ce"), per_sample_loss(f, y, "ce"))


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("k", [2, 3, 10])
@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0])
def test_closed_form_logit_hessian_matches_autograd(name, k, scale):
    f, y = _logits(n=9, k=k, scale=scale, seed=k)
    closed = logit_hessian(f, y, name)
    reference = _autograd_hessian(f, y, name)
    assert closed.shape == (9, k, k)
    if name == "normalized-ce" and k == 2:
        # f' = +-(1, -1) only: the loss is piecewise constant and both Hessians are rounding noise
        assert closed.abs().max() < 1e-9 and reference.abs().max() < 1e-9
        return
    assert torch.allclose(closed, reference, rtol=1e-10, atol=1e-12 * reference.abs().max().item())
    assert torch.allclose(closed, closed.transpose(1, 2), atol=1e-14)


def test_logit_hessians_annihilate_the_shift_and_only_normalized_ce_is_indefinite():
    f, y = _logits(n=64, k=6)
    ones = torch.ones(6, dtype=torch.float64)
    for name in LOSS_NAMES:
        assert (logit_hessian(f, y, name) @ ones).abs().max() < 1e-12
    assert torch.linalg.eigvalsh(logit_hessian(f, y, "ce")).min() > -1e-12
    assert torch.linalg.eigvalsh(logit_hessian(f, y, "normalized-ce")).min() < -1e-3


def test_constant_logits_are_degenerate_with_loss_log_k_and_no_curvature():
    k = 4
    f = torch.tensor([[2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0 + 1e-17, 1.0, 1.0],
                      [0.5, -1.0, 2.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    assert degenerate_mask(f).tolist() == [True, True, True, False]
    f.requires_grad_(True)
    loss = per_sample_loss(f, y, "normalized-ce")
    assert torch.allclose(loss[:3], torch.full((3,), math.log(k), dtype=torch.float64))
    (grad,) = torch.autograd.grad(loss.sum(), f)
    assert torch.isfinite(grad).all() and (grad[:3] == 0).all()
    assert torch.isfinite(normalized_logits(f)).all()
    h = logit_hessian(f.detach(), y, "normalized-ce")
    assert torch.isfinite(h).all() and (h[:3] == 0).all() and h[3].abs().max() > 0
    auto = _autograd_hessian(f.detach(), y, "normalized-ce")
    assert torch.allclose(auto, h, atol=1e-12)


def test_unknown_loss_name_lists_the_valid_ones():
    f, y = _logits()
    for call in (lambda: per_sample_loss(f, y, "mse"), lambda: logit_hessian(f, y, "mse")):
        with pytest.raises(NfmError, match="unknown loss 'mse'.*normalized-ce, ce"):
            call()
