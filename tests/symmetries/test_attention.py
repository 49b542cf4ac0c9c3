"""nfm_cli.symmetries.attention: the query/key and value/output scalings inside attention heads."""
import copy

import pytest
import torch
from torch import nn

from nfm_cli import NfmError
from nfm_cli.symmetries.attention import find_attention
from nfm_cli.symmetries.scaling import apply_scalings
from tests.conftest import tiny_transformer


def _scores_and_values(mha: nn.MultiheadAttention, x: torch.Tensor):
    """Per head: the attention logits q k^T and the projected values v W_O^T, written out from the
    fused in_proj_weight (an independent reading of nn.MultiheadAttention's layout)."""
    e, h = mha.embed_dim, mha.num_heads
    q, k, v = (x @ w.T + b for w, b in zip(mha.in_proj_weight.chunk(3), mha.in_proj_bias.chunk(3), strict=True))
    split = [t.unflatten(-1, (h, e // h)).transpose(1, 2) for t in (q, k, v)]
    scores = split[0] @ split[1].transpose(-2, -1)
    per_head_out = [split[2][:, i] @ mha.out_proj.weight[:, i * e // h:(i + 1) * e // h].T for i in range(h)]
    return scores, torch.stack(per_head_out)


def test_mha_scalings_keep_every_score_and_every_head_output_while_changing_q_k_v():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).double()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    scores, outs = _scores_and_values(mha, x)
    (heads,) = find_attention(mha)
    assert (heads.path, heads.heads, heads.width) == ("", 2, 8)
    a = torch.linspace(0.3, 4.0, 8, dtype=torch.float64)
    b = torch.linspace(5.0, 0.2, 8, dtype=torch.float64)
    before = mha.in_proj_weight.detach().clone()
    apply_scalings(heads.qk, a)
    apply_scalings(heads.vo, b)
    torch.testing.assert_close(mha.in_proj_weight[:8], before[:8] * a[:, None], rtol=1e-15, atol=0)
    torch.testing.assert_close(mha.in_proj_weight[8:16], before[8:16] / a[:, None], rtol=1e-15, atol=0)
    torch.testing.assert_close(mha.in_proj_weight[16:], before[16:] * b[:, None], rtol=1e-15, atol=0)
    scores2, outs2 = _scores_and_values(mha, x)
    torch.testing.assert_close(scores2, scores, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(outs2, outs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name, paths", [
    ("timm-vit", ["blocks.0.attn", "blocks.1.attn"]),
    ("timm-swin", ["layers.0.blocks.0.attn", "layers.1.blocks.0.attn"]),
    ("torchvision-vit", ["encoder.layers.encoder_layer_0.self_attention",
                         "encoder.layers.encoder_layer_1.self_attention"]),
    ("vit-tiny", ["blocks.0.attn"]),
    ("encoder-split-qkv", ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]),
])
def test_known_attention_modules_are_found_and_their_scalings_keep_the_function(name, paths):
    model, x = tiny_transformer(name)
    found = find_attention(model)
    assert [h.path for h in found] == paths
    changed = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(3)
    for heads in find_attention(changed):
        apply_scalings(heads.qk, 0.2 + 4.8 * torch.rand(heads.width, generator=gen, dtype=torch.float64))
        apply_scalings(heads.vo, 0.2 + 4.8 * torch.rand(heads.width, generator=gen, dtype=torch.float64))
    torch.testing.assert_close(changed(x), model(x), rtol=1e-10, atol=1e-10)
    moved = max(float((p - q).detach().abs().max()) for p, q in zip(changed.parameters(), model.parameters(),
                                                                    strict=True))
    assert moved > 0.1


class HomeMadeAttention(nn.Module):
    """A fused attention nfm has never seen: its layout (here [K; Q; V]) cannot be guessed."""

    def __init__(self):
        super().__init__()
        self.kqv = nn.Linear(8, 24)

    def forward(self, x):
        k, q, v = self.kqv(x).chunk(3, dim=-1)
        return (q @ k.transpose(-2, -1)).softmax(-1) @ v


def test_unknown_or_broken_attention_is_refused_with_its_path():
    model = nn.Sequential(nn.Linear(8, 8), HomeMadeAttention())
    with pytest.raises(NfmError, match=r"does not know the attention module 1 \(.*HomeMadeAttention\)"):
        find_attention(model)
    mha = nn.MultiheadAttention(8, 2)
    mha.num_heads = 3          # e.g. edited after construction
    with pytest.raises(NfmError, match="3 heads do not divide its width 8"):
        find_attention(nn.Sequential(mha))
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                            embed_dim=32, num_heads=2, qk_norm=True)
    with pytest.raises(NfmError, match=r"blocks.0.attn .* normalizes with q_norm.*query/key"):
        find_attention(vit)
    v2 = timm.create_model("swinv2_tiny_window8_256", pretrained=False, img_size=32, patch_size=4, window_size=4,
                           depths=(1,), num_heads=(2,), embed_dim=16)
    with pytest.raises(NfmError, match="does not know the attention module layers.0.blocks.0.attn"):
        find_attention(v2)
