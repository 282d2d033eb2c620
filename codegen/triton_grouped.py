"""One launch for a grouped GEMM over a grouped site (a mixture of experts' stacked weights): roast_grouped_mm.

x's rows are sorted by group (expert); ``ends`` holds each group's cumulative end (torch's ``offs``). Group g
multiplies by its column window of the site's (K, groups * width) view, which is itself a mapping
(codegen.ops.column_windows): the site's, with b and d shifted by a_col * (g * width / tile_cols) and
c_col * g * width (mod P). Each program computes its group's two constants, so one launch serves every group,
and nothing is read on the host (no device sync, as in torch's grouped GEMM).

- `_roast_grouped_matmul_kernel`: forward ``x_g @ B_g`` (VIEW_IS_B) and dX ``dY_g @ B_g^T`` (or the other way
  round for a view read transposed). Programs along axis 0 are the groups' row blocks one group after
  another (a group of r rows has cdiv(r, BLOCK_M)); a program finds its group among the cumulative block
  counts (computed in torch, on the device) with one vector compare. The grid's axis 0 has cdiv(S, BLOCK_M) +
  groups programs, a bound on the blocks there can be; those past the last block do nothing. Axis 1: column
  blocks. The main loop is `roast_matmul_block`'s, over the group's window.
- `_roast_grouped_grad_memory_kernel`: dMemory by atomic adds (with the per-program sums of squares that
  ``grad_scaling="site"`` needs). Program (k block, g * column blocks + column block) reduces dV_g = a_g^T c_g
  over its group's rows only. The deterministic mode runs one `roast_grad_memory` per group instead
  (codegen/ops.py).
"""
from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl

from . import configs
from .hashing import TileHash
from .triton_hashing import _addmod_p, _mulmod_p, block_split, hash_args, maybe_dump
from .triton_matmul import (_check_kernel_dtype, choose_config, dot_in_fp32, dot_precision, even_flags,
                            grad_memory_block, grad_memory_store, launch_gemm, roast_matmul_block)


@triton.jit
def group_of(pid, block_ends_ptr, G, BLOCK_G: tl.constexpr):
    """The group whose row blocks include block ``pid``: how many groups end at or before it (G: none)."""
    offs = tl.arange(0, BLOCK_G)
    ends = tl.load(block_ends_ptr + offs, mask=offs < G, other=2147483647)
    return tl.sum((ends <= pid).to(tl.int32), axis=0)


@triton.jit
def group_rows(g, ends_ptr):
    """(first row, end row) of group g: ends[g - 1] (0 for the first) and ends[g]."""
    lo = tl.where(g > 0, tl.load(ends_ptr + tl.maximum(g - 1, 0)), 0)
    return lo, tl.load(ends_ptr + g)


@triton.jit
def window_constants(g, width, tile_cols: tl.constexpr, a_col, hb, c_col, hd):
    """(b, d) of group g's column window: b + a_col * (g * width / tile_cols) and d + c_col * g * width, mod P
    (width a multiple of tile_cols), as int32 like the mapping's own."""
    hb_g = _addmod_p(_mulmod_p(a_col, g * (width // tile_cols)), hb)
    hd_g = _addmod_p(_mulmod_p(c_col, g * width), hd)
    return hb_g.to(tl.int32), hd_g.to(tl.int32)


@triton.jit
def _roast_grouped_matmul_kernel(
    a_ptr, mem_ptr, out_ptr, ends_ptr, block_ends_ptr, G, width,
    N, R, stride_am, stride_ar, stride_om, stride_on, scale,
    tile_rows: tl.constexpr, tile_cols: tl.constexpr, alignment: tl.constexpr, window_start, offset_range,
    a_row, a_col, hb, c_row, c_col, hd,
    VIEW_IS_B: tl.constexpr, PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_SPLIT: tl.constexpr, EVEN_R: tl.constexpr, EVEN_N: tl.constexpr,
):
    pid = tl.program_id(0)
    g = group_of(pid, block_ends_ptr, G, BLOCK_G)
    if g < G:  # one body, no early return: programs past the last block skip it
        first_block = tl.where(g > 0, tl.load(block_ends_ptr + tl.maximum(g - 1, 0)), 0)
        row_lo, row_hi = group_rows(g, ends_ptr)
        hb_g, hd_g = window_constants(g, width, tile_cols, a_col, hb, c_col, hd)
        acc, offs_m, offs_n = roast_matmul_block(
            a_ptr, mem_ptr, row_hi, N, R, stride_am, stride_ar,
            tile_rows, tile_cols, alignment, window_start, offset_range, a_row, a_col, hb_g, c_row, c_col, hd_g,
            VIEW_IS_B, PRECISION, DOT_IN_FP32, BLOCK_M, BLOCK_N, BLOCK_R, 8, BLOCK_SPLIT, 0, None, EVEN_R, EVEN_N,
            row_lo + (pid - first_block) * BLOCK_M, tl.program_id(1))
        mask = (offs_m < row_hi)[:, None] & (offs_n < N)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
                 (acc * scale).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _roast_grouped_grad_memory_kernel(
    a_ptr, c_ptr, grad_ptr, sumsq_ptr, ends_ptr, width, K, N, n_blocks,
    stride_am, stride_ak, stride_cm, stride_cn, scale,
    tile_rows: tl.constexpr, tile_cols: tl.constexpr, alignment: tl.constexpr, window_start, offset_range,
    a_row, a_col, hb, c_row, c_col, hd,
    SUMSQ: tl.constexpr, PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_SPLIT: tl.constexpr,
):
    pid_k = tl.program_id(0)
    g = tl.program_id(1) // n_blocks
    pid_n = tl.program_id(1) % n_blocks
    row_lo, row_hi = group_rows(g, ends_ptr)
    hb_g, hd_g = window_constants(g, width, tile_cols, a_col, hb, c_col, hd)
    offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_k = offs_k < K
    mask_n = offs_n < N
    acc = grad_memory_block(a_ptr, c_ptr, offs_k, offs_n, mask_k, mask_n, row_lo, row_hi, stride_am, stride_ak,
                            stride_cm, stride_cn, PRECISION, DOT_IN_FP32, BLOCK_K, BLOCK_N, BLOCK_M)
    grad_memory_store(acc, offs_k, offs_n, mask_k, mask_n, 0, N, grad_ptr, grad_ptr, sumsq_ptr, scale,
                      tile_rows, tile_cols, alignment, window_start, offset_range, a_row, a_col, hb_g, c_row, c_col,
                      hd_g, False, SUMSQ, False, BLOCK_K, BLOCK_SPLIT)


def check_grouped(mapping: TileHash, groups: int) -> int:
    """The width of one group's window, or a ValueError when the view's columns do not split into ``groups``
    windows of whole hash tiles."""
    if groups < 1 or mapping.cols % groups:
        raise ValueError(f"a grouped view of {mapping.cols} columns does not split into {groups} groups")
    width = mapping.cols // groups
    if width % mapping.tile_cols:
        raise ValueError(f"groups of {width} columns split the hash tiles ({mapping.tile_cols} columns): the "
                         "fused grouped kernels need each group's columns to be whole tiles")
    return width


def _ends(offs: torch.Tensor, rows: int, device) -> torch.Tensor:
    """The groups' cumulative ends as int64 on the kernels' device, capped at the rows there are."""
    return offs.to(device=device, dtype=torch.int64).clamp(0, rows)


def roast_grouped_matmul(a: torch.Tensor, memory: torch.Tensor, offs: torch.Tensor, mapping: TileHash, groups: int,
                         scale: float, view_is_b: bool, config: configs.BlockConfig | None = None) -> torch.Tensor:
    """``a_g @ op(V_g)`` for each group g's rows of the 2-D ``a`` (sorted by group; ``offs`` their cumulative
    ends), V_g group g's column window of the (K, groups * width) view, op(V) = V if view_is_b else V^T; rows
    past offs[-1] come out 0. One launch."""
    width = check_grouped(mapping, groups)
    if a.dim() != 2:
        raise ValueError(f"roast_grouped_matmul takes a 2-D input, got shape {tuple(a.shape)}")
    _check_kernel_dtype("input", a)
    _check_kernel_dtype("memory", memory)
    window = replace(mapping, cols=width)  # group 0's; the kernel shifts b and d per group
    R, N = (mapping.rows, width) if view_is_b else (width, mapping.rows)
    if a.shape[1] != R:
        raise ValueError(f"input has {a.shape[1]} features, a group's view needs {R}")
    S = a.shape[0]
    out = torch.zeros((S, N), device=a.device, dtype=a.dtype)
    if S == 0 or N == 0:
        return out
    ends = _ends(offs, S, a.device)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    rows = (ends - starts).clamp_min(0)

    def launch(cfg, out=out):
        block_ends = torch.cumsum((rows + cfg.block_m - 1) // cfg.block_m, 0).to(torch.int32)
        grid = (triton.cdiv(S, cfg.block_m) + groups, triton.cdiv(N, cfg.block_n))
        return _roast_grouped_matmul_kernel, _roast_grouped_matmul_kernel[grid](
            a, memory.reshape(-1), out, ends, block_ends, groups, width,
            N, R, a.stride(0), a.stride(1), out.stride(0), out.stride(1), float(scale), *hash_args(window),
            VIEW_IS_B=view_is_b, PRECISION=dot_precision(a.dtype), DOT_IN_FP32=dot_in_fp32(a.dtype),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_k, BLOCK_G=triton.next_power_of_2(groups),
            BLOCK_SPLIT=block_split(window, view_is_b, cfg.block_k), **even_flags(N, R, cfg),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    per_group = max(1, S // groups)  # the config as for one group's GEMM of average rows
    kernel, launched = launch_gemm("roast_grouped_matmul", a, memory, config, launch, lambda: choose_config(
        "roast_grouped_matmul", a, per_group, N, R, window, view_is_b, launch, lambda: (torch.empty_like(out),),
        memory))
    maybe_dump(kernel, launched)
    return out


def roast_grouped_grad_memory(a: torch.Tensor, c: torch.Tensor, offs: torch.Tensor, memory_size: int,
                              mapping: TileHash, groups: int, scale: float, sumsq: bool = False,
                              config: configs.BlockConfig | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the fp32 memory gradient, the float64 sum of dV's squares or None) for dV_g = a_g^T @ c_g, group g's
    window of the view, a (S, K) and c (S, width) sorted by group. Atomic adds, one launch."""
    width = check_grouped(mapping, groups)
    if a.dim() != 2 or c.dim() != 2 or a.shape[0] != c.shape[0] or (a.shape[1], c.shape[1]) != (mapping.rows,
                                                                                                 width):
        raise ValueError(f"roast_grouped_grad_memory takes (S, {mapping.rows}) and (S, {width}), got "
                         f"{tuple(a.shape)} and {tuple(c.shape)}")
    _check_kernel_dtype("a", a)
    _check_kernel_dtype("c", c)
    window = replace(mapping, cols=width)
    K, S = mapping.rows, a.shape[0]
    grad = torch.zeros(memory_size, device=a.device, dtype=torch.float32)
    if S == 0:
        return grad, grad.new_zeros((), dtype=torch.float64) if sumsq else None
    ends = _ends(offs, S, a.device)
    partial = []

    def launch(cfg):
        grad.zero_()
        n_blocks = triton.cdiv(width, cfg.block_n)
        grid = (triton.cdiv(K, cfg.block_m), groups * n_blocks)
        part = torch.zeros(grid[0] * grid[1], device=a.device, dtype=torch.float64) if sumsq else grad
        partial[:] = [part]
        launched = _roast_grouped_grad_memory_kernel[grid](
            a, c, grad, part, ends, width, K, width, n_blocks,
            a.stride(0), a.stride(1), c.stride(0), c.stride(1), float(scale), *hash_args(window),
            SUMSQ=sumsq, PRECISION=dot_precision(a.dtype), DOT_IN_FP32=dot_in_fp32(a.dtype),
            BLOCK_K=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_k,
            BLOCK_SPLIT=block_split(window, True, cfg.block_m, 0),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        maybe_dump(_roast_grouped_grad_memory_kernel, launched)

    name = "roast_grouped_grad_memory" + ("[sumsq]" if sumsq else "")

    def rechoose():
        return configs.choose(a.device, K, width, max(1, S // groups), a.element_size(), kernel=name,
                              block_tile=(window.tile_rows, window.tile_cols, 0), dtype=a.dtype,
                              fma=dot_precision(a.dtype) == "ieee")

    configs.run_fitting(launch, config or rechoose(), rechoose, configs.refused_key(a.device, name, a.dtype),
                        explicit=config is not None)
    return grad, partial[0].sum() if sumsq else None
