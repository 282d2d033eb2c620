"""``roastfx::roast_conv`` and ``roast_conv_transpose``: conv1d/2d/3d and their transposes whose weight is
read from the memory.

The conv weight W (out, in/groups, *kernel) is V^T reshaped, V being the site's
(in/groups*prod(kernel), out) B view. On the Triton path W is never built: the forward
is an implicit GEMM that reads the input in place, and so are the backward's dX (over
the input's pixels) and dMemory (over the output's) (triton_conv.py), each one launch for
all groups. ROASTFX_CONV=im2col runs F.unfold/F.fold around the ROAST GEMM, dX and
dMemory kernels instead, one GEMM per group on the group's window of V where windows
start on hash-tile boundaries (``ops.column_windows``; else the reference path).
Elsewhere the op materializes W and runs the dense conv.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from .grad_norm import normalize, rms_from_sumsq, site_grad_rms
from .ops import (_kernels, _mapping, _memory_grad_op, column_windows, materialize, row_windows, use_triton,
                  weight_norm_inner_scale)
from .runs import gather_view


CONV_MODES = ("implicit", "im2col")


def conv_mode() -> str:
    """How the Triton path runs a conv (ROASTFX_CONV): ``implicit`` (default), implicit-GEMM kernels for the
    forward, dX and dMemory, all groups in one launch, reading the input and the output gradient in place
    (triton_conv.py); ``im2col`` (1-D and 2-D), F.unfold then the ROAST GEMM forward, and F.fold / F.unfold
    around the dX and dMemory kernels backward, one GEMM per group."""
    mode = os.environ.get("ROASTFX_CONV", "implicit")
    if mode not in CONV_MODES:
        raise ValueError(f"ROASTFX_CONV={mode!r} is not valid; accepted: {', '.join(CONV_MODES)}")
    return mode


def _triton_path(x, mapping, groups, dims, transposed=False):
    """(conv mode, the groups' windows of the view for im2col) on the Triton path, or None for the reference
    path: off the Triton path, or under ROASTFX_CONV=im2col for a 3-D conv (F.unfold is 2-D) or where a
    group's window splits hash tiles. The implicit kernels take any groups (each element is hashed on its
    own): no windows."""
    if not use_triton(x):
        return None
    mode = conv_mode()
    if mode == "implicit":
        return mode, None
    if dims == 3:
        return None
    windows = (row_windows if transposed else column_windows)(mapping, groups)
    return (mode, windows) if windows is not None else None


def _conv_out_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _conv_weight(view, in_per_group, kernel, dtype):
    """The dense (out, in/groups, *kernel) weight of a B view: W = V^T reshaped (reference path only)."""
    return view.to(dtype).t().reshape(view.shape[1], in_per_group, *kernel)


def _lifted(x, kernel, stride, padding, dilation):
    """A batched conv1d problem as conv2d with height 1 (the kernels take 2-D and 3-D, unfold/fold 2-D)."""
    if len(kernel) > 1:
        return x, list(kernel), list(stride), list(padding), list(dilation)
    return x.unsqueeze(2), [1, kernel[0]], [1, stride[0]], [0, padding[0]], [1, dilation[0]]


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _check_dims(op: str, kernel, *others) -> None:
    if len(kernel) not in (1, 2, 3) or not all(len(v) == len(kernel) for v in others):
        raise ValueError(f"{op} takes 1, 2 or 3 spatial dims with one entry per dim in each of its geometry "
                         f"arguments, got kernel={list(kernel)} and {[list(v) for v in others]}")


def _batched(x, kernel):
    return x if x.dim() == len(kernel) + 2 else x.unsqueeze(0)


def _columns(x2, k2, s2, p2, d2, groups, g):
    """im2col of group g's input channels: (N, L, in/groups * kh * kw)."""
    per_group = x2.shape[1] // groups
    return F.unfold(x2[:, g * per_group:(g + 1) * per_group], k2, d2, p2, s2).transpose(1, 2)


@torch.library.custom_op("roastfx::roast_conv", mutates_args=())
def roast_conv(x: torch.Tensor, memory: torch.Tensor, mapping: list[int], scale: float, bias: torch.Tensor | None,
               kernel: list[int], stride: list[int], padding: list[int], dilation: list[int],
               groups: int, grad_norm: bool = False) -> torch.Tensor:
    """``F.conv1d/2d/3d(x, W, bias, stride, padding, dilation, groups)`` (by ``len(kernel)``) where
    W = V^T reshaped to (out, in/groups, *kernel) and V is the site's B view read from the memory.
    grad_norm: the memory gets the view's gradient divided by its RMS (grad_norm.py)."""
    _check_dims("roast_conv", kernel, stride, padding, dilation)
    return _conv_forward(x, memory, mapping, scale, bias, kernel, stride, padding, dilation, groups,
                         _triton_path(x, mapping, groups, len(kernel)))


def _conv_forward(x, memory, mapping, scale, bias, kernel, stride, padding, dilation, groups, path, row_scale=None):
    """roast_conv's conv (with ``row_scale``, roast_conv_row_scaled's: the view's rows scaled) on ``path``
    (`_triton_path`'s; None: the reference path)."""
    if path is None:
        view = gather_view(memory, _mapping(mapping), scale)
        view = view if row_scale is None else view * row_scale[:, None]
        weight = _conv_weight(view, x.shape[-len(kernel) - 1] // groups, kernel, x.dtype)
        # contiguous as the fake says (a channels_last x gives a channels_last output)
        return _CONV[len(kernel)](x, weight, bias, stride, padding, dilation, groups).contiguous()
    _kernels()
    xb = _batched(x, kernel)
    x2, k2, s2, p2, d2 = _lifted(xb, kernel, stride, padding, dilation)
    n = x2.shape[0]
    spatial = [_conv_out_size(*a) for a in zip(x2.shape[2:], k2, s2, p2, d2)]
    mode, windows = path
    if mode == "implicit":
        from .triton_conv import roast_conv_forward

        y = torch.empty((n, mapping[1], *spatial), device=x.device, dtype=x.dtype)
        roast_conv_forward(x2, memory, _mapping(mapping), scale, y, k2, s2, p2, d2, groups=groups, bias=bias,
                           row_scale=None if row_scale is None else row_scale.float().contiguous())
    else:
        width = mapping[1] // groups
        outs = []
        for g, window in enumerate(windows):
            cols = _columns(x2, k2, s2, p2, d2, groups, g)
            b = bias[g * width:(g + 1) * width] if bias is not None else None
            outs.append(torch.ops.roastfx.linear(cols, memory, b, None, window, scale, True, "none", False)[0])
        y = outs[0] if groups == 1 else torch.cat(outs, -1)  # (N, L, out)
        y = y.transpose(1, 2).reshape(n, mapping[1], *spatial)
    y = y.squeeze(2) if len(kernel) == 1 else y
    return y if xb is x else y.squeeze(0)


@roast_conv.register_fake
def _(x, memory, mapping, scale, bias, kernel, stride, padding, dilation, groups, grad_norm=False):
    spatial = [_conv_out_size(*a) for a in zip(x.shape[-len(kernel):], kernel, stride, padding, dilation)]
    return x.new_empty((*x.shape[:-len(kernel) - 1], mapping[1], *spatial))


def _bias_grad(grad: torch.Tensor) -> torch.Tensor:
    """A conv bias's gradient from the batched output gradient (N, C, *spatial), summed in fp32 for 16-bit."""
    accumulate = torch.float32 if grad.element_size() < 4 else grad.dtype
    return grad.sum((0, *range(2, grad.dim())), dtype=accumulate).to(grad.dtype)


def _conv_setup(ctx, inputs, output):
    x, memory, mapping, scale, bias, kernel, stride, padding, dilation, groups, grad_norm = inputs
    ctx.save_for_backward(x, memory)
    ctx.site = (mapping, scale, grad_norm)
    ctx.conv = (kernel, stride, padding, dilation, groups)
    ctx.has_bias = bias is not None


def _conv_backward(ctx, grad):
    x, memory = ctx.saved_tensors
    mapping, scale, grad_norm = ctx.site
    kernel, stride, padding, dilation, groups = ctx.conv
    need_x, need_memory = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gb = _batched(grad, kernel)
    grad_bias = _bias_grad(gb) if ctx.has_bias else None
    grad_x, grad_memory = _conv_grads(x, memory, grad, mapping, scale, ctx.conv, need_x, need_memory, grad_norm)
    return grad_x, grad_memory, None, None, grad_bias, None, None, None, None, None, None


def _conv_grads(x, memory, grad, mapping, scale, conv, need_x, need_memory, grad_norm):
    """(dX, dMemory) of a ROAST conv for the output gradient ``grad``: the GEMM kernels on the Triton
    path, the dense conv gradients elsewhere."""
    kernel, groups = conv[0], conv[4]
    xb, gb = _batched(x, kernel), _batched(grad, kernel)
    path = _triton_path(x, mapping, groups, len(kernel))
    if path is None:
        grad_x, grad_memory = _dense_conv_backward(xb, gb, memory, mapping, scale, conv, need_x, need_memory,
                                                   grad_norm)
    else:
        grad_x, grad_memory = _gemm_conv_backward(xb, gb, memory, mapping, path, scale, conv, need_x,
                                                  need_memory, grad_norm)
    return (grad_x.reshape(x.shape) if grad_x is not None else None), grad_memory


def _gemm_conv_backward(xb, gb, memory, mapping, path, scale, conv, need_x, need_memory, grad_norm):
    """dX and dMemory by the Triton kernels (with grad_norm, the memory gradient is divided by the RMS of the
    whole view's gradient: per group the sums of squares add up)."""
    _kernels()
    kernel, stride, padding, dilation, groups = conv
    x2, k2, s2, p2, d2 = _lifted(xb, kernel, stride, padding, dilation)
    g2 = (gb.unsqueeze(2) if len(kernel) == 1 else gb).to(xb.dtype)
    geometry = (k2, s2, p2, d2)
    grad_x = grad_memory = sumsq = None
    mode, windows = path
    if mode == "implicit":
        if need_x:
            grad_x = torch.ops.roastfx.conv_grad_input(g2, memory, mapping, scale, list(x2.shape), *geometry, groups)
        if need_memory:
            grad_memory, sumsq = torch.ops.roastfx.conv_grad_memory(x2, g2, memory, mapping, scale, *geometry,
                                                                    groups, grad_norm)
    else:
        grad_x, grad_memory, sumsq = _im2col_grads(x2, g2, memory, windows, scale, geometry, need_x, need_memory,
                                                   grad_norm)
    if need_memory and grad_norm:
        grad_memory = normalize(grad_memory, rms_from_sumsq(sumsq, mapping[0] * mapping[1]))
    return grad_x, grad_memory


def _im2col_grads(x2, g2, memory, windows, scale, geometry, need_x, need_memory, grad_norm):
    """(dX, dMemory, sum of dV^2 or None) by the GEMM kernels around F.fold / F.unfold, group by group."""
    k2, s2, p2, d2 = geometry
    n, _, h, w = x2.shape
    groups = len(windows)
    width = g2.shape[1] // groups
    grad_xs, grad_memory, sumsq = [], None, 0.0
    for g, window in enumerate(windows):
        grad_g = g2[:, g * width:(g + 1) * width].reshape(n, width, -1).transpose(1, 2).reshape(-1, width)
        grad_g = grad_g.contiguous()
        if need_x:
            grad_cols = torch.ops.roastfx.linear_grad_input(grad_g, memory, window, scale, True)
            grad_cols = grad_cols.reshape(n, -1, grad_cols.shape[-1]).transpose(1, 2)
            grad_xs.append(F.fold(grad_cols, (h, w), k2, d2, p2, s2))
        if need_memory:
            cols = _columns(x2, k2, s2, p2, d2, groups, g)
            args = (cols.reshape(-1, cols.shape[-1]), grad_g, memory, window, scale, True)
            if grad_norm:
                part, window_sumsq = torch.ops.roastfx.linear_grad_memory_sumsq(*args)
                sumsq = sumsq + window_sumsq
            else:
                part = torch.ops.roastfx.linear_grad_memory(*args)
            grad_memory = part if grad_memory is None else grad_memory + part
    grad_x = (grad_xs[0] if groups == 1 else torch.cat(grad_xs, 1)) if need_x else None
    return grad_x, grad_memory, sumsq


# The implicit-GEMM kernels as ops (2-D or 3-D), in the terms of a conv C whose (in/groups * kernel size, out)
# weight view is
# the site's view, or its transpose (``transposed``: the site is a transposed conv, which is C's adjoint);
# each is one launch for all groups. Backward formulas call them, so AOTAutograd sees opaque ops, not Triton launches.
@torch.library.custom_op("roastfx::conv_implicit", mutates_args=())
def _conv_implicit(x: torch.Tensor, memory: torch.Tensor, mapping: list[int], scale: float,
                     output_size: list[int], kernel: list[int], stride: list[int], padding: list[int],
                     dilation: list[int], groups: int, transposed: bool) -> torch.Tensor:
    """C(x) (``output_size``, x's dtype), no bias (triton_conv.roast_conv_forward)."""
    from .triton_conv import roast_conv_forward

    return roast_conv_forward(x, memory.reshape(-1), _mapping(mapping), scale, x.new_empty(output_size), kernel, stride,
                        padding, dilation, groups=groups, view_is_b=not transposed)


@_conv_implicit.register_fake
def _(x, memory, mapping, scale, output_size, kernel, stride, padding, dilation, groups, transposed):
    return x.new_empty(output_size)


@torch.library.custom_op("roastfx::conv_grad_input", mutates_args=())
def _conv_grad_input(grad: torch.Tensor, memory: torch.Tensor, mapping: list[int], scale: float,
                       input_size: list[int], kernel: list[int], stride: list[int], padding: list[int],
                       dilation: list[int], groups: int, transposed: bool = False,
                       row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """C's input gradient (``input_size``, grad's dtype) for its output gradient ``grad`` (with
    ``transposed``, the transposed conv's forward; with the fp32 ``row_scale``, C's view rows scaled as in
    roast_conv_row_scaled) (triton_conv.roast_conv_grad_input)."""
    from .triton_conv import roast_conv_grad_input

    return roast_conv_grad_input(grad, memory.reshape(-1), _mapping(mapping), scale, grad.new_empty(input_size),
                                   kernel, stride, padding, dilation, groups=groups, transposed=transposed,
                                   row_scale=row_scale)


@_conv_grad_input.register_fake
def _(grad, memory, mapping, scale, input_size, kernel, stride, padding, dilation, groups, transposed=False,
      row_scale=None):
    return grad.new_empty(input_size)


@torch.library.custom_op("roastfx::conv_row_scaled_grad_memory", mutates_args=())
def _conv_row_scaled_grad_memory(x: torch.Tensor, grad: torch.Tensor, memory: torch.Tensor, mapping: list[int],
                                 scale: float, row_scale: torch.Tensor, kernel: list[int], stride: list[int],
                                 padding: list[int], dilation: list[int],
                                 groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dMemory in memory's dtype, d(row_scale) in fp32) of roast_conv_row_scaled on the Triton path
    (triton_conv.roast_conv_row_scaled_grad_memory)."""
    from .triton_conv import roast_conv_row_scaled_grad_memory

    grad_memory, grad_rows = roast_conv_row_scaled_grad_memory(x, grad, memory.reshape(-1), _mapping(mapping), scale,
                                                               row_scale, kernel, stride, padding, dilation,
                                                               groups=groups)
    return grad_memory.to(memory.dtype).reshape(memory.shape), grad_rows


@_conv_row_scaled_grad_memory.register_fake
def _(x, grad, memory, mapping, scale, row_scale, kernel, stride, padding, dilation, groups):
    return torch.empty_like(memory), torch.empty_like(row_scale)


@torch.library.custom_op("roastfx::conv_grad_memory", mutates_args=())
def _conv_grad_memory(x: torch.Tensor, grad: torch.Tensor, memory: torch.Tensor, mapping: list[int],
                        scale: float, kernel: list[int], stride: list[int], padding: list[int], dilation: list[int],
                        groups: int, sumsq: bool, transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(dMemory in memory's dtype, sum of the view gradient's squares as a float64 0-d tensor, 0 unless
    ``sumsq``) of C at input ``x`` for its output gradient ``grad`` (triton_conv.roast_conv_grad_memory)."""
    from .triton_conv import roast_conv_grad_memory

    grad_memory, squares = roast_conv_grad_memory(x, grad, memory.numel(), _mapping(mapping), scale, kernel, stride,
                                                    padding, dilation, groups=groups, sumsq=sumsq,
                                                    transposed=transposed)
    squares = squares if sumsq else x.new_zeros((), dtype=torch.float64)
    return grad_memory.to(memory.dtype).reshape(memory.shape), squares


@_conv_grad_memory.register_fake
def _(x, grad, memory, mapping, scale, kernel, stride, padding, dilation, groups, sumsq, transposed=False):
    return torch.empty_like(memory), x.new_empty((), dtype=torch.float64)


@torch.library.custom_op("roastfx::conv_dense_grads", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def _conv_dense_grads(x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, stride: list[int],
                      padding: list[int], dilation: list[int], groups: int, need_x: bool,
                      need_weight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dX, dW) of a dense conv (an empty tensor for one not needed): aten.convolution_backward behind an
    opaque op with a flexible layout. Called directly in a compiled backward under dynamic shapes, inductor
    fails on its stride constraints for some producers of ``grad`` (a GroupNorm's backward: ValueRangeError)."""
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        grad, x, weight, None, stride, padding, dilation, False, [0] * len(stride), groups,
        [need_x, need_weight, False])
    # contiguous, as the fake says (a channels_last x gets a channels_last dX from aten)
    return (grad_x.contiguous() if need_x else x.new_empty(0)), \
        (grad_w.contiguous() if need_weight else weight.new_empty(0))


@_conv_dense_grads.register_fake
def _(x, grad, weight, stride, padding, dilation, groups, need_x, need_weight):
    return (torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else x.new_empty(0)), \
        (torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight else weight.new_empty(0))


def _dense_conv_backward(xb, gb, memory, mapping, scale, conv, need_x, need_memory, grad_norm):
    kernel, stride, padding, dilation, groups = conv
    weight = _conv_weight(materialize(memory, mapping, scale), xb.shape[1] // groups, kernel, xb.dtype)
    grad_memory = None
    grad_x, grad_w = torch.ops.roastfx.conv_dense_grads(xb, gb, weight, list(stride), list(padding),
                                                        list(dilation), groups, need_x, need_memory)
    grad_x = grad_x if need_x else None
    if need_memory:
        grad_view = grad_w.reshape(grad_w.shape[0], -1).t()
        if grad_norm:
            grad_view = normalize(grad_view, site_grad_rms(grad_view))
        grad_memory = _memory_grad_op(grad_view, mapping, scale, memory.numel()).to(memory.dtype)
    return grad_x, grad_memory


roast_conv.register_autograd(_conv_backward, setup_context=_conv_setup)


# -- a conv whose weight's slices are scaled: weight norm over a dim inside the reduction -----------------
def _check_row_scale(row_scale: torch.Tensor, mapping: list[int]) -> None:
    if row_scale.dim() != 1 or row_scale.shape[0] != mapping[0] or not row_scale.is_floating_point():
        raise ValueError(f"row_scale must be a floating (in/groups * kernel size,) = ({mapping[0]},) tensor, one "
                         f"value per row of the weight's view, got {row_scale.dtype} {tuple(row_scale.shape)}")


def row_scaled_conv(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
                    dilation=1, groups: int = 1, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.conv1d/2d/3d`` (by the weight's dims, same arguments) of the weight with each (input channel,
    kernel tap) slice ``weight[:, c, *tap]`` multiplied by ``row_scale[c * taps + tap]``: what
    passes/split_weight_norm.py writes for weight norm over a dim inside the conv's reduction, in torch ops
    (the dense meaning). passes/fuse_roast_ops.py turns it into ``roastfx::roast_conv_row_scaled`` when the
    weight is a site's read."""
    scaled = weight * row_scale.reshape(1, *weight.shape[1:]).to(weight.dtype)
    return _CONV[weight.dim() - 2](input, scaled, bias, stride, padding, dilation, groups)


def weight_norm_row_scale(g: torch.Tensor, row_sumsq: torch.Tensor, weight_shape: list[int], dim: int) -> torch.Tensor:
    """``g / norm`` of ``torch._weight_norm(v, g, dim)`` for a conv weight v of ``weight_shape`` (out,
    in/groups, *kernel) and 1 <= dim < len(weight_shape), given the squared norms of the rows of v's B view
    (one per (input channel, kernel tap), summed over the output channels): one factor per view row, flat,
    in g's dtype."""
    inner = list(weight_shape[1:])
    factor = weight_norm_inner_scale(g, row_sumsq, weight_shape, dim)
    shape = [1] * len(inner)
    shape[dim - 1] = -1
    return factor.reshape(shape).expand(inner).reshape(-1)


@torch.library.custom_op("roastfx::roast_conv_row_scaled", mutates_args=())
def roast_conv_row_scaled(x: torch.Tensor, memory: torch.Tensor, mapping: list[int], scale: float,
                          row_scale: torch.Tensor, bias: torch.Tensor | None, kernel: list[int], stride: list[int],
                          padding: list[int], dilation: list[int], groups: int) -> torch.Tensor:
    """``roast_conv`` whose weight is (V * row_scale[:, None])^T reshaped: row r = (input channel, kernel tap)
    of the B view scaled by ``row_scale[r]``. Weight norm over a dim other than the output channels
    (Wav2Vec2's positional conv normalizes per kernel tap) scales the weight along the conv's reduction, so
    the scale cannot move out of the op; here the Triton kernels multiply each B row by its scale as they
    read it (forward, dX), and the memory gradient's kernel also returns the scale's gradient
    (triton_conv.py). Always the implicit kernels on the Triton path (ROASTFX_CONV=im2col included); the
    reference path materializes the scaled weight."""
    _check_dims("roast_conv_row_scaled", kernel, stride, padding, dilation)
    _check_row_scale(row_scale, mapping)
    return _conv_forward(x, memory, mapping, scale, bias, kernel, stride, padding, dilation, groups,
                         ("implicit", None) if use_triton(x) else None, row_scale)


@roast_conv_row_scaled.register_fake
def _(x, memory, mapping, scale, row_scale, bias, kernel, stride, padding, dilation, groups):
    spatial = [_conv_out_size(*a) for a in zip(x.shape[-len(kernel):], kernel, stride, padding, dilation)]
    return x.new_empty((*x.shape[:-len(kernel) - 1], mapping[1], *spatial))


def _row_scaled_setup(ctx, inputs, output):
    x, memory, mapping, scale, row_scale, bias, kernel, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, memory, row_scale)
    ctx.site = (mapping, scale)
    ctx.conv = (kernel, stride, padding, dilation, groups)
    ctx.has_bias = bias is not None


def _row_scaled_backward(ctx, grad):
    x, memory, row_scale = ctx.saved_tensors
    mapping, scale = ctx.site
    kernel, stride, padding, dilation, groups = ctx.conv
    need_x, need_memory, need_rows = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[4]
    xb, gb = _batched(x, kernel), _batched(grad, kernel)
    grad_bias = _bias_grad(gb) if ctx.has_bias else None
    grad_x = grad_memory = grad_rows = None
    if use_triton(x):
        _kernels()
        x2, k2, s2, p2, d2 = _lifted(xb, kernel, stride, padding, dilation)
        g2 = (gb.unsqueeze(2) if len(kernel) == 1 else gb).to(xb.dtype)
        rows = row_scale.float().contiguous()
        if need_x:
            grad_x = torch.ops.roastfx.conv_grad_input(g2, memory, mapping, scale, list(x2.shape), k2, s2, p2, d2,
                                                       groups, False, rows)
        if need_memory or need_rows:
            grad_memory, grad_rows = torch.ops.roastfx.conv_row_scaled_grad_memory(x2, g2, memory, mapping, scale,
                                                                                   rows, k2, s2, p2, d2, groups)
    else:
        view = materialize(memory, mapping, scale)
        weight = _conv_weight(view * row_scale[:, None], xb.shape[1] // groups, kernel, xb.dtype)
        grad_x, grad_w = torch.ops.roastfx.conv_dense_grads(xb, gb, weight, list(stride), list(padding),
                                                            list(dilation), groups, need_x, need_memory or need_rows)
        grad_x = grad_x if need_x else None
        if need_memory or need_rows:
            wide = torch.promote_types(view.dtype, torch.float32)  # 16-bit views: the sums in fp32
            grad_view = grad_w.reshape(grad_w.shape[0], -1).t().to(wide)
            grad_rows = (grad_view * view.to(wide)).sum(1)
            grad_memory = _memory_grad_op(grad_view * row_scale[:, None].to(wide), mapping, scale, memory.numel())
    grad_x = grad_x.reshape(x.shape) if grad_x is not None else None
    grad_memory = grad_memory.to(memory.dtype).reshape(memory.shape) if need_memory else None
    grad_rows = grad_rows.to(row_scale.dtype) if need_rows else None
    return grad_x, grad_memory, None, None, grad_rows, grad_bias, None, None, None, None, None


roast_conv_row_scaled.register_autograd(_row_scaled_backward, setup_context=_row_scaled_setup)


# -- a conv followed by a generated epilogue -------------------------------------------------------------
_EPILOGUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _epilogue_kernel_takes(x, memory, out_dtype, extras) -> bool:
    """Whether a generated conv kernel can run this epilogue: kernel dtypes, float64 only as 0-dim extras,
    extras on x's device (or 0-dim)."""
    return (x.dtype in _EPILOGUE_DTYPES and memory.dtype in _EPILOGUE_DTYPES and out_dtype in _EPILOGUE_DTYPES
            and all(e.dtype != torch.float64 or e.dim() == 0 for e in extras)
            and all(e.device == x.device or e.dim() == 0 for e in extras))


def _extras_2d(extras, conv1d: bool):
    """Extras of a conv1d output (N, C, L) as extras of its (N, C, 1, L) conv2d form."""
    return [e.unsqueeze(-2) if conv1d and e.dim() >= 2 else e for e in extras]


@torch.library.custom_op("roastfx::roast_conv_epilogue", mutates_args=())
def roast_conv_epilogue(x: torch.Tensor, memory: torch.Tensor, mapping: list[int], scale: float,
                        extras: list[torch.Tensor], epilogue: str, kernel: list[int], stride: list[int],
                        padding: list[int], dilation: list[int], groups: int, grad_norm: bool) -> torch.Tensor:
    """``epilogue(roast_conv(x, memory, mapping, scale, None, ...), extras)``: on the Triton path one
    generated kernel launch computes the conv of every group and the epilogue
    (triton_epilogue.roast_conv_epilogue)."""
    from .epilogue_op import parse_epilogue

    epi = parse_epilogue(epilogue)
    out_dtype = epi.out_dtype(x.dtype, extras)
    kernel_ok = use_triton(x) and _epilogue_kernel_takes(x, memory, out_dtype, extras)
    if not kernel_ok:
        y = epi.apply(roast_conv(x, memory, mapping, scale, None, kernel, stride, padding, dilation, groups,
                                 grad_norm), extras)
        y = y.contiguous()  # as the fake (extras in channels_last keep their layout through the epilogue)
        return y.clone() if any(y is t for t in (x, *extras)) else y
    _kernels()
    from .triton_epilogue import roast_conv_epilogue as launch

    xb = _batched(x, kernel)
    x2, k2, s2, p2, d2 = _lifted(xb, kernel, stride, padding, dilation)
    spatial = [_conv_out_size(*a) for a in zip(x2.shape[2:], k2, s2, p2, d2)]
    return _run_generated(launch, x, xb, x2, (k2, s2, p2, d2), memory, mapping, scale, mapping[1], spatial, epi,
                          extras, out_dtype, groups, len(kernel))


def _run_generated(launch, x, xb, x2, geometry, memory, mapping, scale, channels, spatial, epi, extras, out_dtype,
                   groups, dims):
    """Run a generated conv-kind kernel (``launch``: triton_epilogue.roast_conv_epilogue or
    roast_transposed_conv_epilogue) on the lifted problem ``x2`` (conv1d as height 1, batched): allocate the
    (N, channels, *spatial) output, check the extras against the caller's output shape, and return that shape
    (a conv1d's height and an unbatched input's batch squeezed)."""
    n = x2.shape[0]
    y = torch.empty((n, channels, *spatial), device=x.device, dtype=out_dtype)
    shape = (n, channels, *spatial) if dims > 1 else (n, channels, spatial[1])
    epi.check_extras(shape if xb is x else shape[1:], extras)
    launch(x2, memory, _mapping(mapping), scale, y, *geometry, epi, _extras_2d(extras, dims == 1), groups=groups)
    y = y.squeeze(2) if dims == 1 else y
    return y if xb is x else y.squeeze(0)


@roast_conv_epilogue.register_fake
def _(x, memory, mapping, scale, extras, epilogue, kernel, stride, padding, dilation, groups, grad_norm):
    from .epilogue_op import parse_epilogue

    epi = parse_epilogue(epilogue)
    spatial = [_conv_out_size(*a) for a in zip(x.shape[-len(kernel):], kernel, stride, padding, dilation)]
    shape = (*x.shape[:-len(kernel) - 1], mapping[1], *spatial)
    epi.check_extras(shape, extras)
    return x.new_empty(shape, dtype=epi.out_dtype(x.dtype, extras))


def _conv_epilogue_setup(ctx, inputs, output):
    x, memory, mapping, scale, extras, epilogue, kernel, stride, padding, dilation, groups, grad_norm = inputs
    ctx.save_for_backward(x, memory, *extras)
    ctx.site = (mapping, scale, epilogue, kernel, stride, padding, dilation, groups, grad_norm)


def _conv_epilogue_backward(ctx, grad):
    """The vjp of ``epilogue(roast_conv(...))`` at the saved inputs: the epilogue's (torch.func.vjp of its
    eager form), then the conv's gradients as roast_conv's backward computes them."""
    from .epilogue_op import parse_epilogue

    x, memory, *extras = ctx.saved_tensors
    mapping, scale, epilogue, kernel, stride, padding, dilation, groups, grad_norm = ctx.site
    epi = parse_epilogue(epilogue)
    # the epilogue's vjp at the recomputed conv (not kept from the forward), then the conv's own gradients
    with torch.no_grad():
        pre = roast_conv(x, memory, mapping, scale, None, kernel, stride, padding, dilation, groups, grad_norm)
    grad_pre, grad_extras = epi.vjp(pre, extras, grad)
    conv = (kernel, stride, padding, dilation, groups)
    grad_x, grad_memory = _conv_grads(x, memory, grad_pre.to(x.dtype), mapping, scale, conv,
                                      ctx.needs_input_grad[0], ctx.needs_input_grad[1], grad_norm)
    return grad_x, grad_memory, None, None, grad_extras, None, None, None, None, None, None, None


roast_conv_epilogue.register_autograd(_conv_epilogue_backward, setup_context=_conv_epilogue_setup)


# -- transposed convolution ------------------------------------------------------------------------------
def _transposed_out_size(size, kernel, stride, padding, output_padding, dilation):
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


def _transposed_lifted(x, kernel, stride, padding, output_padding, dilation):
    """A conv_transpose1d problem as 2-D with height 1 (the kernels take 2-D and 3-D, fold/unfold 2-D)."""
    if len(kernel) > 1:
        return x, list(kernel), list(stride), list(padding), list(output_padding), list(dilation)
    return (x.unsqueeze(2), [1, kernel[0]], [1, stride[0]], [0, padding[0]], [0, output_padding[0]],
            [1, dilation[0]])


@torch.library.custom_op("roastfx::roast_conv_transpose", mutates_args=())
def roast_conv_transpose(x: torch.Tensor, memory: torch.Tensor, mapping: list[int], scale: float,
                         bias: torch.Tensor | None, kernel: list[int], stride: list[int], padding: list[int],
                         output_padding: list[int], dilation: list[int], groups: int = 1,
                         grad_norm: bool = False) -> torch.Tensor:
    """``F.conv_transpose1d/2d/3d(x, W, bias, stride, padding, output_padding, groups, dilation)`` (by
    ``len(kernel)``) where W = V reshaped to (in, out/groups, *kernel) and V is the site's (in, out/groups *
    prod(kernel)) view. On the Triton path W is never built: the forward is the implicit-GEMM conv
    input-gradient kernel reading V transposed, the backward the implicit conv (dX) and weight-gradient
    (dMemory) kernels, each one launch for all groups. ROASTFX_CONV=im2col: per group, the ROAST GEMM's
    columns summed by F.fold, F.unfold backward, where each group's rows of V start on hash-tile boundaries
    (``ops.row_windows``; 1-D and 2-D). Elsewhere the op materializes W and runs the dense op."""
    _check_dims("roast_conv_transpose", kernel, stride, padding, output_padding, dilation)
    xb = _batched(x, kernel)
    path = _triton_path(x, mapping, groups, len(kernel), transposed=True)
    if path is None:
        weight = gather_view(memory, _mapping(mapping), scale).to(x.dtype).reshape(mapping[0], -1, *kernel)
        return _CONV_TRANSPOSE[len(kernel)](x, weight, bias, stride, padding, output_padding, groups,
                                            dilation).contiguous()
    mode, windows = path
    _kernels()
    x2, k2, s2, p2, o2, d2 = _transposed_lifted(xb, kernel, stride, padding, output_padding, dilation)
    n, c = x2.shape[:2]
    size = [_transposed_out_size(*a) for a in zip(x2.shape[2:], k2, s2, p2, o2, d2)]
    out_channels = mapping[1] // math.prod(kernel) * groups
    if mode == "implicit":  # the generated transposed-conv kernel, the bias its epilogue
        from .epilogue import Epilogue
        from .triton_epilogue import roast_transposed_conv_epilogue

        extras = [bias.reshape(-1, *[1] * len(kernel))] if bias is not None else []
        return _run_generated(roast_transposed_conv_epilogue, x, xb, x2, (k2, s2, p2, d2), memory, mapping, scale,
                              out_channels, size, Epilogue.parse("add:x0" if bias is not None else ""), extras,
                              x.dtype, groups, len(kernel))
    outs = []
    for g, window in enumerate(windows):
        rows = x2[:, g * c // groups:(g + 1) * c // groups].flatten(2).transpose(1, 2)  # (N, H*W, in/groups)
        cols = torch.ops.roastfx.linear(rows, memory, None, None, window, scale, True, "none", False)[0]
        outs.append(_fold_transposed(cols.transpose(1, 2), x2.shape[2:], size, k2, s2, p2, d2))
    y = outs[0] if groups == 1 else torch.cat(outs, 1)
    if bias is not None:
        y = y + bias.to(y.dtype).reshape(1, -1, *[1] * (y.dim() - 2))
    y = y.squeeze(2) if len(kernel) == 1 else y
    return y if xb is x else y.squeeze(0)


@roast_conv_transpose.register_fake
def _(x, memory, mapping, scale, bias, kernel, stride, padding, output_padding, dilation, groups=1, grad_norm=False):
    spatial = [_transposed_out_size(*a) for a in zip(x.shape[-len(kernel):], kernel, stride, padding, output_padding,
                                                     dilation)]
    return x.new_empty((*x.shape[:-len(kernel) - 1], mapping[1] // math.prod(kernel) * groups, *spatial))


def _conv_transpose_setup(ctx, inputs, output):
    x, memory, mapping, scale, bias, kernel, stride, padding, output_padding, dilation, groups, grad_norm = inputs
    ctx.save_for_backward(x, memory)
    ctx.site = (mapping, scale, grad_norm, bias is not None)
    ctx.conv = (kernel, stride, padding, output_padding, dilation, groups)


def _conv_transpose_backward(ctx, grad):
    """The gradients of x, the memory and the bias (the sum of dY)."""
    x, memory = ctx.saved_tensors
    mapping, scale, grad_norm, has_bias = ctx.site
    kernel = ctx.conv[0]
    gb = _batched(grad, kernel)
    grad_bias = _bias_grad(gb) if has_bias else None
    grad_x, grad_memory = _conv_transpose_grads(x, memory, grad, mapping, scale, ctx.conv, ctx.needs_input_grad[0],
                                                ctx.needs_input_grad[1], grad_norm)
    return grad_x, grad_memory, None, None, grad_bias, None, None, None, None, None, None, None


def _conv_transpose_grads(x, memory, grad, mapping, scale, conv, need_x, need_memory, grad_norm):
    """(dX, dMemory) of a ROAST transposed conv for its output gradient ``grad``: dX is the conv of dY with W,
    dMemory the conv weight gradient with dY as the conv's input and x as its output gradient, read into V
    transposed. The reference path differentiates the dense op at the materialized weight."""
    kernel, stride, padding, output_padding, dilation, groups = conv
    path = _triton_path(x, mapping, groups, len(kernel), transposed=True)
    if path is None:
        dense = _CONV_TRANSPOSE[len(kernel)]
        view = materialize(memory, mapping, scale).to(x.dtype)  # the op, opaque to tracing
        weight = view.reshape(mapping[0], -1, *kernel)
        _, pullback = torch.func.vjp(
            lambda xv, wv: dense(xv, wv, None, stride, padding, output_padding, groups, dilation), x, weight)
        grad_x, grad_weight = pullback(grad.to(x.dtype))
        grad_view = grad_weight.reshape(view.shape)
        if grad_norm:
            grad_view = normalize(grad_view, site_grad_rms(grad_view))
        grad_memory = _memory_grad_op(grad_view, mapping, scale, memory.numel()).to(memory.dtype)
        return (grad_x if need_x else None), (grad_memory if need_memory else None)
    _kernels()
    xb = _batched(x, kernel)
    x2, k2, s2, p2, _, d2 = _transposed_lifted(xb, kernel, stride, padding, output_padding, dilation)
    gb = _batched(grad, kernel)
    g2 = (gb.unsqueeze(2) if len(kernel) == 1 else gb).to(x.dtype)
    grad_x = grad_memory = sumsq = None
    mode, windows = path
    if mode == "implicit":
        if need_x:
            grad_x = torch.ops.roastfx.conv_implicit(g2, memory, mapping, scale, list(x2.shape), k2, s2, p2, d2,
                                                     groups, True)
        if need_memory:
            grad_memory, sumsq = torch.ops.roastfx.conv_grad_memory(g2, x2, memory, mapping, scale, k2, s2, p2, d2,
                                                                    groups, grad_norm, True)
    else:
        grad_x, grad_memory, sumsq = _transposed_im2col_grads(x2, g2, memory, windows, scale, (k2, s2, p2, d2),
                                                              need_x, need_memory, grad_norm)
    if need_memory and grad_norm:
        grad_memory = normalize(grad_memory, rms_from_sumsq(sumsq, mapping[0] * mapping[1]))
    return (grad_x.reshape(x.shape) if grad_x is not None else None), grad_memory


def _uncropped(in_size, kernel, stride, dilation) -> list[int]:
    """A transposed conv's output size before the padding crops it (and output_padding extends it)."""
    return [(i - 1) * s + d * (k - 1) + 1 for i, k, s, d in zip(in_size, kernel, stride, dilation)]


def _fold_transposed(cols, in_size, size, kernel, stride, padding, dilation):
    """F.fold of a transposed conv's columns into its output of ``size`` (output_padding included): folded
    at the uncropped size, then cropped by the padding and zero-extended where output_padding reaches past
    it. (F.fold at ``size`` with the padding counts its blocks from ``size``, one too many once
    output_padding >= stride, which dilation > stride allows.)"""
    full = _uncropped(in_size, kernel, stride, dilation)
    y = F.fold(cols, full, kernel, dilation, 0, stride)
    return F.pad(y, (-padding[1], size[1] + padding[1] - full[1], -padding[0], size[0] + padding[0] - full[0]))


def _unfold_transposed(grad, in_size, kernel, stride, padding, dilation):
    """The adjoint of `_fold_transposed`: the columns of the output gradient ``grad`` (N, C, *size)."""
    full = _uncropped(in_size, kernel, stride, dilation)
    size = grad.shape[2:]
    grad = F.pad(grad, (padding[1], full[1] - padding[1] - size[1], padding[0], full[0] - padding[0] - size[0]))
    return F.unfold(grad, kernel, dilation, 0, stride)


def _transposed_im2col_grads(x2, g2, memory, windows, scale, geometry, need_x, need_memory, grad_norm):
    """(dX, dMemory, sum of dV^2 or None) per group: the columns of dY (F.unfold) @ V^T, and x^T @ them."""
    k2, s2, p2, d2 = geometry
    n, c = x2.shape[:2]
    groups = len(windows)
    per_group, width = c // groups, g2.shape[1] // groups
    grad_xs, grad_memory, sumsq = [], None, 0.0
    for g, window in enumerate(windows):
        cols = _unfold_transposed(g2[:, g * width:(g + 1) * width], x2.shape[2:], k2, s2, p2, d2)
        cols = cols.transpose(1, 2).reshape(-1, window[1])
        cols = cols.contiguous()
        if need_x:
            grad_rows = torch.ops.roastfx.linear_grad_input(cols, memory, window, scale, True)  # (N*H*W, in/groups)
            grad_xs.append(grad_rows.reshape(n, -1, per_group).transpose(1, 2))
        if need_memory:
            rows = x2[:, g * per_group:(g + 1) * per_group].flatten(2).transpose(1, 2).reshape(-1, per_group)
            if grad_norm:
                part, window_sumsq = torch.ops.roastfx.linear_grad_memory_sumsq(rows, cols, memory, window, scale, True)
                sumsq = sumsq + window_sumsq
            else:
                part = torch.ops.roastfx.linear_grad_memory(rows, cols, memory, window, scale, True)
            grad_memory = part if grad_memory is None else grad_memory + part
    grad_x = torch.cat(grad_xs, 1).reshape(x2.shape) if need_x else None
    return grad_x, grad_memory, sumsq


roast_conv_transpose.register_autograd(_conv_transpose_backward, setup_context=_conv_transpose_setup)


# -- a transposed conv followed by a generated epilogue ---------------------------------------------------
@torch.library.custom_op("roastfx::roast_conv_transpose_epilogue", mutates_args=())
def roast_conv_transpose_epilogue(x: torch.Tensor, memory: torch.Tensor, mapping: list[int], scale: float,
                                  extras: list[torch.Tensor], epilogue: str, kernel: list[int], stride: list[int],
                                  padding: list[int], output_padding: list[int], dilation: list[int], groups: int,
                                  grad_norm: bool) -> torch.Tensor:
    """``epilogue(roast_conv_transpose(x, memory, mapping, scale, None, ...), extras)``: on the Triton path (implicit
    mode) one generated kernel launch computes the transposed conv of every group and the epilogue
    (triton_epilogue.roast_transposed_conv_epilogue)."""
    from .epilogue_op import parse_epilogue

    epi = parse_epilogue(epilogue)
    conv = (kernel, stride, padding, output_padding, dilation, groups)
    out_dtype = epi.out_dtype(x.dtype, extras)
    path = _triton_path(x, mapping, groups, len(kernel), transposed=True)
    kernel_ok = (path is not None and path[0] == "implicit" and _epilogue_kernel_takes(x, memory, out_dtype, extras))
    if not kernel_ok:
        y = epi.apply(roast_conv_transpose(x, memory, mapping, scale, None, *conv, grad_norm), extras)
        y = y.contiguous()  # as the fake (extras in channels_last keep their layout through the epilogue)
        return y.clone() if any(y is t for t in (x, *extras)) else y
    _kernels()
    from .triton_epilogue import roast_transposed_conv_epilogue as launch

    xb = _batched(x, kernel)
    x2, k2, s2, p2, o2, d2 = _transposed_lifted(xb, kernel, stride, padding, output_padding, dilation)
    size = [_transposed_out_size(*a) for a in zip(x2.shape[2:], k2, s2, p2, o2, d2)]
    return _run_generated(launch, x, xb, x2, (k2, s2, p2, d2), memory, mapping, scale,
                          mapping[1] // math.prod(kernel) * groups, size, epi, extras, out_dtype, groups, len(kernel))


@roast_conv_transpose_epilogue.register_fake
def _(x, memory, mapping, scale, extras, epilogue, kernel, stride, padding, output_padding, dilation, groups,
      grad_norm):
    from .epilogue_op import parse_epilogue

    epi = parse_epilogue(epilogue)
    spatial = [_transposed_out_size(*a) for a in zip(x.shape[-len(kernel):], kernel, stride, padding, output_padding,
                                                     dilation)]
    shape = (*x.shape[:-len(kernel) - 1], mapping[1] // math.prod(kernel) * groups, *spatial)
    epi.check_extras(shape, extras)
    return x.new_empty(shape, dtype=epi.out_dtype(x.dtype, extras))


def _conv_transpose_epilogue_setup(ctx, inputs, output):
    x, memory, mapping, scale, extras, epilogue, kernel, stride, padding, output_padding, dilation, groups, \
        grad_norm = inputs
    ctx.save_for_backward(x, memory, *extras)
    ctx.site = (mapping, scale, epilogue, (kernel, stride, padding, output_padding, dilation, groups), grad_norm)


def _conv_transpose_epilogue_backward(ctx, grad):
    """The epilogue's vjp at the recomputed transposed conv, then the transposed conv's own gradients."""
    from .epilogue_op import parse_epilogue

    x, memory, *extras = ctx.saved_tensors
    mapping, scale, epilogue, conv, grad_norm = ctx.site
    with torch.no_grad():
        pre = roast_conv_transpose(x, memory, mapping, scale, None, *conv, grad_norm)
    grad_pre, grad_extras = parse_epilogue(epilogue).vjp(pre, extras, grad)
    grad_x, grad_memory = _conv_transpose_grads(x, memory, grad_pre.to(x.dtype), mapping, scale, conv,
                                                ctx.needs_input_grad[0], ctx.needs_input_grad[1], grad_norm)
    return grad_x, grad_memory, None, None, grad_extras, None, None, None, None, None, None, None, None


roast_conv_transpose_epilogue.register_autograd(_conv_transpose_epilogue_backward,
                                                setup_context=_conv_transpose_epilogue_setup)
