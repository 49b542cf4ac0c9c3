"""Exact diagonal of torchvision architectures against an independent float64 oracle (issue 10 item 2).

The oracle is d^2 L / d theta_i^2 = (H e_i)_i by double backward (no piecewise-linearity assumed),
at a seeded random coordinate of 16 seeded tensors plus the first, the last, the largest, the first
grouped (depthwise) conv and resnet18's first projection shortcut (conv and BN) of each model (one
double backward costs about as much as the whole exact diagonal there); BatchNorm in eval
mode with non-trivial running statistics, 32x32 inputs, 2 samples, 10 classes (vgg11_bn with a
64-wide classifier: the same layers and ops, a 400th of the weights).
"""
from __future__ import annotations

import random
import zlib

import pytest
import torch

from nfm_cli.curvature.exact import check_exact_supported, exact_diagonal
from nfm_cli.curvature.losses import LOSS_NAMES
from nfm_cli.errors import NfmError
from tests.conftest import randomize_batchnorm, spot_diagonal

pytestmark = pytest.mark.usefixtures("one_thread")


def get_model(name: str) -> torch.nn.Module:
    """A torchvision model with 10 classes (torchvision imported here, not at collection: only the
    test worker that runs these tests pays for it)."""
    import torchvision
    return torchvision.models.get_model(name, weights=None, num_classes=10)


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = get_model(name)
    if name == "vgg11_bn":
        # the same graph (every layer and op in place) with a 64-wide classifier instead of 4096: the
        # 25088 x 4096 float64 Linear alone made each oracle test take 8 s and 1.6 GB
        model.classifier[0] = torch.nn.Linear(512 * 7 * 7, 64)
        model.classifier[3] = torch.nn.Linear(64, 64)
        model.classifier[6] = torch.nn.Linear(64, 10)
    with torch.no_grad():
        return randomize_batchnorm(model.double()).eval()


@pytest.fixture(scope="module", params=["resnet18", pytest.param("vgg11_bn", marks=pytest.mark.heavy),
                                                pytest.param("mobilenet_v2", marks=pytest.mark.heavy)])
def case(request):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=gen, dtype=torch.float64)
    return request.param, build(request.param), x, torch.tensor([3, 7])


def checked_tensors(name: str, model: torch.nn.Module, seed: int) -> set[str]:
    """16 seeded tensors, the first and the last, the largest, the first grouped (depthwise) conv
    and the first projection shortcut: every layer class and every kind of junction in the graph."""
    names = [n for n, _ in model.named_parameters()]
    chosen = set(random.Random(seed).sample(names, 16)) | {names[0], names[-1]}
    params = dict(model.named_parameters())
    chosen.add(max(names, key=lambda n: params[n].numel()))            # vgg: the 25088 x 64 Linear
    grouped = [f"{n}.weight" for n, m in model.named_modules() if getattr(m, "groups", 1) > 1]
    shortcuts = [n for n in names if "downsample" in n]                 # resnet: 1x1 conv + BN on the skip
    return chosen | set(grouped[:1]) | set(shortcuts[:3])


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_exact_matches_the_double_backward_oracle(case, loss):
    name, model, x, y = case
    seed = zlib.crc32(f"{name} {loss}".encode())
    exact = exact_diagonal(model, x, y, loss)
    picks = spot_diagonal(model, x, y, loss, per_tensor=1, seed=seed, only=checked_tensors(name, model, seed))
    scale = max(float(entries.abs().max()) for _, entries in picks.values())
    for param, (idx, entries) in picks.items():
        got = exact[param].reshape(-1)[idx]
        assert torch.allclose(got, entries, rtol=1e-6, atol=1e-12 * scale), (name, param, got, entries)


@pytest.mark.parametrize("name", [pytest.param("resnet34", marks=pytest.mark.slow),
                                  pytest.param("resnet50", marks=pytest.mark.heavy)])
def test_deeper_resnets_match_the_oracle(name):
    """resnet50's bottleneck blocks (1x1-3x3-1x1 convs, a projection shortcut per stage) and resnet34's
    depth: accepted, and their exact diagonal is the oracle's at the first and last tensors, the first
    shortcut, the last block's last conv and two seeded tensors (one sample, to stay quick)."""
    model = build(name)
    check_exact_supported(model)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.tensor([4])
    names = [n for n, _ in model.named_parameters()]
    last_conv = [n for n in names if n.startswith("layer4.") and n.endswith("conv3.weight" if name == "resnet50"
                                                                         else "conv2.weight")][-1]
    only = {names[0], names[-1], next(n for n in names if "downsample" in n), last_conv,
            *random.Random(name).sample(names, 2)}
    exact = exact_diagonal(model, x, y, "normalized-ce")
    picks = spot_diagonal(model, x, y, "normalized-ce", per_tensor=1, seed=zlib.crc32(name.encode()), only=only)
    assert set(picks) == only
    scale = max(float(entries.abs().max()) for _, entries in picks.values())
    for param, (idx, entries) in picks.items():
        got = exact[param].reshape(-1)[idx]
        assert torch.allclose(got, entries, rtol=1e-6, atol=1e-12 * scale), (name, param, got, entries)


def test_a_torchvision_model_in_training_mode_is_refused_by_path():
    model = get_model("resnet18")
    with pytest.raises(NfmError, match=r"layer 'bn1' \(BatchNorm2d\) is in training mode"):
        check_exact_supported(model)
