"""Convolution as implicit ROAST GEMMs: neither the im2col matrix nor the weight exists.

The kernels are 3-D; a 2-D conv runs them with depth 1 (a 1-D conv with height 1 as well),
and Triton specializes the arguments equal to 1, so the depth arithmetic folds away there.
The conv weight of a site is V^T reshaped to (out, in/groups, kd, kh, kw), V being the site's
(in/groups * kd * kh * kw, out) B view; a transposed conv's (in, out/groups * kd * kh * kw)
view is the B view of the conv it is the adjoint of, read transposed. Output pixel m =
(image, od, oh, ow) against reduction index r = (channel, kd, kh, kw) -- F.unfold's order,
the view's row order -- reads input element (image, channel, od * stride - pad + kd *
dilation, ...), or 0 outside the volume; the B tile comes from the memory at its hashed
slots (`roast_b_tile`). Group g is program axis 1 of every kernel: it reads input channels from
g * in/groups and the view's columns (output channels) from g * out/groups, and writes its
block straight into the (N, C, D, H, W) output (any strides). Each element is hashed on its own,
so groups need not start on hash-tile boundaries, and a grouped conv is one launch.

Three kernels: the forward (`roast_conv_block`, the main loop of the conv kernels generated
per epilogue in triton_epilogue.py), dX over the input's pixels, dMemory over the output's.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .hashing import TileHash
from .triton_hashing import (advance_bases, block_split, hash_args, offset_magic, reduction_bases, view_free_terms,
                             view_red_terms)
from .triton_matmul import (_check_kernel_dtype, accumulate_dot, grad_memory_store, grouped_program, grouped_tile,
                            roast_b_tile, roast_view_values)


@triton.jit
def conv_input_tile(x_ptr, pixel_base, front, top, left, mask_m, offs_r, mask_r, C0, D, H, W, KD, KH, KW, DD, DH, DW,
                    stride_xc, stride_xd, stride_xh, stride_xw):
    """A tile of the implicit im2col matrix, whose element (pixel m = (image, od, oh, ow), reduction index
    r = (channel, kd, kh, kw)) is x[image, C0 + channel, front + kd * DD, top + kh * DH, left + kw * DW], 0
    outside the volume. The pixel arguments (its image's int64 offset ``pixel_base``, its window's corner
    ``front``/``top``/``left``, ``mask_m``) and the reduction ones (``offs_r``, ``mask_r``) come shaped for
    broadcasting: (M, 1) and (1, R) give the (pixels, reduction) tile, (1, M) and (R, 1) its transpose."""
    channel = offs_r // (KD * KH * KW)
    tap = offs_r % (KD * KH * KW)
    plane = tap % (KH * KW)
    i_d = front + (tap // (KH * KW)) * DD
    ih = top + (plane // KW) * DH
    iw = left + (plane % KW) * DW
    inside = (i_d >= 0) & (i_d < D) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W) & mask_m & mask_r
    i_d = tl.where(inside, i_d, 0)  # padding reads nothing: the address stays inside the tensor
    ih = tl.where(inside, ih, 0)
    iw = tl.where(inside, iw, 0)
    return tl.load(x_ptr + pixel_base + (C0 + channel).to(tl.int64) * stride_xc
                   + (i_d * stride_xd + ih * stride_xh + iw * stride_xw).to(tl.int64), mask=inside, other=0.0)


@triton.jit
def output_pixels(offs_m, OD, OH, OW):
    """(image, od, oh, ow) of output pixels m, in int32."""
    image = offs_m // (OD * OH * OW)
    pixel = offs_m % (OD * OH * OW)
    plane = pixel % (OH * OW)
    return image, pixel // (OH * OW), plane // OW, plane % OW


@triton.jit
def roast_conv_block(
    x_ptr, mem_ptr, rs_ptr, M, N, R,
    D, H, W, OD, OH, OW, KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW,
    stride_xn, stride_xc, stride_xd, stride_xh, stride_xw,
    tile_rows: tl.constexpr, tile_cols: tl.constexpr, alignment: tl.constexpr, window_start, offset_range,
    a_row, a_col, hb, c_row, c_col, hd,
    VIEW_IS_B: tl.constexpr, PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_SPLIT: tl.constexpr, EVEN_R: tl.constexpr = False, EVEN_N: tl.constexpr = False,
    ROW_SCALED: tl.constexpr = False,
):
    """This program's fp32 (BLOCK_M pixels, BLOCK_N channels) block of group program_id(1)'s conv (N output
    and R / (KD * KH * KW) input channels per group), and the block's coordinates: image, od, oh, ow per
    row, the output channel (across groups) per column. The conv kernels generated per epilogue run this
    main loop. EVEN_R / EVEN_N: R and N are multiples of BLOCK_R and BLOCK_N (`triton_matmul.even_flags`), so
    the loads need no mask along them (the input's padding masks stay). ROW_SCALED: row r of the view is
    multiplied by the fp32 ``rs_ptr[r]`` as it is read (weight norm per kernel tap or input channel)."""
    # rows (output pixels) and their coordinates in int32 (the host checks that they fit); only the
    # addresses are int64
    pid_m, pid_n = grouped_program(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    group = tl.program_id(1)
    c0 = group * (R // (KD * KH * KW))  # the group's first input channel ...
    o0 = group * N  # ... and output channel: the view's column
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if EVEN_N:
        mask_n = tl.full((BLOCK_N,), True, tl.int1)
    image, od, oh, ow = output_pixels(offs_m, OD, OH, OW)
    front = (od * SD - PD)[:, None]
    top = (oh * SH - PH)[:, None]
    left = (ow * SW - PW)[:, None]
    row_base = image.to(tl.int64)[:, None] * stride_xn

    # the mapping's terms that stay fixed along the reduction (the view's columns o0 + offs_n), once per program
    offs_t = tl.arange(0, BLOCK_R)
    hterm, intile, sterm = view_free_terms(o0 + offs_n, VIEW_IS_B, tile_rows, tile_cols, a_row, a_col, hb, c_row,
                                           c_col, hd)
    ct = view_red_terms(offs_t, VIEW_IS_B, c_row, c_col)
    # the reduction's terms of the first block, what each block adds to them, the remainder's constants
    sbase, hbase = reduction_bases(0, VIEW_IS_B, tile_rows, tile_cols, a_row, a_col, c_row, c_col)
    sstep, hstep = reduction_bases(BLOCK_R, VIEW_IS_B, tile_rows, tile_cols, a_row, a_col, c_row, c_col)
    omagic = offset_magic(offset_range)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + offs_t
        mask_r = offs_r < R
        if EVEN_R:
            mask_r = tl.full((BLOCK_R,), True, tl.int1)
        a = conv_input_tile(x_ptr, row_base, front, top, left, mask_m[:, None], offs_r[None, :], mask_r[None, :],
                            c0, D, H, W, KD, KH, KW, DD, DH, DW, stride_xc, stride_xd, stride_xh, stride_xw)
        w = roast_b_tile(mem_ptr, r0, offs_t, o0 + offs_n, mask_r, mask_n, hterm, intile, sterm, ct,
                         tile_rows, tile_cols, alignment, window_start, offset_range, a_row, a_col, hb, c_row, c_col,
                         hd, VIEW_IS_B, BLOCK_R, BLOCK_SPLIT, sbase, hbase if BLOCK_SPLIT > 0 else None, omagic)
        if ROW_SCALED:
            w = w * tl.load(rs_ptr + offs_r, mask=mask_r, other=0.0)[:, None]
        acc = accumulate_dot(acc, a, w, PRECISION, DOT_IN_FP32)
        sbase, hbase = advance_bases(sbase, hbase, sstep, hstep)
    channel = (o0 + offs_n).to(tl.int64)
    return (acc, channel, mask_m, mask_n, image.to(tl.int64), od.to(tl.int64), oh.to(tl.int64),
            ow.to(tl.int64))


def as_3d(x: torch.Tensor, out: torch.Tensor, kernel, stride, padding, dilation):
    """(x, out, kernel, stride, padding, dilation) of a conv2d on 4-D tensors as a conv3d of depth 1 (views:
    writes into the 5-D out reach ``out``); a conv3d's as they are."""
    kernel, stride, padding, dilation = (tuple(int(v) for v in a) for a in (kernel, stride, padding, dilation))
    dims = {len(kernel), len(stride), len(padding), len(dilation)}
    if x.dim() == out.dim() == 4 and dims == {2}:
        return (x.unsqueeze(2), out.unsqueeze(2), (1, *kernel), (1, *stride), (0, *padding), (1, *dilation))
    if x.dim() == out.dim() == 5 and dims == {3}:
        return x, out, kernel, stride, padding, dilation
    raise ValueError(f"the conv kernels take 4-D input and output with 2-entry kernel/stride/padding/dilation, or "
                     f"5-D with 3 entries; got {tuple(x.shape)} -> {tuple(out.shape)}, kernel={kernel}, "
                     f"stride={stride}, padding={padding}, dilation={dilation}")


def conv_geometry(x: torch.Tensor, mapping: TileHash, out: torch.Tensor, kernel, groups: int,
                  transposed: bool = False) -> tuple[int, int, int]:
    """(M output pixels, N output channels per group, R reduction length) of a grouped conv's implicit GEMM on
    5-D ``x`` and ``out``, after checking that the view fits them: the conv's (in/groups * kd * kh * kw, out)
    weight view is the mapping's view, or (``transposed``) its transpose."""
    _check_kernel_dtype("input", x)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    taps = kernel[0] * kernel[1] * kernel[2]
    R, cols = (mapping.cols, mapping.rows) if transposed else (mapping.rows, mapping.cols)
    if R % taps or R // taps * groups != x.shape[1] or cols != out.shape[1] or cols % groups:
        raise ValueError(f"a {R}x{cols} weight view does not fit kernel {tuple(kernel)} (depth, height, width) "
                         f"with groups={groups} from {tuple(x.shape)} to {tuple(out.shape)}: expected "
                         f"in/groups * kernel size rows and out columns")
    for name, t in (("input", x), ("output", out)):
        n, _, d, h, w = t.shape
        if n * d * h * w >= 2**31 or d * t.stride(2) + h * t.stride(3) + w * t.stride(4) >= 2**31:
            raise ValueError(f"the conv kernels index pixels in int32: the {name} of shape {tuple(t.shape)} and "
                             f"strides {t.stride()} is too large; split the batch")
    return out.shape[0] * out.shape[2] * out.shape[3] * out.shape[4], cols // groups, R


def check_row_scale(row_scale: torch.Tensor | None, mapping: TileHash, view_is_b: bool, x: torch.Tensor) -> None:
    """A per-row scale of a conv's B view must be fp32, contiguous, one value per view row, on x's device."""
    if row_scale is None:
        return
    if not view_is_b:
        raise ValueError("a row scale applies to a conv's B view only, not to a transposed conv's view")
    if row_scale.dtype != torch.float32 or row_scale.shape != (mapping.rows,) or not row_scale.is_contiguous() \
            or row_scale.device != x.device:
        raise ValueError(f"row_scale must be a contiguous float32 ({mapping.rows},) tensor on {x.device} (one value "
                         f"per view row), got {row_scale.dtype} {tuple(row_scale.shape)} on {row_scale.device}")


def conv_args(x: torch.Tensor, out: torch.Tensor, kernel, stride, padding, dilation) -> tuple:
    """The geometry arguments ``roast_conv_block`` takes after R (through the input's strides), 5-D."""
    return (*x.shape[2:], *out.shape[2:], *kernel, *stride, *padding, *dilation, *x.stride())


def roast_conv_forward(x: torch.Tensor, memory: torch.Tensor, mapping: TileHash, scale: float, out: torch.Tensor,
                       kernel, stride, padding, dilation, groups: int = 1, bias: torch.Tensor | None = None,
                       config=None, view_is_b: bool = True,
                       row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Write into ``out`` the conv2d (4-D tensors) or conv3d (5-D) of ``x`` with ``groups`` groups and the
    weight V^T reshaped, V = the (in/groups * kernel size, out) view ``mapping`` reads from the memory, plus
    ``bias`` (out,) if given. ``view_is_b=False``: W = V reshaped, V being a transposed conv's (out,
    in/groups * kernel size) view (the conv in the transposed conv's backward). ``row_scale``: V's row r
    multiplied by ``row_scale[r]`` (`check_row_scale`). Returns ``out``.

    The kernel is the generated conv kernel (triton_epilogue.py) whose epilogue adds the bias as a
    per-channel vector, or has no step without one."""
    from .epilogue import Epilogue
    from .triton_epilogue import roast_conv_epilogue

    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out.shape[1]):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({out.shape[1]},)")
    epilogue = Epilogue.parse("add:x0" if bias is not None else "")
    extras = [bias.reshape(-1, *[1] * (out.dim() - 2))] if bias is not None else []
    return roast_conv_epilogue(x, memory, mapping, scale, out, kernel, stride, padding, dilation, epilogue, extras,
                               groups=groups, config=config, view_is_b=view_is_b, row_scale=row_scale)


# -- backward ----------------------------------------------------------------------------------------------
@triton.jit
def _roast_conv_grad_memory_kernel(
    x_ptr, g_ptr, grad_ptr, contrib_ptr, sumsq_ptr, mem_ptr, rs_ptr, rs_grad_ptr,
    M, k_start, k_end, N, N_TOTAL, R,
    D, H, W, OD, OH, OW, KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW,
    stride_xn, stride_xc, stride_xd, stride_xh, stride_xw, stride_gn, stride_gc, stride_gd, stride_gh, stride_gw,
    scale,
    tile_rows: tl.constexpr, tile_cols: tl.constexpr, alignment: tl.constexpr, window_start, offset_range,
    a_row, a_col, hb, c_row, c_col, hd,
    DETERMINISTIC: tl.constexpr, SUMSQ: tl.constexpr, VIEW_TRANSPOSED: tl.constexpr, PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_SPLIT: tl.constexpr, ROW_SCALED: tl.constexpr = False,
):
    """dV = im2col(x)^T @ dY, the im2col tiles read from x in place: a program owns a (BLOCK_K reduction
    indices in [k_start, k_end), BLOCK_N output channels) block of one group's columns of dV (N per group,
    N_TOTAL in all) and reduces over all M output pixels; with VIEW_TRANSPOSED dV is stored into the view
    transposed (a transposed conv's view). ROW_SCALED (a conv whose view row r is multiplied by ``rs_ptr[r]``,
    `roast_conv_block`): the block is dV_scaled = G * rs[r] with G = im2col(x)^T @ dY, and the program also
    writes its part of d(rs)[r] = sum over its columns of G * V (V read from ``mem_ptr`` at the block's
    slots, times ``scale``) to row program_id(1) of the (column programs, R) ``rs_grad_ptr``."""
    n_blocks = tl.cdiv(N, BLOCK_N)
    group = tl.program_id(1) // n_blocks
    c0 = group * (R // (KD * KH * KW))
    o0 = group * N
    offs_k = k_start + tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = (tl.program_id(1) % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = offs_k < k_end
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        image, od, oh, ow = output_pixels(offs_m, OD, OH, OW)
        a_t = conv_input_tile(x_ptr, image.to(tl.int64)[None, :] * stride_xn, (od * SD - PD)[None, :],
                              (oh * SH - PH)[None, :], (ow * SW - PW)[None, :], mask_m[None, :], offs_k[:, None],
                              mask_k[:, None], c0, D, H, W, KD, KH, KW, DD, DH, DW, stride_xc, stride_xd, stride_xh,
                              stride_xw)
        c = tl.load(g_ptr + image.to(tl.int64)[:, None] * stride_gn + (o0 + offs_n).to(tl.int64)[None, :] * stride_gc
                    + (od * stride_gd + oh * stride_gh + ow * stride_gw).to(tl.int64)[:, None],
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        c = c.to(a_t.dtype)
        if DOT_IN_FP32:
            a_t = a_t.to(tl.float32)
            c = c.to(tl.float32)
        acc = tl.dot(a_t, c, acc, input_precision=PRECISION)
    if ROW_SCALED:
        view = roast_view_values(mem_ptr, offs_k[:, None], (o0 + offs_n)[None, :], mask_k[:, None] & mask_n[None, :],
                                 tile_rows, tile_cols, alignment, window_start, offset_range, a_row, a_col, hb,
                                 c_row, c_col, hd)
        tl.store(rs_grad_ptr + tl.program_id(1).to(tl.int64) * R + offs_k, tl.sum(view * acc, axis=1) * scale,
                 mask=mask_k)
        acc = acc * tl.load(rs_ptr + offs_k, mask=mask_k, other=0.0)[:, None]
    grad_memory_store(acc, offs_k.to(tl.int64), (o0 + offs_n).to(tl.int64), mask_k, mask_n, k_start, N_TOTAL,
                      grad_ptr, contrib_ptr, sumsq_ptr, scale, tile_rows, tile_cols, alignment, window_start,
                      offset_range, a_row, a_col, hb, c_row, c_col, hd, DETERMINISTIC, SUMSQ, VIEW_TRANSPOSED, BLOCK_K,
                      BLOCK_SPLIT)


@triton.jit
def roast_transposed_conv_block(
    g_ptr, mem_ptr, rs_ptr, M, N, OC,
    D, H, W, OD, OH, OW, KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW,
    stride_gn, stride_gc, stride_gd, stride_gh, stride_gw,
    tile_rows: tl.constexpr, tile_cols: tl.constexpr, alignment: tl.constexpr, window_start, offset_range,
    a_row, a_col, hb, c_row, c_col, hd,
    VIEW_TRANSPOSED: tl.constexpr, PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_SPLIT: tl.constexpr, ROW_SCALED: tl.constexpr = False,
):
    """A conv's dX, which is the transposed conv of its output gradient: this program's fp32 block for group
    program_id(1) (N input and OC output channels of the conv per group), an implicit GEMM over the conv's
    input pixels, column = input channel c, reduction over the taps (kd, kh, kw) and, per tap, the output
    channels oc in blocks of BLOCK_R: A[m, oc] = dY[image, o0 + oc, od, oh, ow] where id = od * SD - PD +
    kd * DD and likewise for h and w (0 where no such output pixel exists), B[oc, c] = W[o0 + oc, c, kd, kh,
    kw] = V[c * taps + tap, o0 + oc] read at its hashed slot (V^T's element with VIEW_TRANSPOSED: a
    transposed conv's forward, whose view is (in, out/groups * taps)).

    The pixels are split by their phase modulo the stride (SD * SH * SW phases; program axis 0 runs over
    phases, then tiles): pixel (id, ih, iw) = (qd * SD + pd, qh * SH + ph, qw * SW + pw), M = images * QD *
    QH * QW rows per phase. A tap reaches the pixels of one phase from whole output pixels or from none, so a
    program skips every tap that does not match its phase: a stride-2 2-D conv runs a quarter of the taps.
    ROW_SCALED (a conv's B view, not VIEW_TRANSPOSED): view row c * taps + tap is multiplied by the fp32
    ``rs_ptr[c * taps + tap]`` as it is read, as `roast_conv_block` does.
    Returns the block and its coordinates as ``roast_conv_block`` does: channel (across groups) per column,
    image, id, ih, iw per row (int64)."""
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    phase = tl.program_id(0) // tiles
    pid_m, pid_n = grouped_tile(tl.program_id(0) % tiles, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    group = tl.program_id(1)
    c0 = group * N
    o0 = group * OC
    pd = phase // (SH * SW)
    ph = (phase % (SH * SW)) // SW
    pw = phase % SW
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    image, qd, qh, qw = output_pixels(offs_m, tl.cdiv(D, SD), tl.cdiv(H, SH), tl.cdiv(W, SW))
    i_d = qd * SD + pd
    ih = qh * SH + ph
    iw = qw * SW + pw
    mask_m = (offs_m < M) & (i_d < D) & (ih < H) & (iw < W)
    image_base = image.to(tl.int64) * stride_gn
    offs_t = tl.arange(0, BLOCK_R)
    ct = view_red_terms(offs_t, VIEW_TRANSPOSED, c_row, c_col)
    omagic = offset_magic(offset_range)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tap in range(0, KD * KH * KW):
        plane = tap % (KH * KW)
        td = pd + PD - (tap // (KH * KW)) * DD  # (id + PD - kd * DD) - qd * SD: od * SD - qd * SD if it divides
        th = ph + PH - (plane // KW) * DH
        tw = pw + PW - (plane % KW) * DW
        if (td % SD == 0) & (th % SH == 0) & (tw % SW == 0):  # this tap reaches this phase's pixels
            od = qd + td // SD  # exact divisions
            oh = qh + th // SH
            ow = qw + tw // SW
            hit = (od >= 0) & (od < OD) & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW) & mask_m
            row = image_base + (tl.where(hit, od, 0) * stride_gd + tl.where(hit, oh, 0) * stride_gh
                                + tl.where(hit, ow, 0) * stride_gw).to(tl.int64)
            view_row = offs_n * (KD * KH * KW) + tap
            # this tap's view rows (or columns) are B's free axis: their mapping terms, once per tap
            hterm, intile, sterm = view_free_terms(view_row, VIEW_TRANSPOSED, tile_rows, tile_cols, a_row, a_col,
                                                   hb, c_row, c_col, hd)
            if ROW_SCALED:
                row_scale = tl.load(rs_ptr + view_row, mask=mask_n, other=0.0)
            for oc0 in range(0, OC, BLOCK_R):
                oc = oc0 + offs_t
                mask_oc = oc < OC
                a = tl.load(g_ptr + row[:, None] + (o0 + oc).to(tl.int64)[None, :] * stride_gc,
                            mask=hit[:, None] & mask_oc[None, :], other=0.0)
                mask_w = mask_oc[:, None] & mask_n[None, :]
                if BLOCK_SPLIT >= 0:  # B[oc, c] is the view's (o0 + oc, view_row) or (view_row, o0 + oc)
                    w = roast_b_tile(mem_ptr, o0 + oc0, offs_t, view_row, mask_oc, mask_n, hterm, intile, sterm,
                                     ct, tile_rows, tile_cols, alignment, window_start, offset_range, a_row, a_col,
                                     hb, c_row, c_col, hd, VIEW_TRANSPOSED, BLOCK_R, BLOCK_SPLIT, omagic=omagic)
                elif VIEW_TRANSPOSED:
                    w = roast_view_values(mem_ptr, (o0 + oc)[:, None], view_row[None, :], mask_w, tile_rows,
                                          tile_cols, alignment, window_start, offset_range, a_row, a_col, hb, c_row,
                                          c_col, hd, omagic)
                else:
                    w = roast_view_values(mem_ptr, view_row[None, :], (o0 + oc)[:, None], mask_w, tile_rows,
                                          tile_cols, alignment, window_start, offset_range, a_row, a_col, hb, c_row,
                                          c_col, hd, omagic)
                if ROW_SCALED:
                    w = w * row_scale[None, :]
                acc = accumulate_dot(acc, a, w, PRECISION, DOT_IN_FP32)
    channel = (c0 + offs_n).to(tl.int64)
    return (acc, channel, mask_m, mask_n, image.to(tl.int64), i_d.to(tl.int64), ih.to(tl.int64),
            iw.to(tl.int64))


def _check_grad(x: torch.Tensor, grad: torch.Tensor) -> None:
    if grad.dtype != x.dtype or grad.device != x.device:
        raise ValueError(f"the output gradient ({grad.dtype} on {grad.device}) must match the input "
                         f"({x.dtype} on {x.device})")


def roast_conv_grad_input(grad: torch.Tensor, memory: torch.Tensor, mapping: TileHash, scale: float,
                          dx: torch.Tensor, kernel, stride, padding, dilation, groups: int = 1, config=None,
                          transposed: bool = False, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Write into ``dx`` the input gradient of the conv2d/conv3d that ``roast_conv_forward`` computes, for its
    output gradient ``grad``: one implicit GEMM over dx's pixels, all groups in one launch; neither the
    columns of dY nor the weight is built. ``transposed``: the conv's weight view is the mapping's view
    transposed; this is then the forward of the transposed conv whose (in, out/groups * kernel size) view the
    mapping reads, ``grad`` its input and ``dx`` its output. ``row_scale``: the conv's, as in
    `roast_conv_forward`. Returns ``dx``.

    The kernel is the generated transposed-conv kernel (triton_epilogue.py) with no epilogue step."""
    from .epilogue import Epilogue
    from .triton_epilogue import roast_transposed_conv_epilogue

    _check_grad(dx, grad)
    return roast_transposed_conv_epilogue(grad, memory, mapping, scale, dx, kernel, stride, padding, dilation,
                                          Epilogue.parse(""), (), groups=groups, config=config,
                                          view_transposed=transposed, row_scale=row_scale)


def roast_conv_grad_memory(x: torch.Tensor, grad: torch.Tensor, memory_size: int, mapping: TileHash, scale: float,
                           kernel, stride, padding, dilation, groups: int = 1, deterministic: bool | None = None,
                           sumsq: bool = False, config=None,
                           transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fp32 memory gradient of the conv2d/conv3d ``roast_conv_forward(x, ..)`` computes, for its output
    gradient ``grad``: dV = im2col(x)^T @ dY per group with the im2col tiles read from x in place, all groups in
    one launch, sent to the slots as `triton_matmul.roast_grad_memory` does (atomics, or a deterministic
    reduction); ``transposed``: into the mapping's view transposed (a transposed conv's memory gradient,
    ``x`` being its output gradient and ``grad`` its input). Returns (gradient, the float64 sum of dV's
    squares when ``sumsq``, else None)."""
    grad_memory, squares, _ = _grad_memory(x, grad, memory_size, mapping, scale, (kernel, stride, padding, dilation),
                                           groups, deterministic, sumsq, config, transposed)
    return grad_memory, squares


def roast_conv_row_scaled_grad_memory(x: torch.Tensor, grad: torch.Tensor, memory: torch.Tensor, mapping: TileHash,
                                      scale: float, row_scale: torch.Tensor, kernel, stride, padding, dilation,
                                      groups: int = 1, deterministic: bool | None = None,
                                      config=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of ``roast_conv_forward(x, .., row_scale=row_scale)`` for its output gradient ``grad``:
    (the fp32 memory gradient, sent as `roast_conv_grad_memory` sends it, of dV_scaled = G * row_scale[r]
    with G = im2col(x)^T @ dY; the fp32 gradient of ``row_scale``, d[r] = sum over the view's row r of
    G * V). The kernel writes d's part per column program; torch adds them (the same order on every run)."""
    check_row_scale(row_scale, mapping, True, x)
    grad_memory, _, parts = _grad_memory(x, grad, memory.numel(), mapping, scale, (kernel, stride, padding, dilation),
                                         groups, deterministic, False, config, False, memory.reshape(-1), row_scale)
    return grad_memory, sum(part.sum(0) for part in parts)


def _grad_memory(x, grad, memory_size, mapping, scale, geometry, groups, deterministic, sumsq, config, transposed,
                 memory=None, row_scale=None):
    from .triton_matmul import dot_in_fp32, dot_precision, run_grad_memory

    _check_grad(x, grad)
    x5, grad5, kernel, stride, padding, dilation = as_3d(x, grad, *geometry)
    M, N, R = conv_geometry(x5, mapping, grad5, kernel, groups, transposed)
    parts = []  # with a row scale, per launch of the last run: (column programs, R) parts of its gradient

    def columns(cfg):  # program axis 1: the column blocks of every group
        return triton.cdiv(N, cfg.block_n) * groups

    def launch(cfg, k_start, k_end, grad_memory, contrib, partial, deterministic):
        programs = (triton.cdiv(k_end - k_start, cfg.block_m), columns(cfg))
        rs_grad = grad_memory
        if row_scale is not None:
            if k_start == 0:  # a run (the timed first chunk, or all chunks) starts again
                parts.clear()
            rs_grad = torch.zeros((programs[1], R), device=x.device, dtype=torch.float32)
            parts.append(rs_grad)
        return _roast_conv_grad_memory_kernel[programs](
            x5, grad5, grad_memory, contrib, partial if partial is not None else grad_memory,
            memory if memory is not None else grad_memory, row_scale if row_scale is not None else grad_memory,
            rs_grad,
            M, k_start, k_end, N, N * groups, R, *conv_args(x5, grad5, kernel, stride, padding, dilation),
            *grad5.stride(), float(scale), *hash_args(mapping),
            DETERMINISTIC=deterministic, SUMSQ=partial is not None, VIEW_TRANSPOSED=transposed,
            PRECISION=dot_precision(x.dtype), DOT_IN_FP32=dot_in_fp32(x.dtype),
            BLOCK_K=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_k,
            BLOCK_SPLIT=block_split(mapping, not transposed, cfg.block_m, k_start), ROW_SCALED=row_scale is not None,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    name = "roast_conv_grad_memory" + ("[row_scaled]" if row_scale is not None else "")
    grad_memory, squares = run_grad_memory(name, _roast_conv_grad_memory_kernel, launch, x, M, memory_size,
                                           mapping, deterministic, config, sumsq, conv=True, transposed=transposed,
                                           column_programs=columns)
    if row_scale is not None and not parts:  # M == 0: nothing launched
        parts.append(torch.zeros((1, R), device=x.device, dtype=torch.float32))
    return grad_memory, squares, parts
