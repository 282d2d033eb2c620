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


GROUPED = "grouped"  # a site's op when its weight stacks groups, (groups, out, in) or (groups, in, out): experts


def grouped_dims(shape: tuple[int, ...], transposed: bool) -> tuple[int, int, int]:
    """(groups, K, N) of a stacked weight read one group at a time as B_g (K, N): W[g]^T when transposed
    (stored (groups, N, K), as F.linear reads an expert), else W[g] (stored (groups, K, N))."""
    if len(shape) != 3:
        raise ValueError(f"a {GROUPED!r} site's weight is 3-D (groups, ...), got shape {tuple(shape)}")
    g, a, b = shape
    return (g, b, a) if transposed else (g, a, b)


def view_to_weight(view: torch.Tensor, shape: tuple[int, ...], transposed: bool, op: str | None = None
                   ) -> torch.Tensor:
    """Turn a B view back into the parameter's own shape. A grouped site's view is (K, groups * N): group
    g's B_g is the column block [g*N, (g+1)*N)."""
    if op == GROUPED:
        g, k, n = grouped_dims(shape, transposed)
        # a strided view of V, no copy (as a Linear's weight is V.t()): group g's B_g is V's column block, which
        # a GEMM reads in place
        w = view.reshape(k, g, n)
        return w.permute(1, 2, 0) if transposed else w.permute(1, 0, 2)
    if transposed:
        return view.t().reshape(shape)
    return view.reshape(shape)


def weight_to_view(weight: torch.Tensor, transposed: bool, op: str | None = None) -> torch.Tensor:
    """The B view of a dense parameter: 2-D, (K, N) as the GEMM reads it ((K, groups * N) for a grouped site)."""
    if op == GROUPED:
        g, k, n = grouped_dims(tuple(weight.shape), transposed)
        return (weight.permute(2, 0, 1) if transposed else weight.permute(1, 0, 2)).reshape(k, g * n)
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


def project_write(baseline: torch.Tensor, load: torch.Tensor, views: list[torch.Tensor], mappings: list[TileHash],
                  scales: list[float]) -> torch.Tensor:
    """The memory after some sites' weights are set to ``views`` (their B views) and every other site's kept:
    on each slot those sites land on, the mean of ``sign * w / scale`` over every element there (``project``'s
    least squares), where each other site's element counts with its value in ``baseline``, which is that
    slot's value. ``load``: ``slot_load`` of every site. float64, on the baseline's device; the slots the
    written sites do not touch keep their value."""
    device = baseline.device
    total = torch.zeros(baseline.numel(), dtype=torch.float64, device=device)
    mine = torch.zeros(baseline.numel(), dtype=torch.float64, device=device)
    for view, mapping, scale in zip(views, mappings, scales):
        index, sign = mapping.full_index(device)
        index = index.reshape(-1)
        values = (view.detach().to(device, torch.float64) * sign.to(device, torch.float64) / scale).reshape(-1)
        total.index_add_(0, index, values)
        mine.index_add_(0, index, torch.ones_like(values))
    old = baseline.detach().to(torch.float64)
    others = load.to(device, torch.float64) - mine
    return torch.where(mine > 0, (old * others + total) / (others + mine).clamp_min(1), old)


def slot_load(mappings: list[TileHash], memory_size: int) -> torch.Tensor:
    """How many weight elements land on each memory slot (int64, length memory_size)."""
    load = torch.zeros(memory_size, dtype=torch.int64)
    for mapping in mappings:
        index, _ = mapping.full_index()
        load.index_add_(0, index.reshape(-1), torch.ones(index.numel(), dtype=torch.int64))
    return load
