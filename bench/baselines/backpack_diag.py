"""Baseline for ``bench/whole_process.py measure`` and ``hessian-diag``: one BackPACK ``DiagGGNExact``
diagonal (CE loss, mean over the samples) of an nfm checkpoint, as a plain whole-process script:
read the checkpoint with safetensors, rebuild the model from nfm's model registry, read the
training samples it names from Fashion-MNIST's gz IDX files (gzip + numpy), then the diagonal in
batches of BATCH samples (the sum of per-batch diagonals weighted by batch share), saved with
safetensors.

    python bench/baselines/backpack_diag.py CHECKPOINT DATA_DIR OUT [BATCH]
"""
import gzip
import json
import sys

import numpy as np
import torch
from backpack import backpack, extend
from backpack.extensions import DiagGGNExact
from safetensors import safe_open
from safetensors.torch import save_file

try:
    import nfm_models as models
except ImportError:  # before the models package was renamed
    import nfm_models as models


def idx(path):
    with gzip.open(path) as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def main():
    path, folder, out = sys.argv[1:4]
    batch = int(sys.argv[4]) if len(sys.argv) > 4 else 512
    with safe_open(path, "pt") as f:
        spec = json.loads(f.metadata()["nfm.model"])
        state = {k[6:]: f.get_tensor(k) for k in f.keys() if k.startswith("model.")}
        indices, labels = f.get_tensor("data.indices"), f.get_tensor("data.labels")
    model = models.build(spec["name"], **spec["args"])
    model.load_state_dict(state)
    model = extend(model.eval())
    images = idx(f"{folder}/train-images-idx3-ubyte.gz")[indices.numpy()]
    x = (torch.from_numpy(images.copy()).float().div(255).unsqueeze(1) - 0.2860) / 0.3530
    loss_fn = extend(torch.nn.CrossEntropyLoss())
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for xb, yb in zip(x.split(batch), labels.split(batch), strict=True):
        model.zero_grad()
        loss = loss_fn(model(xb), yb)
        with backpack(DiagGGNExact()):
            loss.backward()
        for n, p in model.named_parameters():
            total[n] += p.diag_ggn_exact * (len(yb) / len(labels))
    save_file(total, out)


if __name__ == "__main__":
    main()
