"""Baseline for ``bench/whole_process.py train``: the work of ``nfm train`` written as a plain PyTorch
script, with nothing of nfm: read Fashion-MNIST's gz IDX files with gzip + numpy, standardise, take
the first TRAIN_SIZE samples, MLP 784-512-512-512-10, Adam (lr 1e-3), batch 128, shuffled each epoch,
train and test accuracy and loss every epoch, no checkpoint. Only the final weights are saved.

    python bench/baselines/plain_train.py DATA_DIR TRAIN_SIZE EPOCHS OUT
"""
import gzip
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def idx(path):
    with gzip.open(path) as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def split(folder, prefix):
    x = torch.from_numpy(idx(f"{folder}/{prefix}-images-idx3-ubyte.gz").copy()).float().div(255).unsqueeze(1)
    y = torch.from_numpy(idx(f"{folder}/{prefix}-labels-idx1-ubyte.gz").astype(np.int64))
    return (x - 0.2860) / 0.3530, y


def main():
    folder, n, epochs, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    x, y = split(folder, "train")
    x, y = x[:n], y[:n]
    xt, yt = split(folder, "t10k")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                          nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        model.train()
        for idx_ in torch.randperm(n).split(128):
            loss = F.cross_entropy(model(x[idx_]), y[idx_])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            for xs, ys in ((x, y), (xt, yt)):
                logits = torch.cat([model(c) for c in xs.split(1024)])
                F.cross_entropy(logits, ys).item(), (logits.argmax(1) == ys).float().mean().item()
    torch.save(model.state_dict(), out)


if __name__ == "__main__":
    main()
