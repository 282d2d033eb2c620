"""``roastfx::roast_conv``: conv1d/conv2d whose weight is read from the memory.

The conv weight W (out, in/groups, *kernel) is V^T reshaped, V being the site's
(in/groups*prod(kernel), out) B view. On the Triton path W is never built: the forward
is an implicit GEMM that reads the input in place (triton_conv.py; ROASTFX_CONV=im2col
runs F.unfold and the fused ROAST GEMM instead), and the backward is im2col/col2im
around the ROAST dX and dMemory kernels; a grouped conv runs one GEMM per group on the
group's column window of V when the window starts on hash-tile boundaries
(``ops.column_windows``). Elsewhere the op materializes W and runs the dense conv.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from .grad_norm import normalize, rms_from_sumsq, site_grad_rms
from .ops import _kernels, _mapping, _memory_grad_op, column_windows, materialize, use_triton
from .reference import materialize as _materialize


CONV_MODES = ("implicit", "im2col")


def conv_mode() -> str:
    """How the Triton path runs a conv's forward (ROASTFX_CONV): ``implicit`` (default), one implicit-GEMM
    kernel per group that reads the input in place (triton_conv.py); ``im2col``, F.unfold then the ROAST GEMM.
    The backward is im2col either way."""
    mode = os.environ.get("ROASTFX_CONV", "implicit")
    if mode not in CONV_MODES:
        raise ValueError(f"ROASTFX_CONV={mode!r} is not valid; accepted: {', '.join(CONV_MODES)}")
    return mode


def _conv_out_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _conv_weight(view, in_per_group, kernel, dtype):
    """The dense (out, in/groups, *kernel) weight of a B view: W = V^T reshaped (reference path only)."""
    return view.to(dtype).t().reshape(view.shape[1], in_per_group, *kernel)


def _as_2d(x, kernel, stride, padding, dilation):
    """A batched conv1d problem as conv2d with height 1 (unfold/fold only know 2-D)."""
    if len(kernel) == 2:
        return x, list(kernel), list(stride), list(padding), list(dilation)
    return x.unsqueeze(2), [1, kernel[0]], [1, stride[0]], [0, padding[0]], [1, dilation[0]]


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
    """``F.conv1d/conv2d(x, W, bias, stride, padding, dilation, groups)`` (by ``len(kernel)``) where
    W = V^T reshaped to (out, in/groups, *kernel) and V is the site's B view read from the memory.
    grad_norm: the memory gets the view's gradient divided by its RMS (grad_norm.py)."""
    if len(kernel) not in (1, 2) or not all(len(v) == len(kernel) for v in (stride, padding, dilation)):
        raise ValueError(f"roast_conv takes 1 or 2 spatial dims with one stride/padding/dilation each, got "
                         f"kernel={kernel} stride={stride} padding={padding} dilation={dilation}")
    windows = column_windows(mapping, groups) if use_triton(x) else None
    if windows is None:
        conv = F.conv1d if len(kernel) == 1 else F.conv2d
        view = _materialize(memory, _mapping(mapping), scale)
        weight = _conv_weight(view, x.shape[-len(kernel) - 1] // groups, kernel, x.dtype)
        return conv(x, weight, bias, stride, padding, dilation, groups)
    _kernels()
    xb = _batched(x, kernel)
    x2, k2, s2, p2, d2 = _as_2d(xb, kernel, stride, padding, dilation)
    n, _, h, w = x2.shape
    width = mapping[1] // groups
    spatial = [_conv_out_size(*a) for a in zip((h, w), k2, s2, p2, d2)]
    if conv_mode() == "implicit":
        from .triton_conv import roast_conv2d_group

        y = torch.empty((n, mapping[1], *spatial), device=x.device, dtype=x.dtype)
        per_group = x2.shape[1] // groups
        for g, window in enumerate(windows):
            roast_conv2d_group(x2, memory, _mapping(window), scale, y, k2, s2, p2, d2, c0=g * per_group,
                               o0=g * width, bias=bias)
        y = y.squeeze(2) if len(kernel) == 1 else y
        return y if xb is x else y.squeeze(0)
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
    accumulate = torch.float32 if grad.element_size() < 4 else grad.dtype
    grad_bias = gb.sum((0, *range(2, gb.dim())), dtype=accumulate).to(grad.dtype) if ctx.has_bias else None
    grad_x, grad_memory = _conv_grads(x, memory, grad, mapping, scale, ctx.conv, need_x, need_memory, grad_norm)
    return grad_x, grad_memory, None, None, grad_bias, None, None, None, None, None, None


def _conv_grads(x, memory, grad, mapping, scale, conv, need_x, need_memory, grad_norm):
    """(dX, dMemory) of a ROAST conv for the output gradient ``grad``: the GEMM kernels on the Triton
    path, the dense conv gradients elsewhere."""
    kernel, groups = conv[0], conv[4]
    xb, gb = _batched(x, kernel), _batched(grad, kernel)
    windows = column_windows(mapping, groups) if use_triton(x) else None
    if windows is None:
        grad_x, grad_memory = _dense_conv_backward(xb, gb, memory, mapping, scale, conv, need_x, need_memory,
                                                   grad_norm)
    else:
        grad_x, grad_memory = _gemm_conv_backward(xb, gb, memory, windows, scale, conv, need_x, need_memory,
                                                  grad_norm)
    return (grad_x.reshape(x.shape) if grad_x is not None else None), grad_memory


def _gemm_conv_backward(xb, gb, memory, windows, scale, conv, need_x, need_memory, grad_norm):
    """dX: the view-transposed GEMM per group, then col2im (F.fold); dMemory: the ROAST weight-gradient
    kernel on the recomputed columns, summed over groups (with grad_norm, divided by the RMS of the
    whole view's gradient: the groups' windows tile the view, so their sums of squares add up)."""
    _kernels()
    kernel, stride, padding, dilation, groups = conv
    x2, k2, s2, p2, d2 = _as_2d(xb, kernel, stride, padding, dilation)
    n, _, h, w = x2.shape
    out = gb.shape[1]
    width = out // groups
    grad2d = gb.reshape(n, out, -1).transpose(1, 2).reshape(-1, out).to(xb.dtype)  # (N*L, out)
    grad_xs, grad_memory, sumsq = [], None, 0.0
    for g, window in enumerate(windows):
        grad_g = grad2d[:, g * width:(g + 1) * width].contiguous()
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
    if need_memory and grad_norm:
        grad_memory = normalize(grad_memory, rms_from_sumsq(sumsq, windows[0][0] * windows[0][1] * groups))
    grad_x = (grad_xs[0] if groups == 1 else torch.cat(grad_xs, 1)) if need_x else None
    return grad_x, grad_memory


def _dense_conv_backward(xb, gb, memory, mapping, scale, conv, need_x, need_memory, grad_norm):
    kernel, stride, padding, dilation, groups = conv
    grad_input = torch.nn.grad.conv1d_input if len(kernel) == 1 else torch.nn.grad.conv2d_input
    grad_weight = torch.nn.grad.conv1d_weight if len(kernel) == 1 else torch.nn.grad.conv2d_weight
    weight = _conv_weight(materialize(memory, mapping, scale), xb.shape[1] // groups, kernel, xb.dtype)
    grad_x = grad_memory = None
    if need_x:
        grad_x = grad_input(xb.shape, weight, gb, stride, padding, dilation, groups)
    if need_memory:
        grad_w = grad_weight(xb, weight.shape, gb, stride, padding, dilation, groups)
        grad_view = grad_w.reshape(grad_w.shape[0], -1).t()
        if grad_norm:
            grad_view = normalize(grad_view, site_grad_rms(grad_view))
        grad_memory = _memory_grad_op(grad_view, mapping, scale, memory.numel()).to(memory.dtype)
    return grad_x, grad_memory


roast_conv.register_autograd(_conv_backward, setup_context=_conv_setup)


# -- a conv followed by a generated epilogue -------------------------------------------------------------
_EPILOGUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _extras_2d(extras, conv1d: bool):
    """Extras of a conv1d output (N, C, L) as extras of its (N, C, 1, L) conv2d form."""
    return [e.unsqueeze(-2) if conv1d and e.dim() >= 2 else e for e in extras]


@torch.library.custom_op("roastfx::roast_conv_epilogue", mutates_args=())
def roast_conv_epilogue(x: torch.Tensor, memory: torch.Tensor, mapping: list[int], scale: float,
                        extras: list[torch.Tensor], epilogue: str, kernel: list[int], stride: list[int],
                        padding: list[int], dilation: list[int], groups: int, grad_norm: bool) -> torch.Tensor:
    """``epilogue(roast_conv(x, memory, mapping, scale, None, ...), extras)``: on the Triton path one
    generated kernel per group computes the conv and the epilogue (triton_epilogue.roast_conv_epilogue)."""
    from .epilogue_op import parse_epilogue

    epi = parse_epilogue(epilogue)
    windows = column_windows(mapping, groups) if use_triton(x) else None
    out_dtype = epi.out_dtype(x.dtype, extras)
    kernel_ok = (windows is not None and x.dtype in _EPILOGUE_DTYPES and memory.dtype in _EPILOGUE_DTYPES
                 and out_dtype in _EPILOGUE_DTYPES and all(e.dtype != torch.float64 or e.dim() == 0 for e in extras)
                 and all(e.device == x.device or e.dim() == 0 for e in extras))
    if not kernel_ok:
        y = epi.apply(roast_conv(x, memory, mapping, scale, None, kernel, stride, padding, dilation, groups,
                                 grad_norm), extras)
        return y.clone() if any(y is t for t in (x, *extras)) else y
    _kernels()
    from .triton_epilogue import roast_conv_epilogue as launch

    xb = _batched(x, kernel)
    x2, k2, s2, p2, d2 = _as_2d(xb, kernel, stride, padding, dilation)
    n, _, h, w = x2.shape
    spatial = [_conv_out_size(*a) for a in zip((h, w), k2, s2, p2, d2)]
    y = torch.empty((n, mapping[1], *spatial), device=x.device, dtype=out_dtype)
    shape = (n, mapping[1], *spatial) if len(kernel) == 2 else (n, mapping[1], spatial[1])
    epi.check_extras(shape if xb is x else shape[1:], extras)
    extras2 = _extras_2d(extras, len(kernel) == 1)
    per_group, width = x2.shape[1] // groups, mapping[1] // groups
    for g, window in enumerate(windows):
        launch(x2, memory, _mapping(window), scale, y, k2, s2, p2, d2, epi, extras2, c0=g * per_group, o0=g * width)
    y = y.squeeze(2) if len(kernel) == 1 else y
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


def _transposed_2d(x, kernel, stride, padding, output_padding, dilation):
    """A conv_transpose1d problem as 2-D with height 1 (fold/unfold only know 2-D)."""
    if len(kernel) == 2:
        return x, list(kernel), list(stride), list(padding), list(output_padding), list(dilation)
    return (x.unsqueeze(2), [1, kernel[0]], [1, stride[0]], [0, padding[0]], [0, output_padding[0]],
            [1, dilation[0]])


@torch.library.custom_op("roastfx::roast_conv_transpose", mutates_args=())
def roast_conv_transpose(x: torch.Tensor, memory: torch.Tensor, mapping: list[int], scale: float,
                         bias: torch.Tensor | None, kernel: list[int], stride: list[int], padding: list[int],
                         output_padding: list[int], dilation: list[int], grad_norm: bool = False) -> torch.Tensor:
    """``F.conv_transpose1d/2d(x, W, bias, stride, padding, output_padding, 1, dilation)`` (by ``len(kernel)``)
    where W = V reshaped to (in, out, *kernel) and V is the site's (in, out * prod(kernel)) view. On the
    Triton path the columns x @ V come from the fused ROAST GEMM and F.fold sums them into the output (W is
    never built); elsewhere the op materializes W and runs the dense op."""
    if len(kernel) not in (1, 2) or not all(len(v) == len(kernel) for v in (stride, padding, output_padding,
                                                                            dilation)):
        raise ValueError(f"roast_conv_transpose takes 1 or 2 spatial dims with one stride/padding/output_padding/"
                         f"dilation each, got kernel={kernel} stride={stride} padding={padding} "
                         f"output_padding={output_padding} dilation={dilation}")
    xb = _batched(x, kernel)
    out_channels = mapping[1] // math.prod(kernel)
    if not use_triton(x):
        conv = F.conv_transpose1d if len(kernel) == 1 else F.conv_transpose2d
        weight = _materialize(memory, _mapping(mapping), scale).to(x.dtype).reshape(mapping[0], out_channels, *kernel)
        return conv(x, weight, bias, stride, padding, output_padding, 1, dilation)
    _kernels()
    x2, k2, s2, p2, o2, d2 = _transposed_2d(xb, kernel, stride, padding, output_padding, dilation)
    n, c, h, w = x2.shape
    size = [_transposed_out_size(*a) for a in zip((h, w), k2, s2, p2, o2, d2)]
    rows = x2.flatten(2).transpose(1, 2)  # (N, H*W, in)
    cols = torch.ops.roastfx.linear(rows, memory, None, None, mapping, scale, True, "none", False)[0]
    y = F.fold(cols.transpose(1, 2), size, k2, d2, p2, s2)  # (N, out, H_out, W_out)
    if bias is not None:
        y = y + bias.to(y.dtype).reshape(1, -1, 1, 1)
    y = y.squeeze(2) if len(kernel) == 1 else y
    return y if xb is x else y.squeeze(0)


@roast_conv_transpose.register_fake
def _(x, memory, mapping, scale, bias, kernel, stride, padding, output_padding, dilation, grad_norm=False):
    spatial = [_transposed_out_size(*a) for a in zip(x.shape[-len(kernel):], kernel, stride, padding, output_padding,
                                                     dilation)]
    return x.new_empty((*x.shape[:-len(kernel) - 1], mapping[1] // math.prod(kernel), *spatial))


def _conv_transpose_setup(ctx, inputs, output):
    x, memory, mapping, scale, bias, kernel, stride, padding, output_padding, dilation, grad_norm = inputs
    ctx.save_for_backward(x, memory)
    ctx.site = (mapping, scale, grad_norm, bias is not None)
    ctx.conv = (kernel, stride, padding, output_padding, dilation)


def _conv_transpose_backward(ctx, grad):
    """dX = the columns of dY (F.unfold) @ V^T; dMemory from x^T @ those columns; dBias the sum of dY. The
    reference path differentiates the dense op at the materialized weight."""
    x, memory = ctx.saved_tensors
    mapping, scale, grad_norm, has_bias = ctx.site
    kernel, stride, padding, output_padding, dilation = ctx.conv
    gb = _batched(grad, kernel)
    accumulate = torch.float32 if grad.element_size() < 4 else grad.dtype
    grad_bias = gb.sum((0, *range(2, gb.dim())), dtype=accumulate).to(grad.dtype) if has_bias else None
    if not use_triton(x):
        conv = F.conv_transpose1d if len(kernel) == 1 else F.conv_transpose2d
        view = materialize(memory, mapping, scale).to(x.dtype)  # the op, opaque to tracing
        weight = view.reshape(mapping[0], -1, *kernel)
        _, pullback = torch.func.vjp(lambda xv, wv: conv(xv, wv, None, stride, padding, output_padding, 1, dilation),
                                     x, weight)
        grad_x, grad_weight = pullback(grad)
        grad_view = grad_weight.reshape(view.shape)
        if grad_norm:
            grad_view = normalize(grad_view, site_grad_rms(grad_view))
        grad_memory = _memory_grad_op(grad_view, mapping, scale, memory.numel()).to(memory.dtype)
        return grad_x, grad_memory, None, None, grad_bias, None, None, None, None, None, None
    _kernels()
    xb = _batched(x, kernel)
    x2, k2, s2, p2, _, d2 = _transposed_2d(xb, kernel, stride, padding, output_padding, dilation)
    g2 = gb.unsqueeze(2) if len(kernel) == 1 else gb
    n, c = x2.shape[:2]
    cols = F.unfold(g2, k2, d2, p2, s2).transpose(1, 2).reshape(-1, mapping[1]).to(x.dtype).contiguous()
    rows = x2.flatten(2).transpose(1, 2).reshape(-1, c)
    grad_rows = torch.ops.roastfx.linear_grad_input(cols, memory, mapping, scale, True)  # (N*H*W, in)
    grad_x = grad_rows.reshape(n, -1, c).transpose(1, 2).reshape(x2.shape).reshape(x.shape)
    if grad_norm:
        grad_memory, sumsq = torch.ops.roastfx.linear_grad_memory_sumsq(rows, cols, memory, mapping, scale, True)
        grad_memory = normalize(grad_memory, rms_from_sumsq(sumsq, mapping[0] * mapping[1]))
    else:
        grad_memory = torch.ops.roastfx.linear_grad_memory(rows, cols, memory, mapping, scale, True)
    return grad_x, grad_memory, None, None, grad_bias, None, None, None, None, None, None


roast_conv_transpose.register_autograd(_conv_transpose_backward, setup_context=_conv_transpose_setup)
