"""nfm_cli.symmetries.layernorm: which LayerNorms only Linear layers consume, found on a recorded forward pass."""
import copy

import pytest
import torch
from torch import nn

from nfm_cli.symmetries.layernorm import find_layernorm_consumers
from nfm_cli.symmetries.scaling import apply_scalings
from tests.conftest import tiny_transformer


def _found(name):
    model, x = tiny_transformer(name)
    return model, x, {n.path: n.consumers for n in find_layernorm_consumers(model, x[:2])}


def test_pre_ln_blocks_and_the_final_norm_are_found_with_their_consumers():
    _, _, found = _found("vit-tiny")
    assert found == {"blocks.0.norm1": ["blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v"],
                     "blocks.0.norm2": ["blocks.0.mlp.0"], "norm": ["head"]}
    _, _, found = _found("encoder-pre-ln")
    assert found["encoder.layers.0.norm1"] == [f"encoder.layers.0.self_attn[{s}]" for s in "qkv"]
    assert found["encoder.layers.1.norm2"] == ["encoder.layers.1.linear1"] and found["encoder.norm"] == ["head"]
    assert len(found) == 5


def test_post_ln_residual_stream_is_left_alone():
    """norm1 of a post-LN layer feeds the feed-forward block and the residual sum; norm2 the next layer
    and its residual: neither is a symmetry. Only the last norm2, whose output only the head reads
    (through the mean over tokens), is."""
    _, _, found = _found("encoder-post-ln")
    assert found == {"encoder.layers.1.norm2": ["head"]}


@pytest.mark.parametrize("name, some", [
    ("timm-vit", {"blocks.0.norm1": ["blocks.0.attn.qkv"], "norm": ["head"]}),
    ("torchvision-vit", {"encoder.ln": ["heads.head"],
                         "encoder.layers.encoder_layer_1.ln_2": ["encoder.layers.encoder_layer_1.mlp.0"]}),
    ("timm-swin", {"layers.0.blocks.0.norm1": ["layers.0.blocks.0.attn.qkv"],   # through pad, roll, window views
                   "layers.1.downsample.norm": ["layers.1.downsample.reduction"]}),
])
def test_library_models_through_class_tokens_pooling_and_windows(name, some):
    model, x, found = _found(name)
    assert {k: found.get(k) for k in some} == some
    changed = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    for norm in find_layernorm_consumers(changed, x[:2]):
        apply_scalings(norm.scalings, 0.2 + 4.8 * torch.rand(norm.features, generator=gen, dtype=torch.float64))
    torch.testing.assert_close(changed(x), model(x), rtol=1e-10, atol=1e-10)


class Branchy(nn.Module):
    """Norms whose outputs escape in ways a per-feature scaling does not survive."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.LayerNorm(4), nn.LayerNorm(4), nn.LayerNorm(4)
        self.fa, self.fb, self.fc = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        a = self.a(x)
        out = self.fa(a) + a[..., :2].sum(-1, keepdim=True)   # a slice of the feature axis
        b = self.b(x)
        out = out + self.fb(b.mean(dim=-1, keepdim=True).expand(-1, 4))   # a mean over features
        return out + self.fc(self.c(x)), self.fc(x)          # fc is also called on x: cannot scale it


def test_feature_axis_slices_feature_means_and_shared_consumers_are_refused():
    assert find_layernorm_consumers(Branchy(), torch.randn(2, 4)) == []
