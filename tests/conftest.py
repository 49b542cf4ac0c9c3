"""Shared fixtures: isolated cache/data folders, one chain of tiny session-wide artifacts, an in-process CLI runner."""
from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

from nfm_cli.cli import main
from nfm_cli.curvature.losses import mean_loss
from nfm_cli.steps.hessian_diag import compute_hessian_diagonal
from nfm_cli.steps.solve import solve_variance
from nfm_cli.steps.train import TrainConfig, train
from nfm_cli.store.artifacts import write_artifact


def _share_the_cores_between_workers() -> None:
    """Under pytest-xdist (make test runs ``-n auto``) each worker gets cores / workers torch threads,
    so two workers on two cores do not fight over them; alone, torch keeps its default."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


_share_the_cores_between_workers()


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """No test reads or writes the user's cache or $NFM_DATA; runs are single-threaded-stable."""
    monkeypatch.setenv("NFM_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("NFM_DATA", raising=False)
    monkeypatch.delenv("NFM_DEBUG", raising=False)


@pytest.fixture
def one_thread():
    """Tiny float64 models are overhead-bound: one thread is faster, and robust on a shared 2-core VM."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sha256_of(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tiny_config(**overrides) -> TrainConfig:
    base = dict(model="mlp", dataset="synthetic", width=16, epochs=2, batch_size=32, train_size=128,
                test_size=64, random_ratio=0.3, seed=0)
    base.update(overrides)
    return TrainConfig(**base)


# One chain of session-wide artifacts, made once and shared by every test module (never modify them;
# copy one into tmp_path first): checkpoint -> exact normalized-ce Hessian diagonal -> measures file,
# and a second checkpoint of the same config with another seed (for lineage refusals).

@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A complete 2-epoch MLP checkpoint on 128 synthetic samples."""
    out = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    train(tiny_config(), out, device="cpu")
    return out


@pytest.fixture(scope="session")
def other_checkpoint(tmp_path_factory) -> Path:
    """The same config as ``tiny_checkpoint`` with seed 1: another checkpoint, same model."""
    out = tmp_path_factory.mktemp("ckpt-other") / "other.safetensors"
    train(tiny_config(seed=1), out, device="cpu")
    return out


@pytest.fixture(scope="session")
def tiny_hdiag(tiny_checkpoint, tmp_path_factory) -> Path:
    """The exact normalized-ce Hessian diagonal of ``tiny_checkpoint``."""
    out = tmp_path_factory.mktemp("hdiag") / "tiny.hdiag.safetensors"
    compute_hessian_diagonal(tiny_checkpoint, out, loss="normalized-ce", estimator="exact", device="cpu")
    return out


@pytest.fixture(scope="session")
def tiny_measures(tiny_checkpoint, tiny_hdiag, tmp_path_factory) -> Path:
    """``solve-variance`` of ``tiny_checkpoint`` with ``tiny_hdiag``."""
    out = tmp_path_factory.mktemp("measures") / "tiny.measures.safetensors"
    solve_variance(tiny_checkpoint, tiny_hdiag, out)
    return out


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def cli(capsys):
    """Run ``nfm ARGS`` in-process; returns exit code, stdout, stderr."""

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def read_safetensors(path) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file, read directly (not through nfm's readers)."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def assert_same_artifact(got, want, ignore=("nfm.wall_time",)) -> None:
    """Bit-identical tensors (names, dtypes, values) and metadata, except the keys in ``ignore``."""
    gt, gm = read_safetensors(got)
    wt, wm = read_safetensors(want)
    assert sorted(gt) == sorted(wt), f"{got}: tensor names differ"
    for name in wt:
        assert gt[name].dtype == wt[name].dtype and torch.equal(gt[name], wt[name]), f"{got}: tensor {name} differs"
    strip = lambda m: {k: v for k, v in m.items() if k not in ignore}  # noqa: E731
    assert strip(gm) == strip(wm), f"{got}: metadata differs"


def signal_when_ready(cmd: list[str], ready: Callable[[str], bool], sig: int, env: dict[str, str] | None = None,
                      timeout: float = 300) -> tuple[int, str, list[str]]:
    """Run ``cmd`` (a launcher that prints its progress on stdout and, at the chosen point, waits for a
    line on stdin); once a stdout line satisfies ``ready`` the process is known to be there: send
    ``sig``, release it, and return (exit code, stderr, every stdout line). The process never outlives
    the call."""
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    seen: list[str] = []
    try:
        for line in proc.stdout:
            seen.append(line.rstrip("\n"))
            if ready(seen[-1]):
                break
        else:
            raise AssertionError(f"the run ended before the point to signal it: {proc.stderr.read()}")
        proc.send_signal(sig)             # it waits on stdin: the signal lands at a known point
        proc.stdin.write("go\n")
        proc.stdin.flush()
        rest, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err, seen + rest.splitlines()


# ---- file writers shared by several test modules ----------------------------------------------

def write_idx(folder, prefix, images, labels, compress):
    folder.mkdir(parents=True, exist_ok=True)
    n, rows, cols = images.shape
    img = struct.pack(">IIII", 0x00000803, n, rows, cols) + images.astype(np.uint8).tobytes()
    lab = struct.pack(">II", 0x00000801, n) + labels.astype(np.uint8).tobytes()
    for name, payload in ((f"{prefix}-images-idx3-ubyte", img), (f"{prefix}-labels-idx1-ubyte", lab)):
        if compress:
            with gzip.open(folder / (name + ".gz"), "wb") as fh:
                fh.write(payload)
        else:
            (folder / name).write_bytes(payload)

def make_result(gap: float | None, ratio: float, model: str = "mlp", dataset: str = "fashion-mnist", seed: int = 0,
                **measures) -> dict:
    base = {"normalized_sharpness": 1.0, "matrix_normalized_sharpness": 2.0, "hessian_trace": 3.0,
            "hessian_trace_weights": 2.5, "fisher_rao_norm": 4.0, "frobenius_norm_sq": 5.0,
            "spectral_norm_product": 6.0, "log_spectral_norm_product": math.log(6.0), "clipped_fraction": 0.01,
            "weight_matrices": 3, "params_in_matrices": 120, "params_left_out": 12, "converged": True,
            "layers": {"fc1.weight": {"normalized_sharpness": 0.5}}}
    base.update(measures)
    test_acc = None if gap is None else 1.0 - gap
    base["metrics"] = {"train_acc": 1.0, "test_acc": test_acc, "gap": gap, "train_loss": 0.01, "test_loss": 1.5,
                       "random_ratio": ratio, "model": model, "dataset": dataset, "seed": seed, "train_size": 256,
                       "epochs": 3}
    return base

def write_measures(path, result: dict):
    write_artifact(path, {"sigma_row.w": torch.ones(2)}, "measures", {"result": result})
    return path


def sweep(folder, n: int = 8, models=("mlp",)):
    """n runs per model: normalized sharpness exactly linear in the gap, the Hessian trace monotone
    (cubic) in it, the Frobenius norm constant, the Fisher-Rao norm null on every third run."""
    paths = []
    for model in models:
        for i in range(n):
            ratio = i / max(n - 1, 1)
            gap = 0.05 + 0.8 * ratio + (0.01 * i if model == "mlp" else 0.02 * i)
            result = make_result(gap, ratio, model=model, seed=i,
                                 normalized_sharpness=10.0 + 3.0 * gap, hessian_trace=2.0 + gap ** 3,
                                 frobenius_norm_sq=7.0, fisher_rao_norm=None if i % 3 == 0 else 1.0 + (i % 2),
                                 spectral_norm_product=1e300 * (1 + i))
            paths.append(write_measures(folder / f"{model}-{i}.safetensors", result))
    return paths


# ---- float64 oracles and tiny models shared by the curvature and measures tests --------------

def dense_diagonal(model, x, y, loss):
    """Diagonal of the dense Hessian of the mean loss, one parameter tensor block at a time."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    out = {}
    for name, value in params.items():
        def loss_of(w, name=name):
            return mean_loss(functional_call(model, {**buffers, **params, name: w}, (x,)), y, loss)
        block = hessian(loss_of)(value).reshape(value.numel(), value.numel())
        out[name] = block.diagonal().reshape(value.shape)
    return out


def dense_gauss_newton_diagonal(model, x, y, loss):
    """Diagonal of the generalized Gauss-Newton matrix of the mean loss, (1/N) sum_b J_b^T H_b J_b, from
    dense per-sample Jacobians of the logits (torch.func.jacrev) and autograd Hessians of the loss in
    the logits (torch.func.hessian), float64: the oracle of the ggn estimator."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    for b in range(len(y)):
        xb, yb = x[b:b + 1], y[b:b + 1]

        def logits_of(p, xb=xb):
            return functional_call(model, {**buffers, **p}, (xb,))[0]
        jac = jacrev(logits_of)(params)                                       # {name: [K, *shape]}
        logits = logits_of(params).detach()
        h = hessian(lambda f, yb=yb: mean_loss(f.unsqueeze(0), yb, loss))(logits)   # [K, K]
        for n, j in jac.items():
            flat = j.reshape(j.shape[0], -1)
            out[n] += torch.einsum("kp,kl,lp->p", flat, h, flat).reshape(params[n].shape)
    return {n: v / len(y) for n, v in out.items()}


def spot_diagonal(model, x, y, loss, per_tensor=6, seed=0, only=None):
    """A few exact diagonal entries per tensor (of the tensors named in ``only``, default all),
    d^2 L / d theta_i^2 = (H e_i)_i, by double backward."""
    gen = torch.Generator().manual_seed(seed)
    params = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    value = mean_loss(functional_call(model, {**buffers, **params}, (x,)), y, loss)
    grads = torch.autograd.grad(value, list(params.values()), create_graph=True)
    picks = {}
    for (name, p), g in zip(params.items(), grads, strict=True):
        idx = torch.randint(0, p.numel(), (per_tensor,), generator=gen)
        if only is not None and name not in only:
            continue
        entries = []
        for i in idx.tolist():
            (row,) = torch.autograd.grad(g.reshape(-1)[i], p, retain_graph=True)
            entries.append(row.reshape(-1)[i])
        picks[name] = (idx, torch.stack(entries))
    return picks


def max_relative_error(estimate, reference):
    scale = max(float(r.abs().max()) for r in reference.values())
    return max(float((estimate[n] - reference[n]).abs().max()) for n in reference) / scale


def relative_l2(estimate, reference):
    diff = torch.cat([(estimate[n] - reference[n]).flatten() for n in reference])
    return float(diff.norm() / torch.cat([r.flatten() for r in reference.values()]).norm())


def randomize_batchnorm(model):
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            shape = m.running_mean.shape
            m.running_mean.copy_(torch.rand(shape, generator=gen, dtype=torch.float64) - 0.5)
            m.running_var.copy_(torch.rand(shape, generator=gen, dtype=torch.float64) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5)
            m.bias.data.copy_(torch.rand(shape, generator=gen, dtype=torch.float64) * 0.6 - 0.3)
    return model


class ResidualBlock(nn.Module):
    """BN -> ReLU -> conv, plus the identity: a residual sum, flagged piecewise linear."""

    piecewise_linear = True

    def __init__(self, channels):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv(self.relu(self.bn(x)))


def tiny_mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.ReLU(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 4))


def tiny_conv_maxpool():
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(3, 4, 2, stride=1), nn.ReLU(), nn.Flatten(), nn.Linear(4, 4))


def tiny_conv_avgpool():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, stride=2, bias=False, padding_mode="circular"),
                         nn.ReLU(),
                         nn.Conv2d(4, 4, 2, groups=2, dilation=1), nn.AvgPool2d(1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))


def tiny_bn_residual():
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), ResidualBlock(3), nn.BatchNorm2d(3),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4))


def tiny_conv1d_padding_modes():
    return nn.Sequential(nn.Conv1d(2, 3, 3, padding="same", padding_mode="reflect"), nn.ReLU(),
                         nn.BatchNorm1d(3), nn.Flatten(), nn.Linear(18, 4))


TINY = {"mlp": (tiny_mlp, (12,)), "conv-maxpool": (tiny_conv_maxpool, (2, 4, 4)),
        "conv-avgpool-groups": (tiny_conv_avgpool, (2, 6, 6)), "bn-residual": (tiny_bn_residual, (2, 4, 4)),
        "conv1d-reflect-bn1d": (tiny_conv1d_padding_modes, (2, 6))}


def tiny_case(name, n=10, seed=0):
    torch.manual_seed(seed)
    build, shape = TINY[name]
    model = randomize_batchnorm(build().double()).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn((n,) + shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (n,), generator=gen)
    return model, x, y


class Functional(nn.Module):
    """Piecewise linear through functions and methods only: every allow-listed kind of node."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 2 * 2 + 2, 3)
        self.register_buffer("shift", torch.linspace(-0.5, 0.5, 2).reshape(1, 2, 1, 1))

    def forward(self, x):
        x = (x - self.shift) / 2                     # constant buffer, division by a constant
        out = F.relu(self.conv(x))
        skip = out
        out = F.relu6(self.bn(self.depthwise(out)) * 3.0)
        out += skip                                   # in place on a layer output's consumer
        out = F.max_pool2d(out, 2)
        out = F.dropout(out, 0.5, self.training)
        out = F.adaptive_avg_pool2d(out, (2, 2))
        side = torch.flatten(x, 2).mean(-1)           # [B, 2]
        flat = torch.cat([out.view(out.size(0), -1), side], dim=1)
        return self.fc(flat[:, :])


def gelu_model():
    return nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 3))


# ---- tiny transformers (rescale --mode attention/layernorm/all; issue 21) ---------------------

class EncoderClassifier(nn.Module):
    """Tokens (B, 5, 12) -> Linear embedding -> nn.TransformerEncoder (2 layers, pre- or post-LN) ->
    mean over tokens -> Linear head: a user's model built from torch's own transformer modules."""

    def __init__(self, norm_first: bool, split_qkv: bool = False):
        super().__init__()
        self.embed = nn.Linear(12, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 24, dropout=0.0, batch_first=True, norm_first=norm_first)
        if split_qkv:   # separate q/k/v_proj_weight: nn.MultiheadAttention does so when kdim != embed_dim
            layer.self_attn = nn.MultiheadAttention(16, 2, batch_first=True, kdim=16, vdim=16, add_bias_kv=True)
            layer.self_attn._qkv_same_embed_dim = False
            layer.self_attn.in_proj_weight = None
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                setattr(layer.self_attn, name, nn.Parameter(torch.randn(16, 16) / 4))
        self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16) if norm_first else None,
                                             enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


def perturb_parameters(model: nn.Module, seed: int = 0, scale: float = 0.2) -> nn.Module:
    """Every parameter + scale * N(0, 1) (seeded): no zero-initialized head, no unit LayerNorm gain."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def tiny_transformer(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """(float64 eval-mode model, inputs) for one of TRANSFORMERS."""
    torch.manual_seed(seed)
    if name == "timm-vit":
        timm = pytest.importorskip("timm")
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                                  embed_dim=32, num_heads=2, num_classes=5)
        shape = (3, 32, 32)
    elif name == "timm-swin":
        timm = pytest.importorskip("timm")
        model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=4,
                                  window_size=4, depths=(1, 1), num_heads=(2, 4), embed_dim=16, num_classes=5)
        shape = (3, 32, 32)
    elif name == "torchvision-vit":
        from torchvision.models import VisionTransformer
        model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                  mlp_dim=64, num_classes=5)
        shape = (3, 32, 32)
    elif name == "vit-tiny":
        import nfm_models
        model, shape = nfm_models.build("vit-tiny", image_size=8, dim=4, depth=1, num_heads=2, num_classes=3), (1, 8, 8)
    else:
        model = EncoderClassifier(norm_first=name == "encoder-pre-ln", split_qkv=name == "encoder-split-qkv")
        shape = (5, 12)
    model = perturb_parameters(model.double(), seed).eval()
    x = torch.randn((6,) + shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return model, x


TRANSFORMERS = ("timm-vit", "timm-swin", "torchvision-vit", "vit-tiny", "encoder-pre-ln", "encoder-post-ln",
                "encoder-split-qkv")


# ---- tiny models of modern families (issue 20): attention, LayerNorm, GELU, SiLU, gates, embeddings ----

class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, t, d))


class TinyViT(nn.Module):
    """Patch conv, class token, position embedding, pre-LN block with softmax attention, GELU MLP,
    layer scale (a raw parameter multiplying activations), final LayerNorm, head on the class token."""

    def __init__(self, dim=8, classes=4):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 2, stride=2)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos_embed = nn.Parameter(torch.randn(1, 5, dim) * 0.5)
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, 2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)                       # [B, 4, D]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = x + self.attn(self.norm1(x))
        x = x + self.gamma * self.mlp(self.norm2(x))
        return self.head(self.norm(x)[:, 0])


class TokenClassifier(nn.Module):
    """nn.Embedding + nn.TransformerEncoderLayer on int64 tokens, mean pooling, linear head."""

    def __init__(self, vocab=7, dim=8, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.layer = nn.TransformerEncoderLayer(dim, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        return self.head(self.layer(self.embed(tokens)).mean(1))


class ConvNeXtBlock(nn.Module):
    """Depthwise conv, channels-last LayerNorm, pointwise Linear-GELU-Linear, layer scale, residual."""

    def __init__(self, dim=4):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pw1, self.act, self.pw2 = nn.Linear(dim, 3 * dim), nn.GELU(), nn.Linear(3 * dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pw2(self.act(self.pw1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


def convnext_like():
    return nn.Sequential(nn.Conv2d(2, 4, 2, stride=2), ConvNeXtBlock(4), nn.GroupNorm(2, 4),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


class SqueezeExcite(nn.Module):
    def __init__(self, ch, hidden):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(ch, hidden, 1), nn.Conv2d(hidden, ch, 1)

    def forward(self, x):
        gate = F.hardsigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        return x * gate


def mobilenet_like():
    """Conv-BN-Hardswish stem, depthwise conv with SiLU, squeeze-excitation gate, 1x1 projection."""
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Hardswish(),
                         nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.BatchNorm2d(6), nn.SiLU(),
                         SqueezeExcite(6, 2), nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


MODERN = ("vit", "tokens", "convnext", "mobilenet")


def modern_case(name):
    """(model, inputs, labels) of a tiny float64 model of a modern family (not piecewise linear)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if name == "vit":
        model, x = TinyViT(), torch.randn(6, 3, 4, 4, generator=gen)
    elif name == "tokens":
        model, x = TokenClassifier(), torch.randint(0, 7, (6, 5), generator=gen)
        x[0, :2] = 0                                                      # padding tokens
        x[1] = 3                                                          # one token repeated
    elif name == "convnext":
        model, x = convnext_like(), torch.randn(6, 2, 4, 4, generator=gen)
    else:
        model, x = randomize_batchnorm(mobilenet_like()), torch.randn(6, 2, 4, 4, generator=gen)
    model = model.double().eval()
    x = x.double() if x.is_floating_point() else x
    return model, x, torch.randint(0, 3, (6,), generator=gen)
