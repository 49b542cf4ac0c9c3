#!/usr/bin/env python3
"""How far the Gauss-Newton diagonal is from the Hessian diagonal, by dense float64 computation (issue 21 item 3).

    scripts/ggn_vs_hessian.py [--quick] > table.md

For tiny networks (MLPs 12-16-16-4 with GELU, tanh and ReLU; a one-block vit-tiny on 8x8 images)
on 96 seeded samples, at four stages (random init; mid-training, the first full-batch Adam step whose
loss is half the initial one; converged, training cross-entropy <= 1e-3 or the step cap; and
converged on uniformly random labels), with the mean loss L over the samples:

* the Hessian diagonal diag(d^2 L / d theta^2), from the dense Hessian (torch.func.hessian on the
  flattened parameters);
* the generalized Gauss-Newton diagonal diag(1/N sum_b J_b^T H_b J_b), J_b the dense Jacobian of the
  logits (torch.func.jacrev) and H_b the loss Hessian in the logits (torch.func.hessian of the loss of
  one sample's logits): nothing of nfm's curvature code is used;

for both losses (``ce`` and the paper's ``normalized-ce``, eqs. 20-22), and prints the relative L2
error of the GGN diagonal against the Hessian diagonal, and normalized sharpness (eq. 17, solved by
``nfm_cli.measures.compute.compute_measures`` from each normalized-ce diagonal) with its relative
error. On piecewise-linear networks (ReLU) the two diagonals agree: there the residual term
sum_k (dL/df_k) d^2 f_k / d theta^2 vanishes for every weight.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev, vmap

import nfm_models
from nfm_cli.curvature.losses import per_sample_loss
from nfm_cli.measures.compute import compute_measures

SAMPLES, CLASSES = 96, 4
STAGES = ("init", "mid", "converged", "random labels")


def mlp(act: type[nn.Module]) -> nn.Module:
    """12-16-16-4 with activation ``act``."""
    return nn.Sequential(nn.Linear(12, 16), act(), nn.Linear(16, 16), act(), nn.Linear(16, CLASSES))


def vit() -> nn.Module:
    """vit-tiny on 8x8 images: 4 patches + class token, one block of width 8, two heads."""
    return nfm_models.build("vit-tiny", image_size=8, dim=8, depth=1, num_heads=2, num_classes=CLASSES)


MODELS = {"mlp-gelu": (lambda: mlp(nn.GELU), (12,), 1e-2), "mlp-tanh": (lambda: mlp(nn.Tanh), (12,), 1e-2),
          "mlp-relu": (lambda: mlp(nn.ReLU), (12,), 1e-2), "vit-tiny": (vit, (1, 8, 8), 3e-3)}


def data(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs, teacher labels (argmax of a fixed random linear map) and uniformly random labels."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((SAMPLES,) + shape, generator=gen, dtype=torch.float64)
    teacher = torch.randn(math.prod(shape), CLASSES, generator=gen, dtype=torch.float64)
    return x, (x.flatten(1) @ teacher).argmax(1), torch.randint(0, CLASSES, (SAMPLES,), generator=gen)


class Flat:
    """The model's parameters as one float64 vector, and the functions of it that the oracles need."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [p.shape for p in model.parameters()]
        self.vector = torch.cat([p.detach().flatten() for p in model.parameters()])

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = vector.split([math.prod(s) for s in self.shapes])
        return {n: t.view(s) for n, t, s in zip(self.names, parts, self.shapes, strict=True)}

    def logits(self, vector: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, self.unflatten(vector), (x,))


def diagonals(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(Hessian diagonal, GGN diagonal) of the mean loss, both flat."""
    flat = Flat(model)
    mean = lambda v: per_sample_loss(flat.logits(v, x), y, loss).mean()      # noqa: E731
    h_diag = hessian(mean)(flat.vector).diagonal()
    jac = jacrev(lambda v: flat.logits(v, x))(flat.vector)                    # [N, K, P]
    one = lambda f, label: per_sample_loss(f[None], label[None], loss)[0]      # noqa: E731
    logit_h = vmap(hessian(one))(flat.logits(flat.vector, x).detach(), y)    # [N, K, K]
    ggn_diag = torch.einsum("bkp,bkl,blp->p", jac, logit_h, jac) / len(y)
    return h_diag, ggn_diag


def normalized_sharpness(model: nn.Module, diag: torch.Tensor) -> float:
    """Eq. (17) summed over the weight matrices, from a flat normalized-ce diagonal."""
    hdiag = Flat(model).unflatten(diag)
    return compute_measures(model, hdiag).summary["normalized_sharpness"]


def train_to(model: nn.Module, x, y, lr: float, until, cap: int) -> tuple[float, int]:
    """Full-batch Adam until ``until(loss)`` or ``cap`` steps; returns (loss, steps)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(cap + 1):
        loss = per_sample_loss(model(x), y, "ce").mean()
        if until(float(loss)) or step == cap:
            return float(loss), step
        opt.zero_grad()
        loss.backward()
        opt.step()
    raise AssertionError


def stages(name: str, cap: int):
    """Yield (stage, model, x, labels, train loss, steps) for the four stages of one model."""
    build, shape, lr = MODELS[name]
    x, y, random_y = data(shape)
    torch.manual_seed(0)
    model = build().double()
    loss0 = float(per_sample_loss(model(x), y, "ce").mean().detach())
    yield "init", model, x, y, loss0, 0
    loss, steps = train_to(model, x, y, lr, lambda v: v <= loss0 / 2, cap)
    yield "mid", model, x, y, loss, steps
    loss, more = train_to(model, x, y, lr, lambda v: v <= 1e-3, cap)
    yield "converged", model, x, y, loss, steps + more
    torch.manual_seed(0)
    model = build().double()
    loss, steps = train_to(model, x, random_y, lr, lambda v: v <= 1e-3, cap)
    yield "random labels", model, x, random_y, loss, steps


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return float((a - b).norm() / b.norm())


def main() -> None:
    """Print the table (markdown) on stdout, one row per model and stage."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="at most 300 training steps per stage (a smoke test)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, of " + ", ".join(MODELS))
    args = parser.parse_args()
    cap = 300 if args.quick else 20_000
    print("| model | stage | Adam steps | train CE | rel. err. of diag, ce | rel. err. of diag, normalized-ce | "
          "NS (Hessian) | NS (GGN) | rel. err. of NS |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        for stage, model, x, y, loss, steps in stages(name, cap):
            h_ce, g_ce = diagonals(model, x, y, "ce")
            h_n, g_n = diagonals(model, x, y, "normalized-ce")
            ns_h, ns_g = normalized_sharpness(model, h_n), normalized_sharpness(model, g_n)
            print(f"| {name} | {stage} | {steps} | {loss:.2e} | {rel(g_ce, h_ce):.3f} | {rel(g_n, h_n):.3f} | "
                  f"{ns_h:.4g} | {ns_g:.4g} | {abs(ns_g - ns_h) / abs(ns_h):.3f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
