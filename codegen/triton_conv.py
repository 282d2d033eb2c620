"""Convolution as implicit ROAST GEMMs: neither the im2col matrix nor the weight exists.

The conv weight of a site is V^T reshaped to (out, in/groups, kh, kw), V being the site's
(in/groups * kh * kw, out) B view; a transposed conv's (in, out/groups * kh * kw) view is the
B view of the conv it is the adjoint of, read transposed. Output pixel m = (image, oh, ow)
against reduction index r = (channel, kh, kw) -- F.unfold's order, the view's row order --
reads input element (image, channel, oh * stride - pad + kh * dilation, ow * stride - pad +
kw * dilation), or 0 outside the image; the B tile comes from the memory at its hashed slots
(`roast_b_tile`). Group g is program axis 1 of every kernel: it reads input channels from
g * in/groups and the view's columns (output channels) from g * out/groups, and writes its
block straight into the (N, C, H, W) output (any strides). Each element is hashed on its own,
so groups need not start on hash-tile boundaries, and a grouped conv is one launch.

Three kernels: the forward (`roast_conv_block`, the main loop of the conv kernels generated
per epilogue in triton_epilogue.py), dX over the input's pixels, dMemory over the output's.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .hashing import TileHash
from .triton_hashing import hash_args, maybe_dump
from .triton_matmul import (_check_kernel_dtype, accumulate_dot, grad_memory_store, grouped_program, roast_b_tile,
                            roast_view_values)


@triton.jit
def conv_input_tile(x_ptr, pixel_base, top, left, mask_m, offs_r, mask_r, C0, H, W, KH, KW, DH, DW,
                    stride_xc, stride_xh, stride_xw):
    """A tile of the implicit im2col matrix, whose element (pixel m = (image, oh, ow), reduction index
    r = (channel, kh, kw)) is x[image, C0 + channel, top + kh * DH, left + kw * DW], 0 outside the image.
    The pixel arguments (its image's int64 offset ``pixel_base``, its window's ``top``/``left`` corner,
    ``mask_m``) and the reduction ones (``offs_r``, ``mask_r``) come shaped for broadcasting: (M, 1) and
    (1, R) give the (pixels, reduction) tile, (1, M) and (R, 1) its transpose."""
    channel = offs_r // (KH * KW)
    tap = offs_r % (KH * KW)
    ih = top + (tap // KW) * DH
    iw = left + (tap % KW) * DW
    inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W) & mask_m & mask_r
    ih = tl.where(inside, ih, 0)  # padding reads nothing: the address stays inside the tensor
    iw = tl.where(inside, iw, 0)
    return tl.load(x_ptr + pixel_base + (C0 + channel).to(tl.int64) * stride_xc
                   + (ih * stride_xh + iw * stride_xw).to(tl.int64), mask=inside, other=0.0)


@triton.jit
def roast_conv_block(
    x_ptr, mem_ptr, M, N, R,
    H, W, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW,
    stride_xn, stride_xc, stride_xh, stride_xw,
    tile_rows, tile_cols, alignment, window_start, offset_range, a_row, a_col, hb, c_row, c_col, hd,
    VIEW_IS_B: tl.constexpr, PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    """This program's fp32 (BLOCK_M pixels, BLOCK_N channels) block of group program_id(1)'s conv (N output
    and R / (KH * KW) input channels per group), and the block's coordinates: image, oh, ow per row, the
    output channel (across groups) per column. The conv kernels generated per epilogue run this main loop."""
    # rows (output pixels) and their coordinates in int32 (M < 2**31 is checked on the host); only the
    # addresses are int64
    pid_m, pid_n = grouped_program(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    group = tl.program_id(1)
    c0 = group * (R // (KH * KW))  # the group's first input channel ...
    o0 = group * N  # ... and output channel: the view's column
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    image = offs_m // (OH * OW)
    pixel = offs_m % (OH * OW)
    oh = pixel // OW
    ow = pixel % OW
    top = (oh * SH - PH)[:, None]
    left = (ow * SW - PW)[:, None]
    row_base = image.to(tl.int64)[:, None] * stride_xn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        a = conv_input_tile(x_ptr, row_base, top, left, mask_m[:, None], offs_r[None, :], mask_r[None, :], c0, H, W,
                            KH, KW, DH, DW, stride_xc, stride_xh, stride_xw)
        w = roast_b_tile(mem_ptr, offs_r, o0 + offs_n, mask_r, mask_n, tile_rows, tile_cols, alignment,
                         window_start, offset_range, a_row, a_col, hb, c_row, c_col, hd, VIEW_IS_B)
        acc = accumulate_dot(acc, a, w, PRECISION, DOT_IN_FP32)
    channel = (o0 + offs_n).to(tl.int64)
    return acc, channel, mask_m, mask_n, image.to(tl.int64), oh.to(tl.int64), ow.to(tl.int64)


def conv_geometry(x: torch.Tensor, mapping: TileHash, out: torch.Tensor, kernel, groups: int,
                  transposed: bool = False) -> tuple[int, int, int]:
    """(M output pixels, N output channels per group, R reduction length) of a grouped conv's implicit GEMM,
    after checking that the view fits ``x`` and ``out``: the conv's (in/groups * kh * kw, out) weight view is
    the mapping's view, or (``transposed``) its transpose."""
    if x.dim() != 4 or out.dim() != 4:
        raise ValueError(f"the conv kernels take 4-D input and output, got {tuple(x.shape)} and {tuple(out.shape)}")
    _check_kernel_dtype("input", x)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    kh, kw = kernel
    R, cols = (mapping.cols, mapping.rows) if transposed else (mapping.rows, mapping.cols)
    if R % (kh * kw) or R // (kh * kw) * groups != x.shape[1] or cols != out.shape[1] or cols % groups:
        raise ValueError(f"a {R}x{cols} weight view does not fit kernel {tuple(kernel)} with groups={groups} from "
                         f"{tuple(x.shape)} to {tuple(out.shape)}: expected in/groups * kh * kw rows and out columns")
    n, _, h, w = x.shape
    M = n * out.shape[2] * out.shape[3]
    for name, t in (("input", x), ("output", out)):
        if t.shape[0] * t.shape[2] * t.shape[3] >= 2**31 or t.shape[2] * t.stride(2) + t.shape[3] * t.stride(3) >= 2**31:
            raise ValueError(f"the conv kernels index pixels in int32: the {name} of shape {tuple(t.shape)} and "
                             f"strides {t.stride()} is too large; split the batch")
    return M, cols // groups, R


def conv_args(x: torch.Tensor, out: torch.Tensor, kernel, stride, padding, dilation) -> tuple:
    """The geometry arguments ``roast_conv_block`` takes after R (through the input's strides)."""
    return (x.shape[2], x.shape[3], out.shape[2], out.shape[3], kernel[0], kernel[1], stride[0], stride[1],
            padding[0], padding[1], dilation[0], dilation[1], *x.stride())


def roast_conv2d(x: torch.Tensor, memory: torch.Tensor, mapping: TileHash, scale: float, out: torch.Tensor,
                 kernel, stride, padding, dilation, groups: int = 1, bias: torch.Tensor | None = None, config=None,
                 view_is_b: bool = True) -> torch.Tensor:
    """Write into ``out`` the conv2d of ``x`` with ``groups`` groups and the weight V^T reshaped, V = the
    (in/groups * kh * kw, out) view ``mapping`` reads from the memory, plus ``bias`` (out,) if given.
    ``view_is_b=False``: W = V reshaped, V being a transposed conv's (out, in/groups * kh * kw) view (the conv
    in the transposed conv's backward). Returns ``out``.

    The kernel is the generated conv kernel (triton_epilogue.py) whose epilogue adds the bias as a
    per-channel vector, or has no step without one."""
    from .epilogue import Epilogue
    from .triton_epilogue import roast_conv_epilogue

    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out.shape[1]):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({out.shape[1]},)")
    epilogue = Epilogue.parse("add:x0" if bias is not None else "")
    extras = [bias.reshape(-1, 1, 1)] if bias is not None else []
    return roast_conv_epilogue(x, memory, mapping, scale, out, kernel, stride, padding, dilation, epilogue, extras,
                               groups=groups, config=config, view_is_b=view_is_b)


# -- backward ----------------------------------------------------------------------------------------------
@triton.jit
def _roast_conv_grad_memory_kernel(
    x_ptr, g_ptr, grad_ptr, contrib_ptr, sumsq_ptr,
    M, k_start, k_end, N, N_TOTAL, R,
    H, W, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW,
    stride_xn, stride_xc, stride_xh, stride_xw, stride_gn, stride_gc, stride_gh, stride_gw,
    scale,
    tile_rows, tile_cols, alignment, window_start, offset_range, a_row, a_col, hb, c_row, c_col, hd,
    DETERMINISTIC: tl.constexpr, SUMSQ: tl.constexpr, VIEW_TRANSPOSED: tl.constexpr, PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dV = im2col(x)^T @ dY, the im2col tiles read from x in place: a program owns a (BLOCK_K reduction
    indices in [k_start, k_end), BLOCK_N output channels) block of one group's columns of dV (N per group,
    N_TOTAL in all) and reduces over all M output pixels; with VIEW_TRANSPOSED dV is stored into the view
    transposed (a transposed conv's view)."""
    n_blocks = tl.cdiv(N, BLOCK_N)
    group = tl.program_id(1) // n_blocks
    c0 = group * (R // (KH * KW))
    o0 = group * N
    offs_k = k_start + tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = (tl.program_id(1) % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = offs_k < k_end
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        image = offs_m // (OH * OW)
        pixel = offs_m % (OH * OW)
        oh = pixel // OW
        ow = pixel % OW
        a_t = conv_input_tile(x_ptr, image.to(tl.int64)[None, :] * stride_xn, (oh * SH - PH)[None, :],
                              (ow * SW - PW)[None, :], mask_m[None, :], offs_k[:, None], mask_k[:, None], c0, H, W,
                              KH, KW, DH, DW, stride_xc, stride_xh, stride_xw)
        c = tl.load(g_ptr + image.to(tl.int64)[:, None] * stride_gn + (o0 + offs_n).to(tl.int64)[None, :] * stride_gc
                    + (oh * stride_gh + ow * stride_gw).to(tl.int64)[:, None],
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        c = c.to(a_t.dtype)
        if DOT_IN_FP32:
            a_t = a_t.to(tl.float32)
            c = c.to(tl.float32)
        acc = tl.dot(a_t, c, acc, input_precision=PRECISION)
    grad_memory_store(acc, offs_k.to(tl.int64), (o0 + offs_n).to(tl.int64), mask_k, mask_n, k_start, N_TOTAL,
                      grad_ptr, contrib_ptr, sumsq_ptr, scale, tile_rows, tile_cols, alignment, window_start,
                      offset_range, a_row, a_col, hb, c_row, c_col, hd, DETERMINISTIC, SUMSQ, VIEW_TRANSPOSED)


@triton.jit
def _roast_conv_grad_input_kernel(
    g_ptr, mem_ptr, dx_ptr, M, N, OC,
    H, W, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW,
    stride_gn, stride_gc, stride_gh, stride_gw, stride_dn, stride_dc, stride_dh, stride_dw,
    scale,
    tile_rows, tile_cols, alignment, window_start, offset_range, a_row, a_col, hb, c_row, c_col, hd,
    VIEW_TRANSPOSED: tl.constexpr, PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dX of group program_id(1) (N input and OC output channels per group) as an implicit GEMM over input
    pixels: row m = (image, ih, iw), column = input channel c, reduction over the taps (kh, kw) and, per
    tap, the output channels oc in blocks of BLOCK_R: A[m, oc] = dY[image, o0 + oc, oh, ow] where
    ih = oh * SH - PH + kh * DH and likewise for w (0 where no such output pixel exists: a per-row mask),
    B[oc, c] = W[o0 + oc, c, kh, kw] = V[c * KH * KW + kh * KW + kw, o0 + oc] read at its hashed slot
    (V^T's element with VIEW_TRANSPOSED: the kernel is then a transposed conv's forward, whose view is
    (in, out/groups * KH * KW))."""
    pid_m, pid_n = grouped_program(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    group = tl.program_id(1)
    c0 = group * N
    o0 = group * OC
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    image = offs_m // (H * W)
    pixel = offs_m % (H * W)
    ih = pixel // W
    iw = pixel % W
    image_base = image.to(tl.int64) * stride_gn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tap in range(0, KH * KW):
        hn = ih + PH - (tap // KW) * DH  # oh * SH, where this tap of output pixel (oh, ow) reads (ih, iw)
        wn = iw + PW - (tap % KW) * DW
        hit = (hn >= 0) & (wn >= 0) & mask_m
        hn = tl.where(hit, hn, 0)
        wn = tl.where(hit, wn, 0)
        oh = hn // SH
        ow = wn // SW
        hit = hit & (oh * SH == hn) & (ow * SW == wn) & (oh < OH) & (ow < OW)
        row = image_base + (tl.where(hit, oh, 0) * stride_gh + tl.where(hit, ow, 0) * stride_gw).to(tl.int64)
        view_row = offs_n * (KH * KW) + tap
        for oc0 in range(0, OC, BLOCK_R):
            oc = oc0 + tl.arange(0, BLOCK_R)
            mask_oc = oc < OC
            a = tl.load(g_ptr + row[:, None] + (o0 + oc).to(tl.int64)[None, :] * stride_gc,
                        mask=hit[:, None] & mask_oc[None, :], other=0.0)
            mask_w = mask_oc[:, None] & mask_n[None, :]
            if VIEW_TRANSPOSED:
                w = roast_view_values(mem_ptr, (o0 + oc)[:, None], view_row[None, :], mask_w, tile_rows, tile_cols,
                                      alignment, window_start, offset_range, a_row, a_col, hb, c_row, c_col, hd)
            else:
                w = roast_view_values(mem_ptr, view_row[None, :], (o0 + oc)[:, None], mask_w, tile_rows, tile_cols,
                                      alignment, window_start, offset_range, a_row, a_col, hb, c_row, c_col, hd)
            acc = accumulate_dot(acc, a, w, PRECISION, DOT_IN_FP32)
    acc = acc * scale
    out = (image.to(tl.int64)[:, None] * stride_dn + (c0 + offs_n).to(tl.int64)[None, :] * stride_dc
           + (ih * stride_dh + iw * stride_dw).to(tl.int64)[:, None])
    tl.store(dx_ptr + out, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _check_grad(x: torch.Tensor, grad: torch.Tensor) -> None:
    if grad.dtype != x.dtype or grad.device != x.device:
        raise ValueError(f"the output gradient ({grad.dtype} on {grad.device}) must match the input "
                         f"({x.dtype} on {x.device})")


def roast_conv2d_grad_input(grad: torch.Tensor, memory: torch.Tensor, mapping: TileHash, scale: float,
                            dx: torch.Tensor, kernel, stride, padding, dilation, groups: int = 1, config=None,
                            transposed: bool = False) -> torch.Tensor:
    """Write into ``dx`` the input gradient of the conv2d that ``roast_conv2d`` computes, for its output
    gradient ``grad``: one implicit GEMM over dx's pixels, all groups in one launch; neither the columns of
    dY nor the weight is built. ``transposed``: the conv's weight view is the mapping's view transposed;
    this is then the forward of the transposed conv whose (in, out/groups * kh * kw) view the mapping reads,
    ``grad`` its input and ``dx`` its output. Returns ``dx``."""
    from .triton_matmul import choose_config, dot_in_fp32, dot_precision, launch_gemm

    _check_kernel_dtype("memory", memory)
    _check_grad(dx, grad)
    _, OC, R = conv_geometry(dx, mapping, grad, kernel, groups, transposed)
    n, _, h, w = dx.shape
    M, N = n * h * w, R // (kernel[0] * kernel[1])
    if M == 0 or N == 0:
        return dx

    def launch(cfg, dx=dx):
        grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), groups)
        return _roast_conv_grad_input_kernel[grid](
            grad, memory.reshape(-1), dx, M, N, OC,
            h, w, grad.shape[2], grad.shape[3], *kernel, *stride, *padding, *dilation,
            *grad.stride(), *dx.stride(), float(scale), *hash_args(mapping),
            VIEW_TRANSPOSED=transposed, PRECISION=dot_precision(grad.dtype), DOT_IN_FP32=dot_in_fp32(grad.dtype),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_k, GROUP_M=8,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    name = "roast_conv_grad_input"
    # B is the view permuted element by element: no block shape holds whole hash tiles, none is preferred
    launched = launch_gemm(name, grad, memory, config, launch, lambda: choose_config(
        name, grad, M, N, OC * kernel[0] * kernel[1], None, True, launch, lambda: (torch.empty_like(dx),), memory,
        conv=True))
    maybe_dump(_roast_conv_grad_input_kernel, launched)
    return dx


def roast_conv2d_grad_memory(x: torch.Tensor, grad: torch.Tensor, memory_size: int, mapping: TileHash, scale: float,
                             kernel, stride, padding, dilation, groups: int = 1, deterministic: bool | None = None,
                             sumsq: bool = False, config=None,
                             transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fp32 memory gradient of the conv2d ``roast_conv2d(x, ..)`` computes, for its output gradient
    ``grad``: dV = im2col(x)^T @ dY per group with the im2col tiles read from x in place, all groups in one
    launch, sent to the slots as `triton_matmul.roast_grad_memory` does (atomics, or a deterministic
    reduction); ``transposed``: into the mapping's view transposed (a transposed conv's memory gradient,
    ``x`` being its output gradient and ``grad`` its input). Returns (gradient, the float64 sum of dV's
    squares when ``sumsq``, else None)."""
    from .triton_matmul import dot_in_fp32, dot_precision, run_grad_memory

    _check_grad(x, grad)
    M, N, R = conv_geometry(x, mapping, grad, kernel, groups, transposed)

    def columns(cfg):  # program axis 1: the column blocks of every group
        return triton.cdiv(N, cfg.block_n) * groups

    def launch(cfg, k_start, k_end, grad_memory, contrib, partial, deterministic):
        programs = (triton.cdiv(k_end - k_start, cfg.block_m), columns(cfg))
        return _roast_conv_grad_memory_kernel[programs](
            x, grad, grad_memory, contrib, partial if partial is not None else grad_memory,
            M, k_start, k_end, N, N * groups, R, *conv_args(x, grad, kernel, stride, padding, dilation),
            *grad.stride(), float(scale), *hash_args(mapping),
            DETERMINISTIC=deterministic, SUMSQ=partial is not None, VIEW_TRANSPOSED=transposed,
            PRECISION=dot_precision(x.dtype), DOT_IN_FP32=dot_in_fp32(x.dtype),
            BLOCK_K=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    return run_grad_memory("roast_conv_grad_memory", _roast_conv_grad_memory_kernel, launch, x, M, memory_size,
                           mapping, deterministic, config, sumsq, conv=True, transposed=transposed,
                           column_programs=columns)
