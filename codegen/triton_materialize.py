"""Materialize a site's (rows, cols) view from the memory with a Triton kernel.

For the ops no fused kernel covers: the dense view is built once per call, on the
device, and handed to the ordinary torch op.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .hashing import TileHash
from .triton_hashing import element_block, hash_args, maybe_dump

BLOCK = 32


@triton.jit
def _materialize_kernel(
    mem_ptr, out_ptr,
    K, N, scale,
    tile_rows: tl.constexpr, tile_cols: tl.constexpr, alignment: tl.constexpr, window_start, offset_range,
    a_row, a_col, hb, c_row, c_col, hd,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_k, offs_n, mask_k, mask_n, index, sign = element_block(
        K, N, tile_rows, tile_cols, alignment, window_start, offset_range, a_row, a_col, hb, c_row, c_col, hd,
        BLOCK_K, BLOCK_N)
    mask = mask_k[:, None] & mask_n[None, :]
    w = tl.load(mem_ptr + index, mask=mask, other=0.0).to(tl.float32)
    w = tl.where(sign > 0, w, -w) * scale
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


def materialize(memory: torch.Tensor, mapping: TileHash, scale: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The (rows, cols) view ``scale * sign * memory[index]``, contiguous, in ``dtype`` (default memory's)."""
    out = torch.empty((mapping.rows, mapping.cols), device=memory.device, dtype=dtype or memory.dtype)
    grid = (triton.cdiv(mapping.rows, BLOCK), triton.cdiv(mapping.cols, BLOCK))
    launched = _materialize_kernel[grid](
        memory.reshape(-1), out, mapping.rows, mapping.cols, float(scale), *hash_args(mapping),
        BLOCK_K=BLOCK, BLOCK_N=BLOCK,
    )
    maybe_dump(_materialize_kernel, launched)
    return out
