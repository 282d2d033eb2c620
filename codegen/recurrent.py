"""One step of an RNN's gate arithmetic, from its input's and hidden state's projections.

Shared by the compressed RNN modules' step-by-step forward (roastfx/rnn.py) and by the roast backend's rewrite
of an aten RNN cell op (``lstm_cell`` ...) into two ``roast_linear`` and these gates (passes/fuse_roast_ops.py).
The formulas are torch's (nn.LSTM, nn.GRU, nn.RNN docs).
"""
from __future__ import annotations

import torch


def rnn_gates(mode: str, gates_x: torch.Tensor, gates_h: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None):
    """(h, c) after one step of an RNN of ``mode`` ("LSTM", "GRU", "RNN_TANH", "RNN_RELU") from the input's and
    the hidden state's projections (biases included); c is None but for an LSTM."""
    if mode == "LSTM":
        i, f, g, o = (gates_x + gates_h).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if mode == "GRU":
        x_r, x_z, x_n = gates_x.chunk(3, -1)
        h_r, h_z, h_n = gates_h.chunk(3, -1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return (1 - z) * n + z * h, None
    z = gates_x + gates_h
    return (torch.tanh(z) if mode == "RNN_TANH" else torch.relu(z)), None
