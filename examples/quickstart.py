"""Quickstart: compress an MLP 100x with ROAST, train it on scikit-learn's digits,
and compare it with the same MLP trained dense.

    python examples/quickstart.py [--compression 100x] [--epochs 40] [--seed 0]
"""
from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import roastfx


def digits(seed: int = 0):
    """1,797 real 8x8 digits (shipped inside scikit-learn), standardized, 75/25 split."""
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6
    f = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)
    return f(x_tr), torch.tensor(y_tr), f(x_te), torch.tensor(y_te)


def mlp(hidden: int = 512) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def train(model, data, epochs: int, lr: float, seed: int) -> float:
    """Adam, batch 64, fixed shuffling; returns test accuracy."""
    x_tr, y_tr, x_te, y_te = data
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x_tr), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return float((model(x_te).argmax(1) == y_te).float().mean())


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compression", default="100x")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    data = digits(args.seed)

    dense = mlp()
    compressed = roastfx.compress(mlp(), args.compression, seed=args.seed, init="random")

    t0 = time.perf_counter()
    dense_acc = train(dense, data, args.epochs, 1e-3, args.seed)
    t1 = time.perf_counter()
    roast_acc = train(compressed, data, args.epochs, 1e-2, args.seed)
    t2 = time.perf_counter()

    print(roastfx.roast_state(compressed).plan.summary())
    print()
    print(f"{'model':12s} {'parameter memory':>18s} {'test accuracy':>14s} {'train time':>11s}")
    print(f"{'dense':12s} {weight_bytes(dense):>16,d} B {dense_acc:>14.3f} {t1 - t0:>10.1f}s")
    print(f"{'roast ' + args.compression:12s} {weight_bytes(compressed):>16,d} B {roast_acc:>14.3f} {t2 - t1:>10.1f}s")
    print(f"memory {weight_bytes(dense) / weight_bytes(compressed):.1f}x smaller (biases included), "
          f"accuracy {100 * (roast_acc - dense_acc):+.1f} points")
    return dense_acc, roast_acc


if __name__ == "__main__":
    main()
