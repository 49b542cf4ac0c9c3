"""Hostile weight files and code paths for ``nfm import`` (issue 15 item 4): nothing in a weights file
runs, nothing is allocated from a header's claims, and every refusal is one line with nothing written."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from nfm_cli.errors import NfmError
from nfm_cli.runtime.files import check_safetensors_header
from nfm_cli.store.weights import read_state_dict


class _Payload:
    """Unpickling this would create ``marker`` (the classic __reduce__ code-execution payload)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.fixture
def tensors_file(tmp_path):
    path = tmp_path / "data.safetensors"
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 1, 4, 4, generator=g), torch.randint(3, (24,), generator=g)
    save_file({"train.x": x[:16], "train.y": y[:16], "test.x": x[16:], "test.y": y[16:]}, str(path))
    return path


def _import_args(weights, data, out, model="mlp", extra=()):
    return ["import", "--model", model, "--model-arg", "in_channels=1", "--model-arg", "image_size=4",
            "--model-arg", "num_classes=3", "--model-arg", "width=8", "--model-arg", "depth=1",
            "--weights", weights, "--data", f"tensors:{data}", "--out", out, *extra]


def _one_line_refusal(res, out, fragment):
    lines = [line for line in res.err.splitlines() if line.strip()]
    assert res.code == 1, res.err
    assert len(lines) == 1 and lines[0].startswith("nfm: error: ") and "Traceback" not in res.err, res.err
    assert fragment in lines[0], lines[0]
    assert not out.exists() and res.out == ""


def test_reduce_payload_is_refused_and_never_runs(cli, tmp_path, tensors_file):
    marker = tmp_path / "pwned"
    weights = tmp_path / "evil.pt"
    torch.save({"fc.weight": torch.zeros(2, 2), "hook": _Payload(marker)}, weights)
    out = tmp_path / "out.safetensors"
    res = cli(*_import_args(weights, tensors_file, out))
    _one_line_refusal(res, out, "would call")
    assert "open" in res.err and "nothing was run" in res.err
    assert not marker.exists()


def test_legacy_format_payload_is_refused_too(tmp_path):
    marker = tmp_path / "pwned"
    weights = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "hook": _Payload(marker)}, weights, _use_new_zipfile_serialization=False)
    with pytest.raises(NfmError, match="would call .*open"):
        read_state_dict(weights)
    assert not marker.exists()


def test_pickled_whole_model_says_how_to_resave(cli, tmp_path, tensors_file):
    weights = tmp_path / "whole.pt"
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), weights)
    out = tmp_path / "out.safetensors"
    res = cli(*_import_args(weights, tensors_file, out))
    _one_line_refusal(res, out, "pickled whole model")
    assert "torch.save(model.state_dict()" in res.err


@pytest.mark.parametrize("case", ["huge", "overlap", "past-end", "bad-dtype"])
def test_lying_safetensors_headers_are_refused_before_allocating(tmp_path, monkeypatch, case):
    headers = {
        "huge": {"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 4 << 40]}},
        "overlap": {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                    "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}},
        "past-end": {"w": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}},
        "bad-dtype": {"w": {"dtype": "F1024", "shape": [2], "data_offsets": [0, 16]}},
    }
    path = tmp_path / "w.safetensors"
    path.write_bytes(_safetensors_bytes(headers[case], bytes(24)))

    def no_allocation(*args, **kwargs):
        raise AssertionError("tensors were loaded from an unchecked header")

    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "load_file", no_allocation)
    with pytest.raises(NfmError) as err:
        read_state_dict(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert {"huge": "refused before allocating", "overlap": "overlap", "past-end": "refused before allocating",
            "bad-dtype": "no known dtype"}[case] in str(err.value)


def test_a_100_mb_json_header_is_refused_without_reading_it(tmp_path, monkeypatch):
    path = tmp_path / "big.safetensors"
    claimed = 100 << 20
    with open(path, "wb") as handle:      # sparse: 100 MB of header on disk costs nothing
        handle.write(struct.pack("<Q", claimed) + b"{")
        handle.truncate(8 + claimed + 16)
    import json as json_module
    monkeypatch.setattr(json_module, "loads", lambda *a, **k: pytest.fail("the header was parsed"))
    with pytest.raises(NfmError, match=r"header claims 104857600 bytes .*refused before reading"):
        check_safetensors_header(path)


def test_well_formed_safetensors_pass_the_header_check(tmp_path):
    path = tmp_path / "ok.safetensors"
    save_file({"a": torch.ones(3), "b": torch.zeros(2, 2, dtype=torch.float64)}, str(path))
    header = check_safetensors_header(path)
    assert set(header) - {"__metadata__"} == {"a", "b"}
    state = read_state_dict(path)
    assert torch.equal(state.tensors["a"], torch.ones(3)) and state.format == "safetensors"


def test_factory_that_does_not_import_is_one_line(cli, tmp_path, tensors_file):
    weights = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(1)}, str(weights))
    out = tmp_path / "out.safetensors"
    res = cli("import", "--model", "nfm_no_such_module_xyz:make_net", "--weights", weights,
              "--data", f"tensors:{tensors_file}", "--out", out)
    _one_line_refusal(res, out, "cannot import module 'nfm_no_such_module_xyz'")
    assert "PYTHONPATH" in res.err


@pytest.mark.parametrize("source, fragment", [
    ("os:system", "refused"),
    ("subprocess:run", "refused"),
    ("torch.hub:load", "refused"),
    ("json:loads", "refused"),
])
def test_factories_outside_user_code_are_refused_before_calling(cli, tmp_path, tensors_file, source, fragment):
    weights = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(1)}, str(weights))
    out = tmp_path / "out.safetensors"
    res = cli("import", "--model", source, "--model-arg", f"command=touch {tmp_path}/pwned",
              "--weights", weights, "--data", f"tensors:{tensors_file}", "--out", out)
    _one_line_refusal(res, out, fragment)
    assert not (tmp_path / "pwned").exists()
