"""The two exact conv routes (``curvature/conv_routes.py``) against each other and the dense float64 Hessian."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nfm_cli.curvature.conv_routes import (
    PER_SAMPLE,
    POSITION_PAIR,
    STACK_POSITIONS,
    ConvShape,
    choose_route,
    output_positions,
    unfold_columns,
)
from nfm_cli.curvature.exact import exact_diagonal
from nfm_cli.curvature.rules import CacheBudget, ConvRule
from tests.conftest import dense_diagonal, max_relative_error


def strided_dilated_grouped():
    """stride 2 + padding, dilation 2 + groups 2, depthwise without bias, a 1x1 kernel, reflect padding."""
    return nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False, padding_mode="reflect"), nn.ReLU(),
                         nn.Conv2d(4, 3, 1), nn.Flatten(), nn.Linear(27, 4))


def small_outputs():
    """2x2 and 1x1 spatial outputs, where the position-pair route is the cheap one."""
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 2, groups=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6, 4))


def conv1d():
    return nn.Sequential(nn.Conv1d(2, 4, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv1d(4, 4, 2, dilation=2, groups=2, padding_mode="circular", padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16, 4))


def many_positions():
    """A first layer with 18x18 = 324 output positions (more than STACK_POSITIONS: directions one by one),
    then 3x3 (stacked)."""
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=2), nn.ReLU(), nn.Conv2d(2, 3, 4, stride=6), nn.ReLU(),
                         nn.Flatten(), nn.Linear(27, 4))


CASES = {"strided-dilated-grouped": (strided_dilated_grouped, (2, 6, 6)), "2x2-and-1x1": (small_outputs, (2, 4, 4)),
         "conv1d": (conv1d, (2, 8)), "many-positions": (many_positions, (1, 16, 16))}


def case(name, n=6):
    torch.manual_seed(0)
    build, shape = CASES[name]
    model = build().double().eval()
    gen = torch.Generator().manual_seed(1)
    return model, torch.randn((n,) + shape, generator=gen, dtype=torch.float64), torch.randint(0, 4, (n,),
                                                                                               generator=gen)


def diagonal_by(route, monkeypatch, model, x, y, loss):
    monkeypatch.setattr(ConvRule, "forced_route", route)
    return exact_diagonal(model, x, y, loss, batch_size=4)          # two batches: 4 + 2 samples


@pytest.mark.parametrize("loss", ["ce", "normalized-ce"])
@pytest.mark.parametrize("name", list(CASES))
def test_both_routes_equal_the_dense_hessian_diagonal(name, loss, monkeypatch, one_thread):
    model, x, y = case(name)
    dense = dense_diagonal(model, x, y, loss)
    per_sample = diagonal_by(PER_SAMPLE, monkeypatch, model, x, y, loss)
    pairs = diagonal_by(POSITION_PAIR, monkeypatch, model, x, y, loss)
    assert max_relative_error(per_sample, dense) <= 1e-10
    assert max_relative_error(pairs, dense) <= 1e-10
    assert max_relative_error(pairs, per_sample) <= 1e-10
    automatic = diagonal_by(None, monkeypatch, model, x, y, loss)
    assert max_relative_error(automatic, dense) <= 1e-10


@pytest.mark.parametrize("stacked", [True, False])
def test_stacked_and_one_by_one_directions_equal_the_dense_hessian_diagonal(stacked, monkeypatch, one_thread):
    model, x, y = case("many-positions")
    dense = dense_diagonal(model, x, y, "normalized-ce")
    monkeypatch.setattr(ConvRule, "forced_stacks", stacked)
    assert max_relative_error(exact_diagonal(model, x, y, "normalized-ce", batch_size=4), dense) <= 1e-10


def test_directions_are_stacked_by_the_number_of_output_positions():
    model, x, _ = case("many-positions")
    first = ConvRule(model[0], x, CacheBudget(1 << 20, 9))
    second = ConvRule(model[2], torch.relu(model[0](x)).detach(), CacheBudget(1 << 20, 9))
    assert model[0](x)[0, 0].numel() > STACK_POSITIONS and not first.stacks
    assert model[2](model[0](x))[0, 0].numel() <= STACK_POSITIONS and second.stacks


@pytest.mark.parametrize("kernel, dilation, padding, stride", [
    ((1, 1), (1, 1), 0, (1, 1)), ((1, 1), (1, 1), 0, (2, 2)), ((3, 3), (1, 1), (1, 1), (1, 1)),
    ((3, 3), (1, 1), (1, 1), (2, 2)), ((2, 3), (2, 1), (2, 0), (1, 3)), ((3, 3), (2, 2), (2, 2), (1, 1))])
def test_unfold_columns_equal_torch_unfold(kernel, dilation, padding, stride):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 9, 11, generator=gen, dtype=torch.float64)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    for tensor in (x, channels_last, x[:, :, 1:, 2:]):
        expected = F.unfold(tensor, kernel, dilation=dilation, padding=padding, stride=stride)
        assert torch.equal(unfold_columns(tensor, kernel, dilation, padding, stride), expected)
        assert expected.shape[-1] == output_positions(tuple(tensor.shape[-2:]), kernel, dilation, padding, stride)


def test_each_route_is_really_taken(monkeypatch):
    """The forced route is the one the rule runs (else the comparison above would compare a route with itself)."""
    model, x, _ = case("2x2-and-1x1")
    conv = model[2]
    layer_input = torch.relu(model[0](x)).detach()
    grad = torch.randn(conv(layer_input).shape, dtype=torch.float64)
    for route, keeps_pairs in ((PER_SAMPLE, False), (POSITION_PAIR, True)):
        monkeypatch.setattr(ConvRule, "forced_route", route)
        rule = ConvRule(conv, layer_input, CacheBudget(1 << 20, 1))
        rule.add(grad, torch.ones(len(x), dtype=torch.float64))
        assert rule.route == route and (rule.pairs is not None) == keeps_pairs


def test_cost_model_picks_pairs_for_few_positions_and_per_sample_for_many():
    # resnet18 on 32x32 inputs, 32 samples, 9 directions: layer4 (1x1), layer3 (2x2) and layer1 (8x8)
    assert choose_route(ConvShape(32, 1, 1, 512, 4608, 9), 1 << 27) == POSITION_PAIR
    assert choose_route(ConvShape(32, 4, 1, 256, 2304, 9), 1 << 27) == POSITION_PAIR
    assert choose_route(ConvShape(32, 64, 1, 64, 576, 9), 1 << 27) == PER_SAMPLE
    # WRN-16-4's first stage, 32x32 outputs: per-sample
    assert choose_route(ConvShape(64, 1024, 1, 64, 144, 9), 1 << 27) == PER_SAMPLE


def test_pair_route_refused_when_its_buffer_does_not_fit():
    shape = ConvShape(32, 4, 1, 256, 2304, 9)
    assert choose_route(shape, shape.position_pair_elements() - 1) == PER_SAMPLE
