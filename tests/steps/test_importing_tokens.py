"""Issue 20 item 4: ``tensors:`` data with int64 token ids for a model that embeds them.

A user's ``nn.Embedding`` + ``nn.TransformerEncoderLayer`` classifier, imported from a module file and
measured by ``nfm measure`` with no estimator option (auto picks ``ggn``), at ``--precision float64``:
the kept normalized-ce diagonal must equal the dense float64 Gauss-Newton diagonal (jacrev oracle)."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import save_file

from nfm_cli import load_checkpoint
from nfm_cli.runtime.files import read_safetensors
from tests.conftest import dense_gauss_newton_diagonal

TOKEN_MODULE = '''
from torch import nn

class TokenNet(nn.Module):
    def __init__(self, vocab, dim, classes):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layer = nn.TransformerEncoderLayer(dim, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        return self.head(self.layer(self.embed(tokens)).mean(1))

def make(vocab=11, dim=8, num_classes=3):
    return TokenNet(vocab, dim, num_classes)
'''


def _token_import(cli, tmp_path, monkeypatch, x_dtype=torch.int64):
    module = f"tokennet_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text(TOKEN_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    __import__(module)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(11, (16, 5), generator=g), torch.randint(3, (16,), generator=g)
    torch.manual_seed(0)
    model = sys.modules[module].make()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[:10]), y[:10]).backward()
        opt.step()
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    data = tmp_path / "data.safetensors"
    save_file({"train.x": x[:10].to(x_dtype), "train.y": y[:10], "test.x": x[10:].to(x_dtype),
               "test.y": y[10:]}, str(data))
    out = tmp_path / "tok.safetensors"
    res = cli("import", "--model", f"{module}:make", "--weights", tmp_path / "w.safetensors",
              "--data", f"tensors:{data}", "--out", out, "-q")
    return res, out, model.eval(), x[:10], y[:10]


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_token_ids_are_measured_by_ggn_as_the_dense_float64_gauss_newton(cli, tmp_path, monkeypatch, dtype):
    res, ckpt, model, x, y = _token_import(cli, tmp_path, monkeypatch, dtype)
    assert res.code == 0, res.err
    ck = load_checkpoint(ckpt, dtype=torch.float64)
    xs, ys = ck.training_tensors()
    assert xs.dtype == torch.int64 and torch.equal(xs, x) and torch.equal(ys, y)   # never cast to float
    with torch.no_grad():
        assert torch.equal(load_checkpoint(ckpt).model(x), model(x))
    out = tmp_path / "m.safetensors"
    res = cli("measure", ckpt, "--precision", "float64", "--out", out, "--json")
    assert res.code == 0, res.err
    result = json.loads(res.out)
    assert result["estimator"] == "ggn" and result["normalized_sharpness"] > 0
    kept = read_safetensors(tmp_path / "m.hdiag-normalized-ce.float64.safetensors")
    reference = dense_gauss_newton_diagonal(ck.model, xs, ys, "normalized-ce")
    assert set(kept) == set(reference)
    for name, ref in reference.items():
        assert kept[name].dtype == torch.float64
        torch.testing.assert_close(kept[name], ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()), msg=name)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool])
def test_uint8_and_bool_inputs_are_refused_in_one_line(cli, tmp_path, monkeypatch, dtype):
    res, out, _, _, _ = _token_import(cli, tmp_path, monkeypatch, dtype)
    lines = [line for line in res.err.splitlines() if line.strip()]
    assert res.code != 0 and len(lines) == 1 and "Traceback" not in res.err, res.err
    assert f"train.x is {dtype}" in lines[0] and "int64" in lines[0], lines[0]
    assert not out.exists()
