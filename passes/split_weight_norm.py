"""Weight norm over a compressed weight, split so that the op reads the memory itself.

``torch._weight_norm(v, g, dim)`` (what ``parametrizations.weight_norm`` computes, ``v`` the site) scales
each slice of v by ``g / norm(slice)``. For the slices a linear op can take the scale outside, the pass
rewrites the op over ``v_read * s`` (s = g / norm per slice, broadcast as the weight's dim 0) into the op over
``v_read`` with the scale moved past it:

- ``linear(x, v * s, b)`` and ``conv(x, v * s, b)`` (dim 0: output features / channels):
  ``op(x, v) * s + b``, s broadcast over the output's channel dim;
- ``conv_transpose(x, v * s, b)`` (dim 0: input channels): ``conv_transpose(x * s, v, b)``;
- ``dim=-1`` (one norm over all of v, torch's meaning of -1 here): s is one number, ``op(x, v) * s + b``;
- a linear's dim 1 (input features): ``linear(x * s, v, b)``, the squared norms per column of the weight
  (``weight_norm_inner_scale``);
- a transposed conv's dim 1 (output channel within a group): ``conv_transpose(x, v) * s + b``, s repeated
  per group.

A conv's norm over any other dim (per input channel, dim 1; per kernel tap, dim >= 2: Wav2Vec2's positional
conv) scales the weight along the conv's reduction, where no factor can leave the op: the pass writes
``row_scaled_conv(x, v, b, ..., row_scale=s)`` (codegen/conv.py), s one factor per row of the site's B view
(input channel x kernel tap, `weight_norm_row_scale`), which ``fuse_roast_ops`` turns into
``roastfx::roast_conv_row_scaled``: the conv kernels scale each row as they read it.

The squared norms come from ``roastfx::slice_sumsq`` (the memory read block by block on a GPU, no dense
v), so ``fuse_roast_ops`` then fuses ``op(x, v)`` like any read and its epilogue fusion can take the scale
and bias. A transposed conv's norm per kernel tap (dim >= 2), a read whose gradient is normalized per
site (``grad_scaling="site"``: the sums would bypass it), and weights used elsewhere too keep
``_weight_norm`` on the materialized view, with the reason in ``reasons``.
"""
from __future__ import annotations

import math

import torch

from roastfx.codegen.conv import row_scaled_conv, weight_norm_row_scale
from roastfx.codegen.ops import weight_norm_inner_scale, weight_norm_scale

from .weight_reads import CONV_OPS as _CONV
from .weight_reads import CONV_TRANSPOSE_OPS as _CONV_TRANSPOSE
from .weight_reads import LINEAR_OPS as _LINEAR
from .weight_reads import call_with_example, cast_to, weight_read, with_example


def _is_weight_norm(node) -> bool:
    return node.op == "call_function" and node.target is torch._weight_norm


def _args(node) -> tuple:
    """(v, g, dim) of a ``_weight_norm`` node."""
    names = ("v", "g", "dim")
    values = list(node.args) + [node.kwargs.get(k) for k in names[len(node.args):]]
    return values[0], values[1], 0 if values[2] is None else int(values[2])


def _why_not(node, read, dim) -> str | None:
    user = next(iter(node.users), None)
    weight = None
    if len(node.users) == 1 and user.op == "call_function" and user.target in (*_CONV, *_CONV_TRANSPOSE, *_LINEAR) \
            and user.args and user.args[0] is not node:
        weight = user.args[1] if len(user.args) > 1 else user.kwargs.get("weight")
    if weight is not node:
        return "weight norm whose result is not only the weight of one linear or conv op"
    if dim not in (0, -1) and not (user.target in _CONV and 0 < dim < len(read.shape)) and dim != 1:
        return (f"weight norm over dim {dim} of a {len(read.shape)}-d weight of {_name(user)} is not split: only dims "
                "0 and 1 and dim=-1 (one norm) are split off a linear or transposed conv (a transposed conv's norm "
                "per kernel tap scales its weight inside its reduction), and dims 0 and up of a conv")
    if read.grad_norm:
        return "weight norm over a weight read with grad_scaling='site' (the norms would bypass the normalized gradient)"
    if read.broadcast or read.cast is not None:
        return "weight norm over a weight read broadcast or cast"
    rows, cols = read.mapping[0], read.mapping[1]
    if read.shape[0] != (cols if read.transposed else rows):
        return f"weight norm's dim 0 ({read.shape[0]}) is not one axis of the site's view ({rows} x {cols})"
    if dim > 0 and user.target in _CONV and not (read.transposed and math.prod(read.shape[1:]) == rows):
        return f"the conv weight {tuple(read.shape)} is not the site's ({rows} x {cols}) view transposed"
    return None


def _name(node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def _bias(user):
    return user.args[2] if len(user.args) > 2 else user.kwargs.get("bias")


def _per_channel(graph, flat, dims: int):
    """A flat per-channel vector shaped to broadcast over dim 1 of an activation with ``dims`` spatial dims."""
    return with_example(graph.call_method("reshape", (flat, (1, -1) + (1,) * dims)))


def _rewritten(graph, user, v, scale, whole: bool, on_output: bool = False):
    """The nodes computing ``user``'s output from ``v`` with the weight norm's ``scale`` moved out of it (a
    transposed conv's onto its input, unless ``on_output``: then per output channel, as for the others)."""
    dtype = getattr(user.meta.get("example_value"), "dtype", None)
    args, kwargs = list(user.args), dict(user.kwargs)
    args[1] = v
    kwargs.pop("weight", None)
    if user.target in _CONV_TRANSPOSE and not on_output:  # dim 0 is the input channel: scale the input
        factor = scale if whole else _per_channel(graph, scale, _CONV_TRANSPOSE[user.target])
        args[0] = call_with_example(graph, torch.mul, (args[0], factor), like=args[0])
        return call_with_example(graph, user.target, tuple(args), kwargs, like=user)
    bias = _bias(user)
    if len(args) > 2:
        args[2] = None
    else:
        kwargs.pop("bias", None)
    out = call_with_example(graph, user.target, tuple(args), kwargs, like=user)
    scale = cast_to(graph, scale, dtype)
    bias = None if bias is None else cast_to(graph, bias, dtype)
    dims = _CONV.get(user.target, _CONV_TRANSPOSE.get(user.target))
    if dims is None:  # linear: features are the output's last dim
        out = call_with_example(graph, torch.mul, (out, scale), like=user)
        return out if bias is None else call_with_example(graph, torch.add, (out, bias), like=user)
    out = call_with_example(graph, torch.mul, (out, scale if whole else _per_channel(graph, scale, dims)), like=user)
    return out if bias is None else call_with_example(graph, torch.add, (out, _per_channel(graph, bias, dims)), like=user)


def _inner_rewritten(graph, user, v, factor):
    """``user`` (a linear, or a transposed conv) over ``v`` whose slices along the weight's dim 1 are scaled by
    ``factor``: a linear's dim 1 is its input features, so x is scaled (``linear(x * s, v, b)``); a transposed
    conv's dim 1 is the output channel within a group, so the output is (``conv_transpose(x, v) * s + b``, s
    repeated per group)."""
    args, kwargs = list(user.args), dict(user.kwargs)
    args[1] = v
    kwargs.pop("weight", None)
    x = args[0]
    if user.target in _LINEAR:
        dtype = getattr(x.meta.get("example_value"), "dtype", None)
        args[0] = call_with_example(graph, torch.mul, (x, cast_to(graph, factor, dtype)), like=x)
        return call_with_example(graph, user.target, tuple(args), kwargs, like=user)
    groups = args[6] if len(args) > 6 else kwargs.get("groups", 1)
    if groups != 1:
        factor = with_example(graph.call_method("repeat", (factor, groups)))
    return _rewritten(graph, user, v, factor, False, on_output=True)


def split_weight_norm(gm: torch.fx.GraphModule) -> dict:
    """The rewrite, in place. Returns {materialize node: why} for the weight norms over a site left as they
    were."""
    graph = gm.graph
    reasons = {}
    for node in list(graph.nodes):
        if not _is_weight_norm(node):
            continue
        v, g, dim = _args(node)
        read = weight_read(v)
        if read is None:
            continue
        why = _why_not(node, read, dim)
        if why:
            reasons[read.materialize] = why
            continue
        user = next(iter(node.users))
        memory, mapping, view_scale = read.materialize.args
        if dim > 0 and user.target not in _CONV:  # a linear's input features, a transposed conv's output channels
            with graph.inserting_before(user):
                sumsq = call_with_example(graph, torch.ops.roastfx.slice_sumsq.default,
                                          (memory, list(mapping), view_scale, not read.transposed))
                factor = call_with_example(graph, weight_norm_inner_scale, (g, sumsq, list(read.shape), dim))
                out = _inner_rewritten(graph, user, v, factor)
            user.replace_all_uses_with(out)
            graph.erase_node(user)
            graph.erase_node(node)
            continue
        if dim > 0:  # a conv's reduction dim: the op scales its weight's view rows (codegen/conv.py)
            with graph.inserting_before(user):
                sumsq = call_with_example(graph, torch.ops.roastfx.slice_sumsq.default,
                              (memory, list(mapping), view_scale, False))
                scale = call_with_example(graph, weight_norm_row_scale, (g, sumsq, list(read.shape), dim))
                out = call_with_example(graph, row_scaled_conv, (user.args[0], v, *user.args[2:]),
                            {**{k: a for k, a in user.kwargs.items() if k != "weight"}, "row_scale": scale},
                            like=user)
            user.replace_all_uses_with(out)
            graph.erase_node(user)
            graph.erase_node(node)
            continue
        with graph.inserting_before(user):
            sumsq = call_with_example(graph, torch.ops.roastfx.slice_sumsq.default,
                          (memory, list(mapping), view_scale, read.transposed))
            scale = call_with_example(graph, weight_norm_scale, (g, sumsq, dim == -1))
            out = _rewritten(graph, user, v, scale, dim == -1)
        user.replace_all_uses_with(out)
        graph.erase_node(user)
        graph.erase_node(node)
    gm.recompile()
    return reasons
