"""timm models (where timm is installed; tiny configurations): ``auto`` picks ggn for ViT, ConvNeXt, Swin, CaiT
and MobileNetV3, which then equals the dense float64 Gauss-Newton diagonal, and exact for MobileNetV2
(ReLU6 inside timm's BatchNormAct2d), which equals double-backward Hessian entries (issue 20)."""
from __future__ import annotations

import pytest
import torch

from nfm_cli.curvature.estimators import estimate_diagonal, resolve_estimator
from tests.conftest import dense_gauss_newton_diagonal, max_relative_error, randomize_batchnorm, spot_diagonal

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")

GGN = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2), 16),
    "convnext": ("convnext_atto", dict(depths=(1, 1, 1, 1), dims=(4, 4, 4, 4)), 32),
    # shifted windows (depth 2: the second block shifts), windows folded into dimension 0 (curvature/folded.py)
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=16, patch_size=2, window_size=2, embed_dim=8,
                                                  depths=(2, 2), num_heads=(1, 2)), 16),
    # the class token enters the class-attention block twice (concatenation, residual sum): curvature/shared.py
    "cait": ("cait_xxs24_224", dict(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2,
                                    depth_token_only=1), 16),
    "mobilenetv3": pytest.param(("mobilenetv3_small_050", {}, 32), marks=pytest.mark.slow),
}


def _model(name, config, size, seed=0):
    torch.manual_seed(seed)
    model = randomize_batchnorm(timm.create_model(name, pretrained=False, num_classes=3, **config)).double().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    return model, torch.randn(3, 3, size, size, generator=gen, dtype=torch.float64), torch.tensor([0, 2, 1])


@pytest.mark.parametrize("case", list(GGN.values()), ids=list(GGN))
def test_timm_modern_models_get_ggn_equal_to_the_dense_gauss_newton_diagonal(case):
    model, x, y = _model(*case)
    assert resolve_estimator("auto", model)[0] == "ggn"
    got = estimate_diagonal(model, x, y, "normalized-ce", "ggn", batch_size=2).diagonal
    assert max_relative_error(got, dense_gauss_newton_diagonal(model, x, y, "normalized-ce")) < 1e-10


@pytest.mark.slow
def test_timm_mobilenetv2_gets_exact_equal_to_double_backward():
    model, x, y = _model("mobilenetv2_035", {}, 32)
    used, why = resolve_estimator("auto", model)
    assert used == "exact", why
    got = estimate_diagonal(model, x, y, "ce", "exact", batch_size=2).diagonal
    names = [n for n, _ in model.named_parameters()]
    only = set(names[:4] + names[len(names) // 2:len(names) // 2 + 2] + names[-2:])   # stem, a middle block, head
    picks = spot_diagonal(model, x, y, "ce", per_tensor=2, only=only)
    assert len(picks) == len(only)
    scale = max(float(v.abs().max()) for _, v in picks.values())
    for name, (idx, want) in picks.items():
        assert float((got[name].reshape(-1)[idx] - want).abs().max()) <= 1e-10 * scale, name


@pytest.mark.slow
def test_timm_vgg11_bn_whose_head_fx_cannot_trace_gets_ggn_equal_to_double_backward():
    """timm's ConvMlp head branches on the input's size in Python (torch.fx refuses the whole model):
    it is measured as a whole by its per-sample gradients (ggn; exact cannot read it), and since the
    network is piecewise linear those Gauss-Newton entries are Hessian entries: checked by double backward."""
    torch.manual_seed(0)
    model = randomize_batchnorm(timm.create_model("vgg11_bn", pretrained=False, num_classes=3,
                                                  mlp_ratio=0.0625)).double().eval()
    used, why = resolve_estimator("auto", model)
    assert used == "ggn" and "layer 'pre_logits' (ConvMlp) cannot be checked piecewise linear" in why, why
    x, y = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64), \
        torch.tensor([0, 2])
    got = estimate_diagonal(model, x, y, "ce", "ggn", batch_size=2).diagonal
    names = [n for n, _ in model.named_parameters()]
    only = set(names[:2] + [n for n in names if n.startswith("pre_logits")] + names[-2:])
    picks = spot_diagonal(model, x, y, "ce", per_tensor=2, only=only)
    assert len(picks) == len(only)
    scale = max(float(v.abs().max()) for _, v in picks.values())
    for name, (idx, want) in picks.items():
        assert float((got[name].reshape(-1)[idx] - want).abs().max()) <= 1e-10 * scale, name
