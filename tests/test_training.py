"""Training on real data (scikit-learn digits) through the reference path."""
import os
import sys

import torch
from torch import nn

import roastfx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from quickstart import digits, mlp, train  # noqa: E402


def test_few_steps_reduce_loss_on_digits():
    x_tr, y_tr, _, _ = digits(0)
    model = roastfx.compress(mlp(128), "50x", init="random", seed=3)
    opt = torch.optim.Adam(model.parameters(), lr=5e-2)
    losses = []
    for step in range(40):
        idx = torch.arange(step * 32, step * 32 + 32) % len(x_tr)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5


def test_quickstart_mlp_at_100x_is_within_a_few_points_of_dense():
    torch.manual_seed(0)
    data = digits(0)
    dense_acc = train(mlp(), data, epochs=12, lr=1e-3, seed=0)
    compressed = roastfx.compress(mlp(), "100x", init="random", seed=0)
    roast_acc = train(compressed, data, epochs=12, lr=1e-2, seed=0)
    assert compressed.roast_memory.numel() == 3001
    assert roast_acc > 0.9 and roast_acc > dense_acc - 0.04, (dense_acc, roast_acc)
