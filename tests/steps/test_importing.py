"""``nfm import``: outside models, weights and data become ordinary checkpoints that later steps use."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import nfm_models
from nfm_cli import load_checkpoint
from nfm_cli.data.datasets import synthetic_split
from nfm_cli.errors import NfmError
from nfm_cli.store.model_source import parse_model_args
from tests.conftest import signal_when_ready

USER_MODULE = '''
from torch import nn

def make_net(num_classes=3, width=4):
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(width * 6 * 6, num_classes))
'''


def _tensors_file(path, shape, classes, n_train, n_test, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, *shape, generator=g)
    y = torch.randint(classes, (n_train + n_test,), generator=g)
    save_file({"train.x": x[:n_train], "train.y": y[:n_train], "test.x": x[n_train:], "test.y": y[n_train:]},
              str(path))
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def _train_steps(model, x, y, steps=3, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def _accuracy_and_loss(model, x, y):
    with torch.no_grad():
        logits = model(x)
    return float((logits.argmax(1) == y).double().mean()), float(torch.nn.functional.cross_entropy(logits, y))


def _measure_json(cli, ckpt, *extra):
    res = cli("measure", ckpt, "--json", *extra)
    assert res.code == 0, res.err
    result = json.loads(res.out)
    result.pop("path")
    result["metrics"].pop("checkpoint")
    return result


def test_model_args_are_json_literals_when_they_parse():
    assert parse_model_args(["num_classes=10", "name=wide", "p=0.5", "flag=true", "sizes=[1, 2]", 'q="7"']) == \
        {"num_classes": 10, "name": "wide", "p": 0.5, "flag": True, "sizes": [1, 2], "q": "7"}
    for bad in (["=3"], ["no_equals"], ["a=1", "a=2"], ["bad key=1"]):
        with pytest.raises(NfmError, match="--model-arg"):
            parse_model_args(bad)


def _import_pair(cli, tmp_path, model, source, model_args, data):
    """``model``'s state_dict saved as a DDP-style .pt (``module.`` prefix, in a {"state_dict": ...} wrapper)
    and as plain safetensors, both imported; returns the two loaded checkpoints."""
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3},
               tmp_path / "ddp.pt")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "plain.safetensors"))
    ckpts = []
    for weights in ("ddp.pt", "plain.safetensors"):
        out = tmp_path / f"{weights}.ckpt.safetensors"
        res = cli("import", "--model", source, *[a for kv in model_args for a in ("--model-arg", kv)],
                  "--weights", tmp_path / weights, "--data", f"tensors:{data}", "--out", out, "--quiet")
        assert res.code == 0 and res.out == f"{out}\n", res.err
        ckpts.append(load_checkpoint(out))
    pt = ckpts[0].artifact.meta["source"]["weights"]
    assert (pt["prefix_stripped"], pt["wrapper"], pt["format"]) == ("module.", "state_dict", "torch")
    return ckpts


@pytest.fixture(scope="module")
def trained_resnet18():
    import torchvision
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 3, 8, 8, generator=g), torch.randint(10, (24,), generator=g)
    torch.manual_seed(0)
    return _train_steps(torchvision.models.resnet18(num_classes=10), x[:16], y[:16], steps=2), x, y


@pytest.mark.heavy
def test_torchvision_resnet18_from_pt_with_module_prefix_and_from_safetensors(cli, tmp_path, trained_resnet18):
    model, x_all, y_all = trained_resnet18
    data = tmp_path / "data.safetensors"
    x, y, x_test, y_test = x_all[:16], y_all[:16], x_all[16:], y_all[16:]
    save_file({"train.x": x, "train.y": y, "test.x": x_test, "test.y": y_test}, str(data))
    pt, st = _import_pair(cli, tmp_path, model, "torchvision:resnet18", ["num_classes=10"], data)
    # independent reference: the trained model itself, evaluated directly
    assert pt.metrics["train_acc"] == pytest.approx(_accuracy_and_loss(model, x, y)[0], abs=1e-12)
    assert pt.metrics["test_loss"] == pytest.approx(_accuracy_and_loss(model, x_test, y_test)[1], rel=1e-5)
    assert pt.metrics["gap"] == pytest.approx(pt.metrics["train_acc"] - pt.metrics["test_acc"])
    assert pt.metrics == st.metrics and pt.num_classes == 10
    with torch.no_grad():
        assert torch.equal(pt.model(x), model(x)) and torch.equal(st.model(x), model(x))
    for key, value in pt.artifact.tensors.items():
        assert torch.equal(value, st.artifact.tensors[key]), key


@pytest.mark.slow  # resnet18 (11M parameters), exact estimator: ~40 s on 2 idle cores (the spectral norms dominate)
def test_torchvision_resnet18_imports_measure_identically(cli, tmp_path, trained_resnet18):
    model, x_all, y_all = trained_resnet18
    data = tmp_path / "data.safetensors"
    save_file({"train.x": x_all[:16], "train.y": y_all[:16], "test.x": x_all[16:], "test.y": y_all[16:]}, str(data))
    pt, st = _import_pair(cli, tmp_path, model, "torchvision:resnet18", ["num_classes=10"], data)
    options = ("--samples", "4", "--max-iter", "3")     # the exact estimator (default) on resnet18
    assert _measure_json(cli, pt.path, *options) == _measure_json(cli, st.path, *options)


def test_registered_model_from_pt_and_safetensors_measure_identically(cli, tmp_path):
    data = tmp_path / "data.safetensors"
    x, y, _, _ = _tensors_file(data, (1, 28, 28), 10, 32, 16)
    torch.manual_seed(0)
    model = _train_steps(nfm_models.build("lenet"), x, y)
    pt, st = _import_pair(cli, tmp_path, model, "lenet", [], data)
    first, second = _measure_json(cli, pt.path, "--samples", "12"), _measure_json(cli, st.path, "--samples", "12")
    assert first == second and first["normalized_sharpness"] > 0 and first["weight_matrices"] == 5


def test_user_factory_end_to_end_and_later_steps_need_the_same_code(cli, tmp_path, monkeypatch):
    module = f"usernet_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "data.safetensors"
    x, y, _, _ = _tensors_file(data, (1, 6, 6), 3, 32, 16)
    __import__(module)
    torch.manual_seed(0)
    model = _train_steps(sys.modules[module].make_net(num_classes=3, width=4), x, y, steps=5)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    out = tmp_path / "user.safetensors"
    res = cli("import", "--model", f"{module}:make_net", "--model-arg", "num_classes=3", "--model-arg", "width=4",
              "--weights", tmp_path / "w.safetensors", "--data", f"tensors:{data}", "--out", out)
    assert res.code == 0, res.err
    assert "3 classes" in res.err and res.out == f"{out}\n"
    ck = load_checkpoint(out)
    with torch.no_grad():
        assert torch.equal(ck.model(x), model(x))
    code = ck.artifact.meta["source"]["code"]
    assert code["module"] == module and len(code["sha256"]) == 64
    result = _measure_json(cli, out)
    assert result["weight_matrices"] == 2 and result["normalized_sharpness"] > 0
    assert result["metrics"]["train_acc"] == pytest.approx(_accuracy_and_loss(model, x, y)[0])
    report = cli("report", out.with_name("user.measures.safetensors"))
    assert report.code == 0, report.err
    # later steps rebuild from the same code: edited code and vanished code are one-line refusals
    (tmp_path / f"{module}.py").write_text(USER_MODULE + "\n# edited\n")
    with pytest.raises(NfmError, match="changed since the weights were imported"):
        load_checkpoint(out)
    monkeypatch.delitem(sys.modules, module)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    res = cli("inspect", out)
    assert res.code == 0        # inspect reads the file, it does not rebuild the model
    res = cli("measure", out, "--force")
    assert res.code == 1 and f"cannot import module '{module}'" in res.err and str(out) in res.err
    assert len(res.err.strip().splitlines()) == 1


def test_nfm_trained_weights_reimported_reproduce_the_run(cli, tmp_path, tiny_checkpoint):
    """The same weights, data subset and labels through import give the training run's own numbers."""
    ck = load_checkpoint(tiny_checkpoint)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in ck.model.state_dict().items()}, str(weights))
    full = synthetic_split(True).y.clone()
    full[ck.indices] = ck.labels              # the labels trained on, with 30% random ones
    save_file({"labels": full}, str(tmp_path / "labels.safetensors"))
    out = tmp_path / "imported.safetensors"
    res = cli("import", "--model", "mlp", "--model-arg", "width=16", "--weights", weights, "--data", "synthetic",
              "--train-size", "128", "--test-size", "64", "--seed", "0", "--labels", tmp_path / "labels.safetensors",
              "--out", out, "-q")
    assert res.code == 0, res.err
    imp = load_checkpoint(out)
    assert torch.equal(imp.indices, ck.indices) and torch.equal(imp.labels, ck.labels)
    for key in ("train_acc", "test_acc", "gap", "train_loss", "test_loss"):
        assert imp.metrics[key] == ck.metrics[key], key
    assert imp.metrics["random_ratio"] is None
    assert imp.artifact.meta["source"]["labels"]["changed_fraction"] == pytest.approx(
        float((ck.labels != synthetic_split(True).y[ck.indices]).double().mean()))
    mine, theirs = _measure_json(cli, out), _measure_json(cli, tiny_checkpoint)
    for key in ("normalized_sharpness", "matrix_normalized_sharpness", "hessian_trace", "fisher_rao_norm", "layers"):
        assert mine[key] == theirs[key], key


def _small_tensors_import(tmp_path) -> tuple[torch.Tensor, Path, Path, list[str]]:
    """A 1x4x4, 3-class tensors file (16 train, 8 test samples) and a seeded small MLP's weights in
    ``tmp_path``: (train inputs, data file, checkpoint to write, the ``nfm import`` arguments)."""
    data, out = tmp_path / "data.safetensors", tmp_path / "ck.safetensors"
    x, *_ = _tensors_file(data, (1, 4, 4), 3, 16, 8)
    torch.manual_seed(0)
    net = nfm_models.build("mlp", in_channels=1, image_size=4, num_classes=3, width=8, depth=1)
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    argv = ["import", "--model", "mlp", "--model-arg", "in_channels=1", "--model-arg", "image_size=4",
            "--model-arg", "num_classes=3", "--model-arg", "width=8", "--model-arg", "depth=1",
            "--weights", str(tmp_path / "w.safetensors"), "--data", f"tensors:{data}", "--out", str(out), "-q"]
    return x, data, out, argv


def test_moved_tensors_file_is_found_with_data_dir(cli, tmp_path):
    x, data, out, argv = _small_tensors_import(tmp_path)
    res = cli(*argv)
    assert res.code == 0, res.err
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    data.rename(moved / data.name)
    with pytest.raises(NfmError, match="moved\\? pass --data-dir"):
        load_checkpoint(out).training_tensors()
    assert torch.equal(load_checkpoint(out, data_dir=moved).training_tensors()[0], x)


def _write_images(root, sizes, seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, classes in sizes.items():
        for cls, dims in classes.items():
            (root / split / cls).mkdir(parents=True)
            for i, (w, h) in enumerate(dims):
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
                arrays[(split, cls, i)] = pixels
    return arrays


def test_imagefolder_inputs_match_an_independent_decode(cli, tmp_path):
    root = tmp_path / "images"
    arrays = _write_images(root, {"train": {"cat": [(6, 6)] * 3, "dog": [(6, 6)] * 2},
                                  "val": {"cat": [(6, 6)], "dog": [(6, 6)] * 2}})
    torch.manual_seed(0)
    net = nfm_models.build("mlp", in_channels=3, image_size=6, num_classes=2, width=8, depth=1)
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    out = tmp_path / "ck.safetensors"
    res = cli("import", "--model", "mlp", "--model-arg", "in_channels=3", "--model-arg", "image_size=6",
              "--model-arg", "num_classes=2", "--model-arg", "width=8", "--model-arg", "depth=1",
              "--weights", tmp_path / "w.safetensors", "--data", f"imagefolder:{root}",
              "--normalize", "0.5,0.4,0.3,0.2,0.25,0.5", "--out", out, "-q")
    assert res.code == 0, res.err
    ck = load_checkpoint(out)
    x, y = ck.training_tensors()
    mean, std = np.array([0.5, 0.4, 0.3]), np.array([0.2, 0.25, 0.5])
    expected = [((arrays[("train", c, i)] / 255.0 - mean) / std).transpose(2, 0, 1)
                for c, n in (("cat", 3), ("dog", 2)) for i in range(n)]
    assert torch.allclose(x.double(), torch.tensor(np.stack(expected)), atol=1e-6)
    assert y.tolist() == [0, 0, 0, 1, 1]
    assert ck.test_tensors()[1].tolist() == [0, 1, 1]
    assert ck.config["data_spec"]["normalize"] == [[0.5, 0.4, 0.3], [0.2, 0.25, 0.5]]


def test_imagefolder_of_mixed_sizes_needs_resize_and_crop(cli, tmp_path):
    root = tmp_path / "images"
    _write_images(root, {"train": {"a": [(9, 7), (7, 9)], "b": [(8, 8)]}, "test": {"a": [(10, 8)], "b": [(8, 8)]}})
    torch.manual_seed(0)
    net = nfm_models.build("mlp", in_channels=3, image_size=6, num_classes=2, width=8, depth=1)
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    args = ["import", "--model", "mlp", "--model-arg", "in_channels=3", "--model-arg", "image_size=6",
            "--model-arg", "num_classes=2", "--model-arg", "width=8", "--model-arg", "depth=1",
            "--weights", tmp_path / "w.safetensors", "--data", f"imagefolder:{root}"]
    res = cli(*args, "--out", tmp_path / "a.safetensors")
    assert res.code == 1 and "different sizes" in res.err and not (tmp_path / "a.safetensors").exists()
    res = cli(*args, "--resize", "7", "--crop", "6", "--out", tmp_path / "b.safetensors", "-q")
    assert res.code == 0, res.err
    ck = load_checkpoint(tmp_path / "b.safetensors")
    assert tuple(ck.training_tensors()[0].shape) == (3, 3, 6, 6)
    assert ck.config["data_spec"]["resize"] == 7 and ck.config["data_spec"]["crop"] == 6


@pytest.fixture
def bad_input_files(tmp_path):
    data = tmp_path / "data.safetensors"
    _tensors_file(data, (1, 4, 4), 3, 16, 8)
    save_file({"train.x": torch.zeros(4, 1, 4, 4), "train.y": torch.zeros(4, dtype=torch.int64)},
              str(tmp_path / "half.safetensors"))
    _tensors_file(tmp_path / "wide.safetensors", (1, 5, 5), 3, 16, 8)
    torch.manual_seed(0)
    net = nfm_models.build("mlp", in_channels=1, image_size=4, num_classes=3, width=8, depth=1)
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "nostate.pt")
    (tmp_path / "garbage.bin").write_bytes(b"not a weights file at all")
    (tmp_path / "exists.safetensors").write_bytes(b"precious")
    return tmp_path


MLP = ["--model-arg", "in_channels=1", "--model-arg", "image_size=4", "--model-arg", "width=8",
       "--model-arg", "depth=1"]


@pytest.mark.parametrize("args, fragment", [
    (["--model", "mlp", *MLP, "--model-arg", "num_classes=5"], "check --model-arg"),            # shape mismatch
    (["--model", "mlp", "--model-arg", "in_channels=1", "--model-arg", "image_size=4", "--model-arg", "width=8",
      "--model-arg", "depth=2", "--model-arg", "num_classes=3"], "missing 2 tensors"),           # missing keys
    (["--model", "lenet", "--model-arg", "num_classes=3"], "unexpected"),
    (["--model", "resnet", "--model-arg", "num_classes=3"], "unknown model 'resnet'"),
    (["--model", "torchvision:resnet9000"], "torchvision has no model 'resnet9000'"),
    (["--model", "torchvision:resnet18", "--model-arg", "weights=DEFAULT"], "weights is not allowed"),
    (["--model", "mlp", *MLP, "--model-arg", "num_classes=3", "--model-arg", "colour=blue"], "cannot build mlp"),
    (["--model", "mlp", *MLP, "--model-arg", "num_classes=3", "--model-arg", "=3"], "KEY=VALUE"),
    (["--model", "mlp", *MLP, "--model-arg", "num_classes=3", "--data", "csv:x.csv"], "is not a dataset"),
    (["--model", "mlp", *MLP, "--model-arg", "num_classes=3", "--data", "tensors:{tmp}/half.safetensors"],
     "lacks test.x"),
    (["--model", "mlp", *MLP, "--model-arg", "num_classes=3", "--data", "tensors:{tmp}/wide.safetensors"],
     "cannot take the data's inputs"),
    (["--model", "mlp", *MLP, "--model-arg", "num_classes=3", "--data", "tensors:{tmp}/nope.safetensors"],
     "not found"),
    (["--model", "mlp", *MLP, "--model-arg", "num_classes=3", "--resize", "8"], "imagefolder:DIR only"),
    (["--model", "mlp", *MLP, "--model-arg", "num_classes=3", "--weights", "{tmp}/nostate.pt"], "not a state_dict"),
    (["--model", "mlp", *MLP, "--model-arg", "num_classes=3", "--weights", "{tmp}/garbage.bin"],
     "neither a safetensors file nor"),
    (["--model", "mlp", *MLP, "--model-arg", "num_classes=3", "--weights", "{tmp}/absent.pt"], "no such weights"),
    (["--model", "mlp", *MLP, "--model-arg", "num_classes=3", "--labels", "{tmp}/w.safetensors"],
     "--labels file must hold one tensor"),
    (["--model", "mlp", *MLP, "--model-arg", "num_classes=3", "--train-size", "0"], "--train-size must be"),
    (["--model", "mlp", *MLP, "--model-arg", "num_classes=3", "--data-dir", "{tmp}"], "--data-dir applies to"),
    (["--model", "mlp", *MLP, "--model-arg", "num_classes=3", "--out", "{tmp}/exists.safetensors"], "--force"),
])
def test_bad_input_is_one_line_and_writes_nothing(cli, bad_input_files, args, fragment):
    tmp = bad_input_files
    args = [a.format(tmp=tmp) for a in args]
    defaults = {"--weights": str(tmp / "w.safetensors"), "--data": f"tensors:{tmp / 'data.safetensors'}",
                "--out": str(tmp / "out.safetensors")}
    full = ["import", *args] + [x for k, v in defaults.items() if k not in args for x in (k, v)]
    before = {p.name: p.read_bytes() for p in tmp.iterdir() if p.is_file()}
    res = cli(*full)
    lines = [line for line in res.err.splitlines() if line.strip()]
    assert res.code in (1, 2), res.err
    assert len(lines) == 1 and lines[0].startswith("nfm: error: ") and "Traceback" not in res.err, res.err
    assert fragment in lines[0], lines[0]
    assert {p.name: p.read_bytes() for p in tmp.iterdir() if p.is_file()} == before


IMPORT_LAUNCH = (
    "import sys, nfm_cli.steps.importing as m\n"
    "orig = m.report\n"
    "def report(progress, task, done, total, **info):\n"
    "    print('REPORT', info.get('step'), flush=True)\n"
    "    if info.get('step') == 'evaluate':\n"
    "        sys.stdin.readline()\n"
    "    orig(progress, task, done, total, **info)\n"
    "m.report = report\n"
    "from nfm_cli.cli import main\n"
    "main(sys.argv[1:])\n")


@pytest.mark.integration
def test_sigterm_during_import_exits_143_and_writes_nothing(tmp_path):
    """`nfm import` has no partial progress to keep: SIGTERM while it evaluates the model (the launcher
    holds it at that report) gives exit 143, one line, and no output, temp or lock file; a rerun
    writes the checkpoint."""
    _, _, out, argv = _small_tensors_import(tmp_path)
    code, err, _ = signal_when_ready([sys.executable, "-c", IMPORT_LAUNCH, *argv],
                                     lambda line: line == "REPORT evaluate", signal.SIGTERM)   # held mid-import
    assert code == 143, err
    assert err.count("\n") == 1 and "interrupted by SIGTERM" in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.safetensors", "w.safetensors"]
    done = subprocess.run([sys.executable, "-m", "nfm_cli", *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and out.exists(), done.stderr
