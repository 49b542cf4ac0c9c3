"""A timm Swin imported with ``nfm import`` (``timm:create_model``) and measured by ``nfm measure`` with no
estimator option: auto picks ggn, and the kept normalized-ce diagonal equals the dense float64 Gauss-Newton
diagonal of the model as built here (torch.func Jacobians; issue 20)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from nfm_cli.store.artifacts import read_artifact
from tests.conftest import dense_gauss_newton_diagonal, max_relative_error

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")

SWIN = dict(model_name="swin_tiny_patch4_window7_224", num_classes=3, img_size=16, patch_size=2, window_size=2,
            embed_dim=8, depths=[2, 2], num_heads=[1, 2])


def test_an_imported_timm_swin_is_measured_with_ggn_equal_to_the_dense_gauss_newton_diagonal(cli, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(pretrained=False, **SWIN).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, 16, 16, generator=gen), torch.tensor([0, 1, 2, 0, 1, 2])
    save_file({"train.x": x, "train.y": y, "test.x": torch.randn(4, 3, 16, 16, generator=gen),
               "test.y": torch.tensor([0, 1, 2, 0])}, str(tmp_path / "data.safetensors"))
    ckpt = tmp_path / "swin.safetensors"
    args = [a for k, v in SWIN.items() for a in ("--model-arg", f"{k}={json.dumps(v)}")]
    res = cli("import", "--model", "timm:create_model", *args, "--weights", tmp_path / "w.safetensors",
              "--data", f"tensors:{tmp_path / 'data.safetensors'}", "--out", ckpt, "--quiet")
    assert res.code == 0, res.err
    res = cli("measure", ckpt, "--precision", "float64", "--json", "--quiet")
    assert res.code == 0, res.err
    assert json.loads(res.out)["estimator"] == "ggn"
    kept = read_artifact(tmp_path / "swin.measures.hdiag-normalized-ce.float64.safetensors")
    assert kept.meta["config"]["estimator"] == "ggn"
    reference = dense_gauss_newton_diagonal(model.double(), x.double(), y, "normalized-ce")
    assert set(kept.tensors) == set(reference)
    assert max_relative_error(kept.tensors, reference) < 1e-10
