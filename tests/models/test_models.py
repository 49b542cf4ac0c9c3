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
    with pytest.raises(models.UnknownModelError, match="lenet, mlp, wrn16-4"):
        models.build("resnet50")


def test_catalog_names_the_models_without_importing_torch():
    script = "import sys, nfm_models\nprint(','.join(nfm_models.names()), 'torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert res.stdout.split() == ["lenet,mlp,wrn16-4", "False"], res.stderr
    for name, module in models.CATALOG.items():   # each catalog module registers its own name
        assert isinstance(models.build(name), nn.Module) and models._REGISTRY[name].__module__ == module
    with pytest.raises(ValueError, match="not in nfm_models.CATALOG"):
        models.register("resnet50")(lambda: nn.Identity())


def test_lenet_refuses_other_image_sizes():
    with pytest.raises(ValueError):
        models.build("lenet", image_size=64)


@pytest.mark.parametrize("model", ["mlp", "lenet", "wrn16-4"])
def test_checkpoint_rebuilds_its_own_model(tmp_path, model):
    overrides = dict(model=model, epochs=1, train_size=32, test_size=16, batch_size=16)
    if model != "mlp":
        overrides["width"] = None
    out = tmp_path / "ck.safetensors"
    train(tiny_config(**overrides), out, device="cpu")
    ck = load_checkpoint(out)
    assert type(ck.model).__name__ == {"mlp": "MLP", "lenet": "LeNet", "wrn16-4": "WideResNet"}[model]
    assert not ck.model.training
    x, y = ck.training_tensors()
    assert x.shape == (32, 1, 28, 28) and y.dtype == torch.int64
    # the rebuilt model is the trained one: same state (weights and BatchNorm statistics)
    from safetensors.torch import load_file
    raw = load_file(out)
    for key, value in ck.model.state_dict().items():
        assert torch.equal(value, raw[f"model.{key}"])
