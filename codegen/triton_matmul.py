"""Fused ROAST GEMMs: the weight is read straight from the memory, never materialized.

Two kernels serve forward and backward of ``y = epilogue(x @ B)``:

- `roast_matmul_block` is the GEMM main loop every forward kernel shares: this one's
  fixed epilogue and the kernels generated per epilogue pattern (triton_epilogue.py).
- `_roast_matmul_kernel` computes ``a @ op(V)`` where V is a site's (rows, cols) view
  and op is identity or transpose. Forward of a view that is B (nn.Linear with a
  transposed view) reads V as is; dX = dY @ B^T reads the same slots transposed.
- `_roast_grad_memory_kernel` computes dV = a^T @ c block by block and sends each
  element's signed, scaled gradient to its slot, by atomic add or, for a
  deterministic result, by writing the contributions for a sorted reduction in torch.
  With SUMSQ each program also writes its block's sum of dV^2 (fp64), which
  ``grad_scaling="site"`` divides the memory gradient by (as an RMS; codegen/grad_norm.py).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import configs
from .hashing import TileHash
from .triton_hashing import (advance_bases, block_split, hash_args, maybe_dump, offset_magic, reduction_bases,
                             roast_index_and_sign, signed, view_block_slots, view_free_terms, view_red_terms)

ACTIVATIONS = {None: 0, "none": 0, "relu": 1, "gelu_tanh": 2, "silu": 3}


def apply_activation(z: torch.Tensor, activation: str | None) -> torch.Tensor:
    """The epilogue activations in plain torch (the kernels compute the same functions)."""
    if activation in (None, "none"):
        return z
    if activation == "relu":
        return torch.nn.functional.relu(z)
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(z, approximate="tanh")
    if activation == "silu":
        return torch.nn.functional.silu(z)
    raise ValueError(f"activation {activation!r} is not one of {sorted(k for k in ACTIVATIONS if k)} or None")


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DETERMINISTIC_CHUNK_ELEMENTS = 1 << 24  # view elements per deterministic reduction (fp32 + int64 each)


@triton.jit
def _apply_activation(z, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        z = tl.maximum(z, 0.0)
    elif ACTIVATION == 2:
        # tanh(u) = 1 - 2 / (exp(2u) + 1), no libdevice needed; |u| > 15 is +-1 in fp32 already
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        u = tl.minimum(tl.maximum(u, -15.0), 15.0)
        z = 0.5 * z * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))
    elif ACTIVATION == 3:
        z = z / (1.0 + tl.exp(tl.minimum(-z, 80.0)))
    return z


@triton.jit
def grouped_program(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of this program, in grouped order: neighbouring programs share rows of
    the A operand, which stay in L2."""
    return grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of the pid-th of the cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N) tiles, grouped."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % group_size), (pid % (GROUP_M * num_n)) // group_size


@triton.jit
def signed_values(mem_ptr, index, neg, mask):
    """The memory at ``index`` (0 where not ``mask``), its sign flipped where ``neg`` (a sign mask): in the
    memory's dtype when that is a 16-bit float (the flip is exact in any dtype), else in fp32."""
    raw = tl.load(mem_ptr + index, mask=mask, other=0.0)
    if raw.dtype.primitive_bitwidth == 16:
        w = (raw.to(tl.int16, bitcast=True) ^ (neg >> 16).to(tl.int16)).to(raw.dtype, bitcast=True)
    else:
        w = signed(raw.to(tl.float32), neg)
    return w


@triton.jit
def roast_view_values(mem_ptr, k, n, mask,
                      tile_rows, tile_cols, alignment, window_start, offset_range, a_row, a_col, hb, c_row, c_col, hd,
                      omagic=None):
    """Elements (k, n) of a site's view, signed, in fp32, read from the memory at their hashed slots; k and n
    are index tensors that broadcast against each other and ``mask`` (masked elements read 0). Each element
    is hashed on its own: for reads that are no GEMM B block (`roast_b_tile` is the fast form)."""
    index, sign = roast_index_and_sign(k, n, tile_rows, tile_cols, alignment, window_start, offset_range,
                                       a_row, a_col, hb, c_row, c_col, hd, omagic)
    w = tl.load(mem_ptr + index, mask=mask, other=0.0).to(tl.float32)
    return tl.where(sign > 0, w, -w)


@triton.jit
def roast_b_tile(mem_ptr, r0, offs_t, offs_n, mask_r, mask_n, hterm, intile, sterm, ct,
                 tile_rows: tl.constexpr, tile_cols: tl.constexpr, alignment: tl.constexpr, window_start,
                 offset_range, a_row, a_col, hb, c_row, c_col, hd,
                 VIEW_IS_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_SPLIT: tl.constexpr, sbase=None, hbase=None,
                 omagic=None):
    """The (BLOCK_R, len(offs_n)) B block of a GEMM at reduction rows r0 + offs_t, signed, read from the
    memory at its hashed slots (`signed_values`): element (r, n) of the B operand is element (r, n) of the
    view, or (n, r) of it. (hterm, intile, sterm) are `view_free_terms` of offs_n and ct the
    `view_red_terms`, computed once per program; BLOCK_SPLIT is `block_split`'s."""
    index, neg = view_block_slots(r0, offs_t, offs_n, hterm, intile, sterm, ct, VIEW_IS_B, BLOCK_R, BLOCK_SPLIT,
                                  tile_rows, tile_cols, alignment, window_start, offset_range,
                                  a_row, a_col, hb, c_row, c_col, hd, sbase, hbase, omagic)
    return signed_values(mem_ptr, index, neg, mask_r[:, None] & mask_n[None, :])


@triton.jit
def accumulate_dot(acc, a, w, PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """acc + a @ w, w (the signed fp32 B tile) rounded to a's dtype first, as a dense weight in that dtype
    would be; in fp32 where the interpreter's 16-bit dot cannot be trusted (DOT_IN_FP32)."""
    w = w.to(a.dtype)
    if DOT_IN_FP32:
        a = a.to(tl.float32)
        w = w.to(tl.float32)
    return tl.dot(a, w, acc, input_precision=PRECISION)


@triton.jit
def roast_matmul_block(
    a_ptr, mem_ptr, M, N, R, stride_am, stride_ar,
    tile_rows: tl.constexpr, tile_cols: tl.constexpr, alignment: tl.constexpr, window_start, offset_range,
    a_row, a_col, hb, c_row, c_col, hd,
    VIEW_IS_B: tl.constexpr, PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_SPLIT: tl.constexpr, r_lo=0, r_hi=None, EVEN_R: tl.constexpr = False, EVEN_N: tl.constexpr = False,
    m_lo=None, pid_n=None,
):
    """This program's (BLOCK_M, BLOCK_N) block of ``a @ op(V)`` in fp32, with its row and column offsets;
    over the reduction's rows [r_lo, r_hi) (default all R; r_lo a multiple of BLOCK_R, r_hi <= R or rows from R
    on read 0). EVEN_R: R is a multiple of BLOCK_R (so, with r_hi <= R, is every block); EVEN_N: N is a
    multiple of BLOCK_N. Each drops a mask from the main loop's loads (`even_flags`). ``m_lo`` and ``pid_n``
    given (a grouped GEMM's program, triton_grouped.py): the block's rows are m_lo + [0, BLOCK_M) below M and
    its column block pid_n, instead of this program's place in the grouped order.

    Every fused GEMM (the fixed epilogue below, the generated ones in triton_epilogue.py, the split-K
    kernel, the grouped GEMM) runs this main loop and differs only in what it does with the block afterwards.
    """
    if m_lo is None:
        pid_m, pid_n = grouped_program(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    else:
        offs_m = m_lo.to(tl.int64) + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if EVEN_N:
        mask_n = tl.full((BLOCK_N,), True, tl.int1)

    # the mapping's terms that stay fixed along the reduction, once per program
    offs_t = tl.arange(0, BLOCK_R)
    hterm, intile, sterm = view_free_terms(offs_n, VIEW_IS_B, tile_rows, tile_cols, a_row, a_col, hb, c_row, c_col,
                                           hd)
    ct = view_red_terms(offs_t, VIEW_IS_B, c_row, c_col)

    if r_hi is None:
        r_hi = R
    # the reduction's terms of the first block, and what each block adds to them
    sbase, hbase = reduction_bases(r_lo, VIEW_IS_B, tile_rows, tile_cols, a_row, a_col, c_row, c_col)
    sstep, hstep = reduction_bases(BLOCK_R, VIEW_IS_B, tile_rows, tile_cols, a_row, a_col, c_row, c_col)
    omagic = offset_magic(offset_range)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        offs_r = r0 + offs_t
        mask_r = offs_r < R
        if EVEN_R:
            mask_r = tl.full((BLOCK_R,), True, tl.int1)
        a = tl.load(
            a_ptr + offs_m[:, None] * stride_am + offs_r[None, :] * stride_ar,
            mask=mask_m[:, None] & mask_r[None, :], other=0.0,
        )
        w = roast_b_tile(mem_ptr, r0, offs_t, offs_n, mask_r, mask_n, hterm, intile, sterm, ct,
                         tile_rows, tile_cols, alignment, window_start, offset_range, a_row, a_col, hb, c_row, c_col,
                         hd, VIEW_IS_B, BLOCK_R, BLOCK_SPLIT, sbase, hbase if BLOCK_SPLIT > 0 else None, omagic)
        acc = accumulate_dot(acc, a, w, PRECISION, DOT_IN_FP32)
        sbase, hbase = advance_bases(sbase, hbase, sstep, hstep)
    return acc, offs_m, offs_n


@triton.jit
def _roast_matmul_kernel(
    a_ptr, mem_ptr, out_ptr, pre_ptr, bias_ptr, res_ptr,
    M, N, R,
    stride_am, stride_ar, stride_om, stride_on, stride_resm, stride_resn,
    scale,
    tile_rows: tl.constexpr, tile_cols: tl.constexpr, alignment: tl.constexpr, window_start, offset_range,
    a_row, a_col, hb, c_row, c_col, hd,
    VIEW_IS_B: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, STORE_PRE: tl.constexpr, PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_SPLIT: tl.constexpr, EVEN_R: tl.constexpr, EVEN_N: tl.constexpr,
):
    acc, offs_m, offs_n = roast_matmul_block(
        a_ptr, mem_ptr, M, N, R, stride_am, stride_ar,
        tile_rows, tile_cols, alignment, window_start, offset_range, a_row, a_col, hb, c_row, c_col, hd,
        VIEW_IS_B, PRECISION, DOT_IN_FP32, BLOCK_M, BLOCK_N, BLOCK_R, GROUP_M, BLOCK_SPLIT,
        EVEN_R=EVEN_R, EVEN_N=EVEN_N)
    mask_m = offs_m < M
    mask_n = offs_n < N

    # epilogue: scale, bias, activation, residual, all in fp32
    acc = acc * scale
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask_out = mask_m[:, None] & mask_n[None, :]
    out_offsets = offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    if STORE_PRE:
        tl.store(pre_ptr + out_offsets, acc.to(pre_ptr.dtype.element_ty), mask=mask_out)
    acc = _apply_activation(acc, ACTIVATION)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + offs_m[:, None] * stride_resm + offs_n[None, :] * stride_resn, mask=mask_out, other=0.0)
        acc += res.to(tl.float32)
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=mask_out)


@triton.jit
def _roast_matmul_split_kernel(
    a_ptr, mem_ptr, part_ptr,
    M, N, R, r_split,
    stride_am, stride_ar,
    scale,
    tile_rows: tl.constexpr, tile_cols: tl.constexpr, alignment: tl.constexpr, window_start, offset_range,
    a_row, a_col, hb, c_row, c_col, hd,
    VIEW_IS_B: tl.constexpr, PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_SPLIT: tl.constexpr, EVEN_R: tl.constexpr, EVEN_N: tl.constexpr,
):
    """Split-K: program (tile, s) computes its output block over the reduction rows [s * r_split, (s + 1) *
    r_split) and stores it, scaled, to partial s ((splits, M, N), fp32); the partials are summed after."""
    split = tl.program_id(1)
    r_lo = split * r_split
    acc, offs_m, offs_n = roast_matmul_block(
        a_ptr, mem_ptr, M, N, R, stride_am, stride_ar,
        tile_rows, tile_cols, alignment, window_start, offset_range, a_row, a_col, hb, c_row, c_col, hd,
        VIEW_IS_B, PRECISION, DOT_IN_FP32, BLOCK_M, BLOCK_N, BLOCK_R, GROUP_M, BLOCK_SPLIT, r_lo,
        tl.minimum(r_lo + r_split, R), EVEN_R, EVEN_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(part_ptr + (split * M + offs_m)[:, None] * N + offs_n[None, :], acc * scale, mask=mask)


@triton.jit
def grad_memory_store(acc, offs_k, offs_n, mask_k, mask_n, k_start, N, grad_ptr, contrib_ptr, sumsq_ptr, scale,
                      tile_rows: tl.constexpr, tile_cols: tl.constexpr, alignment: tl.constexpr, window_start,
                      offset_range, a_row, a_col, hb, c_row, c_col, hd,
                      DETERMINISTIC: tl.constexpr, SUMSQ: tl.constexpr, VIEW_TRANSPOSED: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_SPLIT: tl.constexpr):
    """Send a program's (BLOCK_K, BLOCK_N) block ``acc`` of dV (view rows offs_k, columns offs_n; with
    VIEW_TRANSPOSED, the view's columns and rows) to the memory: signed and scaled, by atomic add into
    ``grad_ptr`` at each element's slot, or (DETERMINISTIC) written to ``contrib_ptr`` (rows from k_start,
    N wide) for a sorted reduction in torch. With SUMSQ the program also writes its block's sum of dV^2 in
    fp64 to ``sumsq_ptr`` (one per program). The slots: as a GEMM's B block whose reduction rows are offs_k
    (`view_block_slots`, ``BLOCK_SPLIT`` from `block_split`), offs_k starting at a multiple of BLOCK_K."""
    if BLOCK_SPLIT >= 0:
        offs_t = tl.arange(0, BLOCK_K)
        hterm, intile, sterm = view_free_terms(offs_n, not VIEW_TRANSPOSED, tile_rows, tile_cols, a_row, a_col,
                                               hb, c_row, c_col, hd)
        ct = view_red_terms(offs_t, not VIEW_TRANSPOSED, c_row, c_col)
        r0 = k_start + tl.program_id(0) * BLOCK_K
        index, neg = view_block_slots(r0, offs_t, offs_n, hterm, intile, sterm, ct, not VIEW_TRANSPOSED, BLOCK_K,
                                      BLOCK_SPLIT, tile_rows, tile_cols, alignment, window_start, offset_range,
                                      a_row, a_col, hb, c_row, c_col, hd)  # a few tile starts: divisions
        grad = signed(acc, neg) * scale
    else:
        if VIEW_TRANSPOSED:
            index, sign = roast_index_and_sign(
                offs_n[None, :], offs_k[:, None], tile_rows, tile_cols, alignment, window_start,
                offset_range, a_row, a_col, hb, c_row, c_col, hd)
        else:
            index, sign = roast_index_and_sign(
                offs_k[:, None], offs_n[None, :], tile_rows, tile_cols, alignment, window_start,
                offset_range, a_row, a_col, hb, c_row, c_col, hd)
        grad = tl.where(sign > 0, acc, -acc) * scale
    mask = mask_k[:, None] & mask_n[None, :]
    if SUMSQ:
        # one partial per program, summed in torch: deterministic, and fp64 squares of fp32 never overflow
        dv = tl.where(mask, acc, 0.0).to(tl.float64)
        tl.store(sumsq_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1),
                 tl.sum(tl.sum(dv * dv, axis=1), axis=0))
    if DETERMINISTIC:
        tl.store(contrib_ptr + (offs_k - k_start)[:, None] * N + offs_n[None, :], grad, mask=mask)
    else:
        tl.atomic_add(grad_ptr + index, grad, mask=mask)


@triton.jit
def grad_memory_block(a_ptr, c_ptr, offs_k, offs_n, mask_k, mask_n, m_lo, m_hi,
                      stride_am, stride_ak, stride_cm, stride_cn,
                      PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """The fp32 (BLOCK_K, BLOCK_N) block of dV = a^T @ c at view rows offs_k and columns offs_n, reduced over
    the rows [m_lo, m_hi) of a and c (all M, or a grouped GEMM's group)."""
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = tl.cast(m0, tl.int64) + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_hi
        a_t = tl.load(
            a_ptr + offs_m[None, :] * stride_am + offs_k[:, None] * stride_ak,
            mask=mask_k[:, None] & mask_m[None, :], other=0.0,
        )
        c = tl.load(
            c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
            mask=mask_m[:, None] & mask_n[None, :], other=0.0,
        )
        c = c.to(a_t.dtype)
        if DOT_IN_FP32:
            a_t = a_t.to(tl.float32)
            c = c.to(tl.float32)
        acc = tl.dot(a_t, c, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _roast_grad_memory_kernel(
    a_ptr, c_ptr, grad_ptr, contrib_ptr, sumsq_ptr,
    M, k_start, k_end, N,
    stride_am, stride_ak, stride_cm, stride_cn,
    scale,
    tile_rows: tl.constexpr, tile_cols: tl.constexpr, alignment: tl.constexpr, window_start, offset_range,
    a_row, a_col, hb, c_row, c_col, hd,
    DETERMINISTIC: tl.constexpr, SUMSQ: tl.constexpr, PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_SPLIT: tl.constexpr,
):
    # one program owns a BLOCK_K x BLOCK_N block of view rows [k_start, k_end) and reduces over all M
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_k = (k_start + pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_k = offs_k < k_end
    mask_n = offs_n < N

    acc = grad_memory_block(a_ptr, c_ptr, offs_k, offs_n, mask_k, mask_n, 0, M, stride_am, stride_ak, stride_cm,
                            stride_cn, PRECISION, DOT_IN_FP32, BLOCK_K, BLOCK_N, BLOCK_M)
    grad_memory_store(acc, offs_k, offs_n, mask_k, mask_n, k_start, N, grad_ptr, contrib_ptr, sumsq_ptr, scale,
                      tile_rows, tile_cols, alignment, window_start, offset_range, a_row, a_col, hb, c_row, c_col,
                      hd, DETERMINISTIC, SUMSQ, False, BLOCK_K, BLOCK_SPLIT)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 GEMMs follow torch's matmul precision setting, as F.linear does."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """The interpreter's bf16 tl.dot returns garbage; bf16 products are exact in fp32, so
    upcasting there computes what a GPU's bf16 dot with fp32 accumulation computes."""
    return dtype == torch.bfloat16 and configs.interpreting()


def _check_kernel_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; the ROAST kernels take {', '.join(map(str, KERNEL_DTYPES))}")


def block_tile(mapping: TileHash, view_is_b: bool) -> tuple[int, int, int]:
    """The hash tile along a GEMM's (block_m, block_n, block_k) axes: B's rows are the view's
    rows when view_is_b, its columns otherwise."""
    return (0, mapping.tile_cols, mapping.tile_rows) if view_is_b else (0, mapping.tile_rows, mapping.tile_cols)


def benchmark(launch, scratch):
    """``bench(config) -> ms`` for configs.choose: triton's do_bench of ``launch(config, *buffers)``.

    ``buffers = scratch()`` is allocated once, at the first timing, so the timed loop neither
    allocates nor writes the real outputs.
    """
    import triton.testing

    buffers = []

    def bench(cfg):
        if not buffers:
            buffers.append(scratch())
        return triton.testing.do_bench(lambda: launch(cfg, *buffers[0]))

    return bench


def choose_config(kernel: str, a: torch.Tensor, M: int, N: int, R: int, mapping: TileHash | None, view_is_b: bool,
                  launch, scratch, memory: torch.Tensor, conv: bool = False) -> configs.BlockConfig:
    """configs.choose for an (M x R) @ (R x N) launch whose B tiles come from ``memory`` (``conv``: a conv
    kernel's); see `benchmark` for ``launch`` and ``scratch``. ``mapping`` None: no block shape holds whole
    hash tiles, none is preferred."""
    return configs.choose(a.device, M, N, R, a.element_size(), kernel=kernel, bench=benchmark(launch, scratch),
                          block_tile=block_tile(mapping, view_is_b) if mapping is not None else None,
                          dtype=_dtypes(a, memory), b_element_size=memory.element_size(),
                          fma=dot_precision(a.dtype) == "ieee", conv=conv)


def _dtypes(a: torch.Tensor, memory: torch.Tensor) -> str:
    return f"{a.dtype}/{memory.dtype}"


def launch_gemm(kernel: str, a: torch.Tensor, memory: torch.Tensor, config, launch, rechoose):
    """Launch with ``config`` if given, else the chosen config, falling back past configs the device
    refuses for resources (configs.run_fitting)."""
    cfg = config or rechoose()
    key = configs.refused_key(a.device, kernel, _dtypes(a, memory))
    return configs.run_fitting(launch, cfg, rechoose, key, explicit=config is not None)


def roast_matmul(
    a: torch.Tensor,
    memory: torch.Tensor,
    mapping: TileHash,
    scale: float,
    view_is_b: bool,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    store_pre: bool = False,
    config: configs.BlockConfig | None = None,
    split_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``epilogue(a @ op(V))`` for a 2-D ``a``; op(V) = V if view_is_b else V^T.

    Returns (out, pre-activation or None); out has a's dtype. ``split_k``: how many programs share the
    reduction of each output block (`split_reduction`; default: chosen from the shape and the device).
    """
    if a.dim() != 2:
        raise ValueError(f"roast_matmul takes a 2-D input, got shape {tuple(a.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {sorted(k for k in ACTIVATIONS if k)} or None")
    _check_kernel_dtype("input", a)
    _check_kernel_dtype("memory", memory)
    reduce_dim, out_dim = (mapping.rows, mapping.cols) if view_is_b else (mapping.cols, mapping.rows)
    if a.shape[1] != reduce_dim:
        raise ValueError(
            f"input has {a.shape[1]} features but the site's view is {mapping.rows}x{mapping.cols} "
            f"({'rows' if view_is_b else 'cols'} = {reduce_dim} expected)"
        )
    M, R, N = a.shape[0], reduce_dim, out_dim
    out = torch.empty((M, N), device=a.device, dtype=a.dtype)
    pre = torch.empty_like(out) if store_pre else None
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({N},)")
    if residual is not None and residual.shape != (M, N):
        raise ValueError(f"residual has shape {tuple(residual.shape)}, expected ({M}, {N})")
    if M == 0 or N == 0:
        return out, pre
    res = residual if residual is not None else out

    def launch_split(cfg, splits, r_split, out, pre):
        # the epilogue as the fused kernel's, in fp32, on the summed partial products
        z, launched = split_matmul(a, memory, mapping, scale, view_is_b, N, cfg, splits, r_split)
        if bias is not None:
            z = z + bias.float()
        if pre is not None:
            pre.copy_(z)
        z = apply_activation(z, activation)
        if residual is not None:
            z = z + residual.float()
        out.copy_(z)
        return _roast_matmul_split_kernel, launched

    def launch(cfg, out=out, pre=pre):
        splits, r_split = split_reduction(M, N, R, cfg, a.device, split_k)
        if splits > 1:
            return launch_split(cfg, splits, r_split, out, pre)
        grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
        return _roast_matmul_kernel, _roast_matmul_kernel[grid](
            a, memory.reshape(-1), out, pre if pre is not None else out,
            bias if bias is not None else out, res,
            M, N, R,
            a.stride(0), a.stride(1), out.stride(0), out.stride(1), res.stride(0), res.stride(1),
            float(scale), *hash_args(mapping),
            VIEW_IS_B=view_is_b, HAS_BIAS=bias is not None, ACTIVATION=ACTIVATIONS[activation],
            HAS_RESIDUAL=residual is not None, STORE_PRE=store_pre, PRECISION=dot_precision(a.dtype),
            DOT_IN_FP32=dot_in_fp32(a.dtype), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_k,
            GROUP_M=8, BLOCK_SPLIT=block_split(mapping, view_is_b, cfg.block_k), **even_flags(N, R, cfg),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    kernel, launched = launch_gemm("roast_matmul", a, memory, config, launch, lambda: choose_config(
        "roast_matmul", a, M, N, R, mapping, view_is_b, launch,
        lambda: (torch.empty_like(out), torch.empty_like(pre) if store_pre else None), memory))
    maybe_dump(kernel, launched)
    return out, pre


def split_matmul(a: torch.Tensor, memory: torch.Tensor, mapping: TileHash, scale: float, view_is_b: bool, N: int,
                 cfg: configs.BlockConfig, splits: int, r_split: int):
    """(``a @ op(V) * scale`` in fp32, the launch) by split-K: ``splits`` programs per output block, each over
    ``r_split`` rows of the reduction; their fp32 partial products summed in a fixed order (deterministic)."""
    M, R = a.shape
    part = torch.empty((splits, M, N), device=a.device, dtype=torch.float32)
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), splits)
    launched = _roast_matmul_split_kernel[grid](
        a, memory.reshape(-1), part, M, N, R, r_split, a.stride(0), a.stride(1), float(scale),
        *hash_args(mapping), VIEW_IS_B=view_is_b, PRECISION=dot_precision(a.dtype),
        DOT_IN_FP32=dot_in_fp32(a.dtype), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_k,
        GROUP_M=8, BLOCK_SPLIT=block_split(mapping, view_is_b, cfg.block_k), **even_flags(N, R, cfg),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return part.sum(0), launched


def even_flags(N: int, R: int, cfg: configs.BlockConfig) -> dict:
    """The EVEN_R / EVEN_N constexprs of `roast_matmul_block` for an (M x R) @ (R x N) launch at ``cfg``:
    whether every reduction block, and every column block, is whole (its loads need no mask on that axis)."""
    return dict(EVEN_R=R % cfg.block_k == 0, EVEN_N=N % cfg.block_n == 0)


def split_reduction(M: int, N: int, R: int, cfg: configs.BlockConfig, device, split_k: int | None = None
                    ) -> tuple[int, int]:
    """(splits, reduction rows per split) of an (M x R) @ (R x N) GEMM at ``cfg`` (split-K).

    ``split_k`` given (or ROASTFX_SPLIT_K set to a number): that many splits at most (1: none), each a
    whole number of BLOCK_R blocks. Else, on a GPU, split when the output gives fewer programs than the
    device has SMs (a decode step's 16 tokens): enough splits for two programs per SM, each keeping at
    least 4 blocks of the reduction. Under the interpreter or off CUDA: none."""
    blocks = triton.cdiv(R, cfg.block_k)
    env = os.environ.get("ROASTFX_SPLIT_K", "auto")
    if split_k is None and env != "auto":
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"ROASTFX_SPLIT_K={env!r}; accepted: auto, or a positive number of splits (1: none)")
        split_k = int(env)
    if split_k is None:
        split_k = 1
        if torch.device(device).type == "cuda" and not configs.interpreting():
            programs = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
            units = configs.multiprocessors(device)
            if programs < units:
                split_k = max(1, min(triton.cdiv(2 * units, programs), blocks // 4))
    elif isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 1:
        raise ValueError(f"split_k must be a positive int (1: no split), got {split_k!r}")
    per_split = triton.cdiv(blocks, min(split_k, blocks))
    return triton.cdiv(blocks, per_split), per_split * cfg.block_k


def roast_grad_memory(
    a: torch.Tensor,
    c: torch.Tensor,
    memory_size: int,
    mapping: TileHash,
    scale: float,
    deterministic: bool | None = None,
    config: configs.BlockConfig | None = None,
) -> torch.Tensor:
    """The fp32 gradient of the memory for dV = a^T @ c, V the site's (rows, cols) view.

    ``deterministic`` (default: torch.are_deterministic_algorithms_enabled()) replaces
    atomic adds by per-element contributions reduced with a deterministic index_put_.
    """
    return _grad_memory(a, c, memory_size, mapping, scale, deterministic, config, False)[0]


def roast_grad_memory_sumsq(
    a: torch.Tensor,
    c: torch.Tensor,
    memory_size: int,
    mapping: TileHash,
    scale: float,
    deterministic: bool | None = None,
    config: configs.BlockConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``roast_grad_memory`` and the sum of dV's squares (a float64 0-d tensor), from the same launch."""
    return _grad_memory(a, c, memory_size, mapping, scale, deterministic, config, True)


def _grad_memory(a, c, memory_size, mapping, scale, deterministic, config, sumsq):
    if a.dim() != 2 or c.dim() != 2 or a.shape[0] != c.shape[0]:
        raise ValueError(f"roast_grad_memory takes (M, rows) and (M, cols), got {tuple(a.shape)} and {tuple(c.shape)}")
    if (a.shape[1], c.shape[1]) != (mapping.rows, mapping.cols):
        raise ValueError(
            f"gradient operands give a {a.shape[1]}x{c.shape[1]} view, the mapping is {mapping.rows}x{mapping.cols}"
        )
    _check_kernel_dtype("a", a)
    _check_kernel_dtype("c", c)

    def launch(cfg, k_start, k_end, grad, contrib, partial, deterministic):
        grid = (triton.cdiv(k_end - k_start, cfg.block_m), triton.cdiv(mapping.cols, cfg.block_n))
        return _roast_grad_memory_kernel[grid](
            a, c, grad, contrib, partial if partial is not None else grad,
            a.shape[0], k_start, k_end, mapping.cols,
            a.stride(0), a.stride(1), c.stride(0), c.stride(1),
            float(scale), *hash_args(mapping),
            DETERMINISTIC=deterministic, SUMSQ=partial is not None, PRECISION=dot_precision(a.dtype),
            DOT_IN_FP32=dot_in_fp32(a.dtype),
            BLOCK_K=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_k,
            BLOCK_SPLIT=block_split(mapping, True, cfg.block_m, k_start),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    return run_grad_memory("roast_grad_memory", _roast_grad_memory_kernel, launch, a, a.shape[0], memory_size,
                           mapping, deterministic, config, sumsq)


def run_grad_memory(name: str, kernel, launch, a: torch.Tensor, M: int, memory_size: int, mapping: TileHash,
                    deterministic: bool | None, config, sumsq: bool,
                    conv: bool = False, transposed: bool = False,
                    column_programs=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Drive a weight-gradient kernel that reduces over ``M`` products of the A operand ``a`` into the
    (rows, cols) view of ``mapping``: the config, the chunks of view rows the deterministic path takes
    (contributions then a sorted index_put_), the per-program sums of squares. ``launch(cfg, k_start, k_end,
    grad, contrib, partial, deterministic)`` runs ``kernel`` over view rows [k_start, k_end) with programs
    (row block, column block) of (cfg.block_m, cfg.block_n) and the reduction in steps of cfg.block_k.
    ``conv``: a conv kernel (configs.CONV_CANDIDATES). ``transposed``: the kernel's rows are the view's columns
    and its columns the view's rows. ``column_programs(cfg)``: the launch's programs along axis 1 (default one
    per column block). Returns (the fp32 memory gradient, the float64 sum of dV's squares or
    None)."""
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    K, N = (mapping.cols, mapping.rows) if transposed else (mapping.rows, mapping.cols)
    tile = (mapping.tile_cols, mapping.tile_rows) if transposed else (mapping.tile_rows, mapping.tile_cols)
    grad = torch.zeros(memory_size, device=a.device, dtype=torch.float32)
    partials = []  # per launch: one sum of squares per program
    if M == 0:
        return grad, grad.new_zeros((), dtype=torch.float64) if sumsq else None

    def chunk_rows(cfg):
        # the deterministic path holds a contribution and an index per element: bound them by rows
        return K if not deterministic else max(1, DETERMINISTIC_CHUNK_ELEMENTS // (N * cfg.block_m)) * cfg.block_m

    def scratch():  # the largest first chunk any candidate (blocks <= 128 rows) takes
        rows = min(K, max(128, DETERMINISTIC_CHUNK_ELEMENTS // N)) if deterministic else 0
        return torch.zeros_like(grad), torch.empty((rows, N), device=a.device, dtype=torch.float32)

    def first_chunk(cfg, grad, contrib):  # what is timed: the first chunk, into buffers nobody reads
        rows = min(K, chunk_rows(cfg))
        return launch(cfg, 0, rows, grad, contrib[:rows] if deterministic else grad, None, deterministic)

    # the view's rows run along the kernel's block_m axis, its columns along block_n
    name = name + ("[deterministic]" if deterministic else "") + ("[sumsq]" if sumsq else "")

    def rechoose():
        return configs.choose(a.device, K, N, M, a.element_size(), kernel=name,
                              bench=benchmark(first_chunk, scratch), dtype=a.dtype,
                              block_tile=(*tile, 0), fma=dot_precision(a.dtype) == "ieee", conv=conv)

    def run_all(cfg):  # idempotent: a config the device refuses fails at its first launch, before any sum
        grad.zero_()
        partials.clear()
        chunk = chunk_rows(cfg)
        cols = torch.arange(N, device=a.device, dtype=torch.int64)[None, :]
        for k_start in range(0, K, chunk):
            k_end = min(K, k_start + chunk)
            contrib = torch.empty((k_end - k_start, N), device=a.device, dtype=torch.float32) if deterministic \
                else grad
            if sumsq:
                columns = column_programs(cfg) if column_programs else triton.cdiv(N, cfg.block_n)
                programs = triton.cdiv(k_end - k_start, cfg.block_m) * columns
                partials.append(torch.empty(programs, device=a.device, dtype=torch.float64))
            launched = launch(cfg, k_start, k_end, grad, contrib, partials[-1] if sumsq else None, deterministic)
            maybe_dump(kernel, launched)
            if deterministic:
                rows = torch.arange(k_start, k_end, device=a.device, dtype=torch.int64)[:, None]
                index = mapping.index(cols, rows) if transposed else mapping.index(rows, cols)
                grad.index_put_((index.reshape(-1),), contrib.reshape(-1), accumulate=True)

    configs.run_fitting(run_all, config or rechoose(), rechoose, configs.refused_key(a.device, name, a.dtype),
                        explicit=config is not None)
    return grad, torch.cat(partials).sum() if sumsq else None
