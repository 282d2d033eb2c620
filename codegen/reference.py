"""The PyTorch reference path: plain gathers from the memory.

It is the oracle every Triton kernel is tested against and the path that runs
wherever no kernel applies. Autograd flows through the gathers, so the memory
receives the sum of signed, scaled gradients of every element mapped to a slot.
"""
from __future__ import annotations

import torch

from .hashing import TileHash


def materialize(memory: torch.Tensor, mapping: TileHash, scale: float) -> torch.Tensor:
    """The (rows, cols) B view of one site: ``scale * sign * memory[index]``."""
    index, sign = mapping.full_index(memory.device)
    # sign * memory is exact; the Python scale then multiplies in the op's float math and rounds once (a
    # product with the scale rounded to a bf16 memory's dtype first was off by up to 0.5%)
    return memory[index] * sign.to(memory.dtype) * float(scale)


def materialize_rows(memory: torch.Tensor, mapping: TileHash, scale: float, rows: torch.Tensor) -> torch.Tensor:
    """Only the given rows of the B view (an embedding lookup), shape rows.shape + (cols,)."""
    k = rows.to(torch.int64).unsqueeze(-1)
    n = torch.arange(mapping.cols, device=memory.device, dtype=torch.int64)
    index, sign = mapping.index_and_sign(k, n)
    return memory[index] * sign.to(memory.dtype) * float(scale)


def view_to_weight(view: torch.Tensor, shape: tuple[int, ...], transposed: bool) -> torch.Tensor:
    """Turn a B view back into the parameter's own shape."""
    if transposed:
        return view.t().reshape(shape)
    return view.reshape(shape)


def weight_to_view(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The B view of a dense parameter: 2-D, (K, N) as the GEMM reads it."""
    w2d = weight.reshape(weight.shape[0], -1) if weight.dim() >= 2 else weight.reshape(-1, 1)
    return w2d.t() if transposed else w2d


def project(
    views: list[torch.Tensor], mappings: list[TileHash], scales: list[float], memory_size: int
) -> torch.Tensor:
    """Least-squares memory for dense weights: per slot, the mean of ``sign * w / scale``
    over every element that lands there (float64; empty slots are 0)."""
    total = torch.zeros(memory_size, dtype=torch.float64)
    count = torch.zeros(memory_size, dtype=torch.float64)
    for view, mapping, scale in zip(views, mappings, scales):
        index, sign = mapping.full_index()
        values = view.detach().to("cpu", torch.float64) * sign.to(torch.float64) / scale
        total.index_add_(0, index.reshape(-1), values.reshape(-1))
        count.index_add_(0, index.reshape(-1), torch.ones(index.numel(), dtype=torch.float64))
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def slot_load(mappings: list[TileHash], memory_size: int) -> torch.Tensor:
    """How many weight elements land on each memory slot (int64, length memory_size)."""
    load = torch.zeros(memory_size, dtype=torch.int64)
    for mapping in mappings:
        index, _ = mapping.full_index()
        load.index_add_(0, index.reshape(-1), torch.ones(index.numel(), dtype=torch.int64))
    return load
