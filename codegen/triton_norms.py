"""Per-slice sums of squares of a site's view, read from the memory, and their gradient: what weight norm
needs (``torch._weight_norm(v, g, dim)`` divides each slice of v by its norm) without building v.

The view is read tile by tile at its hashed slots (as the materialize kernel does); each program squares
its block and reduces it along the view's rows (one sum per column: ``per_column``) or its columns,
writing one partial sum per block, which torch adds up: the same order on every run. The gradient of
``sumsq[j] = sum over slice j of (scale * sign * memory[slot])**2`` with respect to the memory is
``2 * scale**2 * memory[slot] * grad[j]`` summed into each slot over the slice's elements: atomic adds, or
with torch.use_deterministic_algorithms(True) the same sums through the view in torch (`runs.slice_sumsq_grad`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .hashing import TileHash
from . import runs
from .triton_hashing import element_block, hash_args, maybe_dump

BLOCK = 32


@triton.jit
def _slice_sumsq_kernel(
    mem_ptr, out_ptr,
    K, N, scale,
    tile_rows: tl.constexpr, tile_cols: tl.constexpr, alignment: tl.constexpr, window_start, offset_range,
    a_row, a_col, hb, c_row, c_col, hd,
    PER_COLUMN: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_k, offs_n, mask_k, mask_n, index, sign = element_block(
        K, N, tile_rows, tile_cols, alignment, window_start, offset_range, a_row, a_col, hb, c_row, c_col, hd,
        BLOCK_K, BLOCK_N)
    w = tl.load(mem_ptr + index, mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(tl.float32) * scale
    if PER_COLUMN:  # the sign squares away; partial sums of block row program_id(0): out is (row blocks, N)
        tl.store(out_ptr + tl.program_id(0) * N + offs_n, tl.sum(w * w, axis=0), mask=mask_n)
    else:  # out is (column blocks, K)
        tl.store(out_ptr + tl.program_id(1) * K + offs_k, tl.sum(w * w, axis=1), mask=mask_k)


@triton.jit
def _slice_sumsq_grad_kernel(
    mem_ptr, grad_ptr, out_ptr,
    K, N, twice_scale_sq,
    tile_rows: tl.constexpr, tile_cols: tl.constexpr, alignment: tl.constexpr, window_start, offset_range,
    a_row, a_col, hb, c_row, c_col, hd,
    PER_COLUMN: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_k, offs_n, mask_k, mask_n, index, sign = element_block(
        K, N, tile_rows, tile_cols, alignment, window_start, offset_range, a_row, a_col, hb, c_row, c_col, hd,
        BLOCK_K, BLOCK_N)
    mask = mask_k[:, None] & mask_n[None, :]
    m = tl.load(mem_ptr + index, mask=mask, other=0.0).to(tl.float32)
    if PER_COLUMN:
        g = tl.load(grad_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    else:
        g = tl.load(grad_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)[:, None]
    tl.atomic_add(out_ptr + index, m * g * twice_scale_sq, mask=mask)


def _grid(mapping: TileHash) -> tuple[int, int]:
    return triton.cdiv(mapping.rows, BLOCK), triton.cdiv(mapping.cols, BLOCK)


def slice_sumsq(memory: torch.Tensor, mapping: TileHash, scale: float, per_column: bool) -> torch.Tensor:
    """Sum of squares of each column (``per_column``) or row of the site's view, float32."""
    grid = _grid(mapping)
    parts = torch.empty((grid[0], mapping.cols) if per_column else (grid[1], mapping.rows),
                        device=memory.device, dtype=torch.float32)
    launched = _slice_sumsq_kernel[grid](
        memory.reshape(-1), parts, mapping.rows, mapping.cols, float(scale), *hash_args(mapping),
        PER_COLUMN=per_column, BLOCK_K=BLOCK, BLOCK_N=BLOCK)
    maybe_dump(_slice_sumsq_kernel, launched)
    return parts.sum(0)


def slice_sumsq_grad(grad: torch.Tensor, memory: torch.Tensor, mapping: TileHash, scale: float, per_column: bool,
                     deterministic: bool | None = None) -> torch.Tensor:
    """d(loss)/d(memory) of `slice_sumsq`, given d(loss)/d(sums); float32."""
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if deterministic:
        return runs.slice_sumsq_grad(grad, memory, mapping, scale, per_column).float()
    out = torch.zeros(memory.numel(), device=memory.device, dtype=torch.float32)
    launched = _slice_sumsq_grad_kernel[_grid(mapping)](
        memory.reshape(-1), grad.contiguous(), out, mapping.rows, mapping.cols, 2.0 * float(scale) ** 2,
        *hash_args(mapping), PER_COLUMN=per_column, BLOCK_K=BLOCK, BLOCK_N=BLOCK)
    maybe_dump(_slice_sumsq_grad_kernel, launched)
    return out
