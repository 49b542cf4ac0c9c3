"""The weight matrices of (17) for the new weight kinds (issue 20, item 6): attention's fused in_proj as
three matrices, Embedding with rows = tokens, LayerNorm affine left out; and normalized sharpness of a
token transformer unchanged by the per-head Q/K and V/out rescalings that preserve its function."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from nfm_cli.curvature.estimators import estimate_diagonal
from nfm_cli.measures.compute import compute_measures
from nfm_cli.measures.matrices import weight_matrices
from tests.conftest import modern_case

pytestmark = pytest.mark.usefixtures("one_thread")


def test_which_tensors_are_weight_matrices():
    model, _, _ = modern_case("tokens")
    matrices = weight_matrices(model)
    e = 8
    assert [(m.name, m.kind, m.rows) for m in matrices.values() if m.param == "layer.self_attn.in_proj_weight"] == [
        (f"layer.self_attn.in_proj_weight[{p}]", f"MultiheadAttention.{p}", (i * e, (i + 1) * e))
        for i, p in enumerate("qkv")]
    assert matrices["embed.weight"].kind == "Embedding"
    assert {"layer.self_attn.out_proj.weight", "layer.linear1.weight", "layer.linear2.weight", "head.weight"} <= set(
        matrices)
    assert not any("norm" in m.param or "bias" in m.param for m in matrices.values())
    summary = compute_measures(model, {n: torch.rand_like(p, dtype=torch.float64)
                                       for n, p in model.named_parameters()}).summary
    left_out = sum(p.numel() for n, p in model.named_parameters() if "norm" in n or n.endswith("bias"))
    assert summary["params_left_out"] == left_out
    assert summary["weight_matrices"] == len(matrices) == 8


def _rescale_attention(model: nn.Module, a: torch.Tensor, b: torch.Tensor) -> None:
    """Query dim j times a_j, key dim j times 1/a_j; value dim j times b_j, out_proj input column j times 1/b_j."""
    attn = model.layer.self_attn
    e = attn.embed_dim
    scale = torch.cat([a, 1 / a, b])
    with torch.no_grad():
        attn.in_proj_weight.mul_(scale[:, None])
        attn.in_proj_bias.mul_(scale)
        attn.out_proj.weight.div_(b[None, :])
    assert attn.in_proj_weight.shape[0] == 3 * e


def test_normalized_sharpness_of_a_transformer_is_invariant_under_qk_and_vo_rescaling():
    model, x, y = modern_case("tokens")
    gen = torch.Generator().manual_seed(4)
    changed = copy.deepcopy(model)
    _rescale_attention(changed, torch.empty(8, dtype=torch.float64).uniform_(0.3, 3.0, generator=gen),
                       torch.empty(8, dtype=torch.float64).uniform_(0.3, 3.0, generator=gen))
    torch.testing.assert_close(changed(x), model(x), rtol=1e-10, atol=1e-12)

    def measures(m):
        nce = estimate_diagonal(m, x, y, "normalized-ce", "ggn", batch_size=6).diagonal
        ce = estimate_diagonal(m, x, y, "ce", "ggn", batch_size=6).diagonal
        return compute_measures(m, nce, ce).summary
    before, after = measures(model), measures(changed)
    assert after["normalized_sharpness"] == pytest.approx(before["normalized_sharpness"], rel=1e-6)
    for part in "qkv":
        name = f"layer.self_attn.in_proj_weight[{part}]"
        assert after["layers"][name]["normalized_sharpness"] == pytest.approx(
            before["layers"][name]["normalized_sharpness"], rel=1e-6)
    assert abs(after["hessian_trace"] / before["hessian_trace"] - 1) > 1e-3
    assert abs(after["frobenius_norm_sq"] / before["frobenius_norm_sq"] - 1) > 1e-3
