"""models/: the registry and each registered model."""
import subprocess
import sys

import pytest
import torch
from torch import nn

import nfm_models as models
from nfm_cli import load_checkpoint, train
from tests.conftest import tiny_config


@pytest.mark.parametrize("name, cfg, shape", [
    ("mlp", {}, (3, 1, 28, 28)),
    ("mlp", {"width": 32, "in_channels": 3, "image_size": 32}, (3, 3, 32, 32)),
    ("lenet", {}, (3, 1, 28, 28)),
    ("lenet", {"in_channels": 3, "image_size": 32}, (3, 3, 32, 32)),
    ("wrn16-4", {}, (2, 3, 32, 32)),
    ("vit-tiny", {}, (3, 1, 28, 28)),
    ("vit-tiny", {"in_channels": 3, "image_size": 32, "dim": 24, "num_heads": 3, "depth": 3}, (2, 3, 32, 32)),
])
def test_forward_shape(name, cfg, shape):
    model = models.build(name, num_classes=7, **cfg)
    assert model(torch.randn(*shape)).shape == (shape[0], 7)


def test_mlp_is_three_hidden_relu_layers_of_the_given_width():
    linears = [m for m in models.build("mlp", width=512) if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(784, 512), (512, 512), (512, 512), (512, 10)]


def test_wrn16_4_has_the_published_size():
    params = sum(p.numel() for p in models.build("wrn16-4").parameters())
    assert 2.7e6 < params < 2.8e6  # Zagoruyko & Komodakis report 2.7M for WRN-16-4
    assert sum(isinstance(m, nn.BatchNorm2d) for m in models.build("wrn16-4").modules()) == 13  # 2 per block + final


def test_registry_rejects_duplicates_and_unknown_names():
    with pytest.raises(ValueError, match="already registered"):
        models.register("mlp")(lambda: nn.Identity())
    with pytest.raises(models.UnknownModelError, match="lenet, mlp, vit-tiny, wrn16-4"):
        models.build("resnet50")


def test_catalog_names_the_models_without_importing_torch():
    script = "import sys, nfm_models\nprint(','.join(nfm_models.names()), 'torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert res.stdout.split() == ["lenet,mlp,vit-tiny,wrn16-4", "False"], res.stderr
    for name, module in models.CATALOG.items():   # each catalog module registers its own name
        assert isinstance(models.build(name), nn.Module) and models._REGISTRY[name].__module__ == module
    with pytest.raises(ValueError, match="not in nfm_models.CATALOG"):
        models.register("resnet50")(lambda: nn.Identity())


def test_vit_tiny_is_patches_class_token_and_pre_ln_blocks():
    vit = models.build("vit-tiny", depth=3, dim=16, num_heads=4)
    assert vit.pos_embed.shape == (1, 7 * 7 + 1, 16) and vit.cls_token.shape == (1, 1, 16)
    assert len(vit.blocks) == 3 and vit.blocks[0].attn.num_heads == 4
    assert sum(isinstance(m, nn.LayerNorm) for m in vit.modules()) == 2 * 3 + 1
    assert sum(isinstance(m, nn.GELU) for m in vit.modules()) == 3
    with pytest.raises(ValueError, match="heads do not divide"):
        models.build("vit-tiny", dim=10, num_heads=4)
    with pytest.raises(ValueError, match="does not divide the image size"):
        models.build("vit-tiny", image_size=30)


def test_vit_tiny_traces_with_fx_and_its_attention_is_softmax_attention():
    """The explicit attention equals torch's fused scaled_dot_product_attention (an independent
    implementation), and the fx graph computes the same function."""
    torch.manual_seed(0)
    vit = models.build("vit-tiny", dim=16, num_heads=2).double().eval()
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(torch.fx.symbolic_trace(vit)(x), vit(x), rtol=0, atol=0)
    attn, tokens = vit.blocks[0].attn, torch.randn(3, 5, 16, dtype=torch.float64)
    split = [layer(tokens).unflatten(-1, (2, 8)).transpose(1, 2) for layer in (attn.q, attn.k, attn.v)]
    ref = attn.out(torch.nn.functional.scaled_dot_product_attention(*split).transpose(1, 2).flatten(2))
    torch.testing.assert_close(attn(tokens), ref, rtol=1e-12, atol=1e-12)


def test_lenet_refuses_other_image_sizes():
    with pytest.raises(ValueError):
        models.build("lenet", image_size=64)


@pytest.mark.parametrize("model", ["mlp", "lenet", pytest.param("wrn16-4", marks=pytest.mark.heavy), "vit-tiny"])
def test_checkpoint_rebuilds_its_own_model(tmp_path, model):
    overrides = dict(model=model, epochs=1, train_size=32, test_size=16, batch_size=16)
    if model != "mlp":
        overrides["width"] = None
    out = tmp_path / "ck.safetensors"
    train(tiny_config(**overrides), out, device="cpu")
    ck = load_checkpoint(out)
    assert type(ck.model).__name__ == {"mlp": "MLP", "lenet": "LeNet", "wrn16-4": "WideResNet",
                                       "vit-tiny": "ViTTiny"}[model]
    assert not ck.model.training
    x, y = ck.training_tensors()
    assert x.shape == (32, 1, 28, 28) and y.dtype == torch.int64
    # the rebuilt model is the trained one: same state (weights and BatchNorm statistics)
    from safetensors.torch import load_file
    raw = load_file(out)
    for key, value in ck.model.state_dict().items():
        assert torch.equal(value, raw[f"model.{key}"])
