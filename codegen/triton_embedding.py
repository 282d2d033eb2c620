"""Embedding lookups over the ROAST mapping: gather rows of a site's view, scatter their gradients.

A site that is an embedding table of shape (num_embeddings, dim) has the view
(rows=num_embeddings, cols=dim): looking up id t reads row t of the view.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .hashing import TileHash
from .triton_hashing import hash_args, maybe_dump, offset_magic, roast_index_and_sign

BLOCK_T = 32
BLOCK_N = 32


@triton.jit
def _row_slots(
    ids_ptr, T, N,
    tile_rows: tl.constexpr, tile_cols: tl.constexpr, alignment: tl.constexpr, window_start, offset_range,
    a_row, a_col, hb, c_row, c_col, hd,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The memory slots and signs of this program's (BLOCK_T tokens, BLOCK_N columns) block of looked-up
    rows, with its token and column offsets and mask."""
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_t = offs_t < T
    mask = mask_t[:, None] & (offs_n < N)[None, :]
    rows = tl.load(ids_ptr + offs_t, mask=mask_t, other=0)
    index, sign = roast_index_and_sign(
        rows[:, None], offs_n[None, :], tile_rows, tile_cols, alignment, window_start,
        offset_range, a_row, a_col, hb, c_row, c_col, hd, offset_magic(offset_range))
    return index, sign, offs_t, offs_n, mask


@triton.jit
def roast_gather_block(
    ids_ptr, mem_ptr, T, N,
    tile_rows: tl.constexpr, tile_cols: tl.constexpr, alignment: tl.constexpr, window_start, offset_range,
    a_row, a_col, hb, c_row, c_col, hd,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """This program's block of looked-up rows, signed, in fp32 (without the site's scale), with its token
    and column offsets and mask. The plain gather below and the embedding kernels generated per epilogue
    (triton_epilogue.py) run it."""
    index, sign, offs_t, offs_n, mask = _row_slots(
        ids_ptr, T, N, tile_rows, tile_cols, alignment, window_start, offset_range, a_row, a_col, hb, c_row, c_col,
        hd, BLOCK_T, BLOCK_N)
    w = tl.load(mem_ptr + index, mask=mask, other=0.0).to(tl.float32)
    return tl.where(sign > 0, w, -w), offs_t, offs_n, mask


@triton.jit
def _gather_rows_kernel(
    ids_ptr, mem_ptr, out_ptr,
    T, N, scale,
    tile_rows: tl.constexpr, tile_cols: tl.constexpr, alignment: tl.constexpr, window_start, offset_range,
    a_row, a_col, hb, c_row, c_col, hd,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    w, offs_t, offs_n, mask = roast_gather_block(
        ids_ptr, mem_ptr, T, N, tile_rows, tile_cols, alignment, window_start, offset_range, a_row, a_col, hb,
        c_row, c_col, hd, BLOCK_T, BLOCK_N)
    tl.store(out_ptr + offs_t[:, None] * N + offs_n[None, :], (w * scale).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scatter_rows_kernel(
    ids_ptr, grad_out_ptr, grad_mem_ptr,
    T, N, scale,
    tile_rows: tl.constexpr, tile_cols: tl.constexpr, alignment: tl.constexpr, window_start, offset_range,
    a_row, a_col, hb, c_row, c_col, hd,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    index, sign, offs_t, offs_n, mask = _row_slots(
        ids_ptr, T, N, tile_rows, tile_cols, alignment, window_start, offset_range, a_row, a_col, hb, c_row, c_col,
        hd, BLOCK_T, BLOCK_N)
    g = tl.load(grad_out_ptr + offs_t[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.atomic_add(grad_mem_ptr + index, tl.where(sign > 0, g, -g) * scale, mask=mask)


def check_ids(ids: torch.Tensor, mapping: TileHash) -> torch.Tensor:
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"embedding ids must be int32 or int64, got {ids.dtype}")
    flat = ids.reshape(-1).contiguous()
    # an id outside the table would read outside the memory: refuse it like nn.Embedding does
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= mapping.rows):
        raise IndexError(
            f"embedding ids must lie in [0, {mapping.rows}), got range [{int(flat.min())}, {int(flat.max())}]"
        )
    return flat


def gather_rows(memory: torch.Tensor, mapping: TileHash, scale: float, ids: torch.Tensor,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows ``ids`` of the view, shape ids.shape + (cols,), in ``dtype`` (default memory's)."""
    flat = check_ids(ids, mapping)
    T, N = flat.numel(), mapping.cols
    out = torch.empty((T, N), device=memory.device, dtype=dtype or memory.dtype)
    if T:
        grid = (triton.cdiv(T, BLOCK_T), triton.cdiv(N, BLOCK_N))
        launched = _gather_rows_kernel[grid](
            flat, memory.reshape(-1), out, T, N, float(scale), *hash_args(mapping),
            BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N,
        )
        maybe_dump(_gather_rows_kernel, launched)
    return out.reshape(*ids.shape, N)


def scatter_rows_grad(grad_out: torch.Tensor, memory_size: int, mapping: TileHash, scale: float,
                      ids: torch.Tensor, deterministic: bool | None = None) -> torch.Tensor:
    """The fp32 gradient of the memory for ``gather_rows``: each element's signed, scaled
    gradient summed into its slot. ``deterministic`` (default: torch's setting) uses a
    sorted index_put_ in torch instead of atomic adds."""
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    flat = check_ids(ids, mapping)
    T, N = flat.numel(), mapping.cols
    grad_rows = grad_out.reshape(T, N)
    grad = torch.zeros(memory_size, device=grad_out.device, dtype=torch.float32)
    if T == 0:
        return grad
    if deterministic:
        k = flat.to(torch.int64)[:, None]
        n = torch.arange(N, device=grad.device, dtype=torch.int64)[None, :]
        index, sign = mapping.index_and_sign(k, n)
        grad.index_put_((index.reshape(-1),), (grad_rows.float() * sign * float(scale)).reshape(-1), accumulate=True)
        return grad
    grid = (triton.cdiv(T, BLOCK_T), triton.cdiv(N, BLOCK_N))
    launched = _scatter_rows_kernel[grid](
        flat, grad_rows.contiguous(), grad, T, N, float(scale), *hash_args(mapping),
        BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N,
    )
    maybe_dump(_scatter_rows_kernel, launched)
    return grad
