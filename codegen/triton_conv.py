"""Convolution as an implicit ROAST GEMM: neither the im2col matrix nor the weight exists.

The conv weight of a site is V^T reshaped to (out, in/groups, kh, kw), V being the site's
(in/groups * kh * kw, out) B view. Output pixel m = (image, oh, ow) against reduction index
r = (channel, kh, kw) -- F.unfold's order, the view's row order -- reads input element
(image, channel, oh * stride - pad + kh * dilation, ow * stride - pad + kw * dilation), or 0
outside the image; the B tile comes from the memory at its hashed slots (`roast_b_tile`).
The kernel writes its block straight into the (N, C_out, OH, OW) output (any strides), so a
grouped conv runs one launch per group into the same tensor.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .hashing import TileHash
from .triton_matmul import _check_kernel_dtype, accumulate_dot, grouped_program, roast_b_tile


@triton.jit
def roast_conv_block(
    x_ptr, mem_ptr, M, N, R, C0,
    H, W, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW,
    stride_xn, stride_xc, stride_xh, stride_xw,
    tile_rows, tile_cols, alignment, window_start, offset_range, a_row, a_col, hb, c_row, c_col, hd,
    PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    """This program's fp32 (BLOCK_M pixels, BLOCK_N channels) block of the conv, and the block's
    coordinates (image, oh, ow per row; channel within the group per column). The conv kernels
    generated per epilogue (triton_epilogue.py) run this main loop."""
    # rows (output pixels) and their coordinates in int32 (M < 2**31 is checked on the host); only the
    # addresses are int64
    pid_m, pid_n = grouped_program(M, N, BLOCK_M, BLOCK_N, GROUP_M)
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
        channel = offs_r // (KH * KW)
        tap = offs_r % (KH * KW)
        ih = top + ((tap // KW) * DH)[None, :]
        iw = left + ((tap % KW) * DW)[None, :]
        inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W) & mask_m[:, None] & mask_r[None, :]
        ih = tl.where(inside, ih, 0)  # padding reads nothing: the address stays inside the tensor
        iw = tl.where(inside, iw, 0)
        a = tl.load(x_ptr + row_base + (C0 + channel).to(tl.int64)[None, :] * stride_xc
                    + (ih * stride_xh + iw * stride_xw).to(tl.int64), mask=inside, other=0.0)
        w = roast_b_tile(mem_ptr, offs_r, offs_n, mask_r, mask_n, tile_rows, tile_cols, alignment, window_start,
                         offset_range, a_row, a_col, hb, c_row, c_col, hd, True)
        acc = accumulate_dot(acc, a, w, PRECISION, DOT_IN_FP32)
    return acc, offs_n, mask_m, mask_n, image.to(tl.int64), oh.to(tl.int64), ow.to(tl.int64)


def conv_geometry(x: torch.Tensor, mapping: TileHash, out: torch.Tensor, kernel, c0: int, o0: int) -> tuple:
    """(M, N, R) of one group's implicit GEMM, after checking that it fits ``x`` and ``out``."""
    if x.dim() != 4 or out.dim() != 4:
        raise ValueError(f"roast_conv2d_group takes 4-D input and output, got {tuple(x.shape)} and {tuple(out.shape)}")
    _check_kernel_dtype("input", x)
    kh, kw = kernel
    R, N = mapping.rows, mapping.cols
    if R % (kh * kw) or c0 + R // (kh * kw) > x.shape[1] or o0 + N > out.shape[1]:
        raise ValueError(f"a {R}x{N} view does not fit kernel {tuple(kernel)} at input channel {c0} and output "
                         f"channel {o0} of {tuple(x.shape)} -> {tuple(out.shape)}")
    n, _, h, w = x.shape
    M = n * out.shape[2] * out.shape[3]
    if M >= 2**31 or h * x.stride(2) + w * x.stride(3) >= 2**31:
        raise ValueError(f"roast_conv2d_group indexes pixels in int32: {M} output pixels or a {h}x{w} "
                         f"image plane with strides {x.stride()} is too large; split the batch")
    return M, N, R


def conv_args(x: torch.Tensor, out: torch.Tensor, kernel, stride, padding, dilation) -> tuple:
    """The geometry arguments ``roast_conv_block`` takes after C0 (through the input's strides)."""
    return (x.shape[2], x.shape[3], out.shape[2], out.shape[3], kernel[0], kernel[1], stride[0], stride[1],
            padding[0], padding[1], dilation[0], dilation[1], *x.stride())


def roast_conv2d_group(x: torch.Tensor, memory: torch.Tensor, mapping: TileHash, scale: float, out: torch.Tensor,
                       kernel, stride, padding, dilation, c0: int = 0, o0: int = 0,
                       bias: torch.Tensor | None = None, config=None) -> torch.Tensor:
    """Write into ``out[:, o0:o0 + mapping.cols]`` the conv2d of ``x[:, c0:c0 + in_per_group]`` with the
    weight V^T reshaped, V = the (in_per_group * kh * kw, cols) view ``mapping`` reads from the memory;
    ``bias`` is the whole conv's (out,) bias (its slice o0.. is used). Returns ``out``.

    The kernel is the generated conv kernel (triton_epilogue.py) whose epilogue adds the bias as a
    per-channel vector, or has no step without one."""
    from .epilogue import Epilogue
    from .triton_epilogue import roast_conv_epilogue

    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out.shape[1]):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({out.shape[1]},)")
    epilogue = Epilogue.parse("add:x0" if bias is not None else "")
    extras = [bias.reshape(-1, 1, 1)] if bias is not None else []
    return roast_conv_epilogue(x, memory, mapping, scale, out, kernel, stride, padding, dilation, epilogue, extras,
                               c0=c0, o0=o0, config=config)
