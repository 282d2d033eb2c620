"""Rewrite every weight read from the memory that feeds a matmul-like op into one roast op.

In dynamo's graph of a compressed model each weight is a ``roastfx::materialize``
(the site's B view V, (rows, cols)) followed by the transpose/reshape that turns
it back into the dense weight. When that chain only rebuilds the weight for one
consumer, the consumer and the chain become one op that reads the memory itself:

    linear(x, W, b), x @ W, matmul/mm/bmm (W broadcast), addmm(b, x, W), inner(x, W),
    tensordot(x, W, 1), einsum equal to x @ W or x @ W.T -> roastfx::roast_linear (x @ V or x @ V^T)
    einsum of an n-D W equal to one GEMM      -> roast_linear over x's contracted dims flattened ("ibh,hnd->ibnd")
    addmm / baddbmm(M, x, W, beta, alpha)     -> beta * M + alpha * (the mm / bmm above) (_split_added_products)
    x @ cat([W1, W2, ...], dim)               -> one x @ Wi per part, summed or concatenated (_split_concatenated_weights)
    grouped_mm(x, W, offs) of a grouped site  -> roastfx::roast_grouped_mm (stacked experts, all in one launch)
    bmm(W[ids], x), bmm(x, W[ids])            -> roast_picked_mm: the rows sorted by ids, one roast_grouped_mm
    bilinear(x1, x2, W, b)                    -> roast_linear over x1 and x2's flattened outer product
    lstm_cell / gru_cell / rnn_*_cell         -> two roast_linear (input and hidden projections) and the gates
    conv1d/2d/3d(x, W, b, ...)                -> roastfx::roast_conv
    row_scaled_conv(x, W, ..., row_scale)     -> roastfx::roast_conv_row_scaled (weight norm inside a conv)
    conv_transpose1d/2d/3d(x, W, b, ...)      -> roastfx::roast_conv_transpose
    multi_head_attention_forward              -> roast_attention (projections as roast_linear)
    _transformer_encoder_layer_fwd            -> roast_encoder_layer (attention + feed-forward over roast_linear)
    embedding(ids, W)                         -> roastfx::roast_embedding
    embedding_bag(ids, W, offsets)            -> roast_embedding + a bag sum over the looked-up rows

A read through ``roastfx::site_grad_norm`` (``grad_scaling="site"``) fuses the same
way, with the roast op's ``grad_norm`` flag on: the op divides its memory gradient by
the RMS of its view gradient. Only when that normalized weight has one reader: with
several, eager normalizes the sum of their gradients, which no single op sees.

Anything else keeps its materialize (the correct fallback: materialize, then the
original op), and the returned ``SiteUse`` list says why, read by read. What a
weight operand is in terms of V comes from ``weight_reads.weight_read``.
"""
from __future__ import annotations

import inspect
import logging
import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from roastfx.codegen.conv import row_scaled_conv

from .split_weight_norm import split_weight_norm
from .weight_reads import (CONV_OPS, CONV_TRANSPOSE_OPS, LINEAR_OPS, call_with_example, cast_to, einsum_as_matmul,
                           einsum_blocks, example_shape, final_users, gathered_read, grouped_read, is_chain_step,
                           is_materialize, op_name, reads_memory, weight_read)

log = logging.getLogger("roastfx")

_LINEAR = LINEAR_OPS
_MATMUL = {operator.matmul, torch.matmul, torch.mm, torch.bmm}
_MATMUL_METHODS = {"matmul", "mm", "bmm", "__matmul__"}
_ADDMM = {torch.addmm}
_EINSUM = {torch.einsum}
_CONV = CONV_OPS
_CONV_TRANSPOSE = CONV_TRANSPOSE_OPS
_EMBEDDING = {F.embedding}
_EMBEDDING_BAG = {F.embedding_bag}


@dataclass
class SiteUse:
    node: str  # the fused node, or the materialize that stays
    fused: bool
    why: str


def _arg(node, index, name, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _einsum_operands(node) -> tuple[str, list]:
    equation, rest = node.args[0], list(node.args[1:])
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        rest = list(rest[0])
    return equation, rest


def _matmul_operands(node):
    """(x, weight, bias, b_is_weight_t, broadcast_ok, op name) of a matmul-like node, or None.

    The node computes x @ B (+ bias) with B = weight, or B = weight.T when b_is_weight_t
    (None: an einsum that is neither).
    """
    if node.op == "call_function" and node.target in _LINEAR:
        return node.args[0], _arg(node, 1, "weight"), _arg(node, 2, "bias"), True, False, "linear"
    if node.op == "call_function" and node.target in _ADDMM:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None
        return node.args[1], node.args[2], node.args[0], False, False, "addmm"
    is_method = node.op == "call_method" and node.target in _MATMUL_METHODS
    if is_method or node.op == "call_function" and node.target in _MATMUL:
        name = op_name(node)
        return node.args[0], node.args[1], None, False, name != "mm", name.strip("_")
    if node.op == "call_function" and node.target is torch.inner:  # inner(x, W) = x @ W.T
        return node.args[0], _arg(node, 1, "other"), None, True, False, "inner"
    if node.op == "call_function" and node.target is torch.tensordot:
        return node.args[0], _arg(node, 1, "b"), None, _tensordot_flip(node), False, "tensordot"
    if node.op == "call_function" and node.target in _EINSUM:
        equation, operands = _einsum_operands(node)
        if len(operands) != 2:
            return None
        for i in (1, 0):
            if weight_read(operands[i]) is not None:
                flip = einsum_as_matmul(equation, i) if isinstance(equation, str) else None
                return operands[1 - i], operands[i], None, flip, False, f"einsum {equation!r}"
    return None


def _tensordot_flip(node) -> bool | None:
    """For ``tensordot(x, W, dims)`` with a 2-D W: False when it is x @ W (x's last dim with W's first: dims=1
    or ([-1], [0])), True when x @ W.T (([-1], [1])), None otherwise."""
    dims, xs = _arg(node, 2, "dims", 2), example_shape(node.args[0])
    if dims == 1:
        return False
    if not isinstance(dims, (list, tuple)) or len(dims) != 2 or xs is None:
        return None
    a, b = ([d] if isinstance(d, int) else list(d) for d in dims)
    if len(a) != 1 or len(b) != 1 or a[0] % len(xs) != len(xs) - 1 or b[0] not in (0, 1, -1, -2):
        return None
    return b[0] % 2 == 1


def _shared(read, op: str) -> str | None:
    """Why a read cannot become one roast op because its rebuilt weight has other users, or None."""
    if not any(len(n.users) > 1 for n in read.chain):
        return None
    if read.grad_norm:
        return (f"{op}: the gradient-normalized weight (grad_scaling='site') has other users; their gradients are "
                "normalized together, which no single fused op can do")
    return f"{op}: the rebuilt weight has other users"


def _dtype(node) -> torch.dtype | None:
    val = node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else None


def _cast_problem(read, x, op: str, compute: torch.dtype | None = None) -> str | None:
    """Why a read cast to another dtype cannot fold into a roast op over ``x`` (which computes in x's dtype,
    or ``compute`` when autocast casts x to it)."""
    if read.cast is None:
        return None
    dtype = compute or _dtype(x)
    if dtype == read.cast:
        return None
    return f"{op} reads the weight cast to {read.cast}, but its input is {dtype or 'not a tensor'}"


def _autocast_dtype(node, x, bias=None) -> torch.dtype | None:
    """The dtype autocast ran ``node`` in, when it is not that of its input or bias: under torch.autocast a
    linear, matmul or conv of float32 tensors computes (and returns) bfloat16/float16, casting x and the
    bias. None when it ran in their dtypes."""
    out, dtypes = _dtype(node), {_dtype(t) for t in (x, bias) if isinstance(t, torch.fx.Node)}
    if out is None or not out.is_floating_point or None in dtypes or dtypes <= {out}:
        return None
    return out


def _compute_inputs(graph, node, read, x, bias, op: str):
    """(why the read cannot fold, or None; x; bias) for a roast op replacing ``node``: under autocast x and
    the bias cast (before ``node``) to the dtype autocast ran the op in, as autocast casts them, so the roast
    op computes in it as the original op did; a weight read cast to another dtype folds only when that is
    the dtype the op computes in."""
    compute = _autocast_dtype(node, x, bias)
    why = _cast_problem(read, x, op, compute)
    if why or compute is None:
        return why, x, bias
    with graph.inserting_before(node):
        x, bias = (graph.call_method("to", (t, compute)) if isinstance(t, torch.fx.Node) and _dtype(t) != compute
                   else t for t in (x, bias))
    return None, x, bias


def _norm_kwargs(read) -> dict:
    return {"grad_norm": True} if read.grad_norm else {}


def _same_leading_dims(x, node) -> bool:
    xs, out = example_shape(x), example_shape(node)
    if xs is None or out is None or len(xs) != len(out):
        return False
    return all(statically_known_true(a == b) for a, b in zip(xs[:-1], out[:-1]))


def _fuse_matmul(graph, node) -> SiteUse | None:
    operands = _matmul_operands(node)
    if operands is None:
        return None
    x, weight, bias, b_is_weight_t, broadcast_ok, op = operands
    read = weight_read(weight)
    if read is None:
        left = weight_read(x)
        if left is not None:
            return _fuse_left_matmul(graph, node, left, weight, op)
        return None
    if b_is_weight_t is None:
        return SiteUse(node.name, False, f"{op} is not x @ W or x @ W.T on x's last dim")
    if not read.matrix:
        return SiteUse(node.name, False, f"{op} reads the weight reshaped to {read.shape}, not as the site's matrix")
    if _shared(read, op):
        return SiteUse(node.name, False, _shared(read, op))
    if read.broadcast and not (broadcast_ok and _same_leading_dims(x, node)):
        return SiteUse(node.name, False, f"{op} broadcasts the weight over dims that x does not have")
    if op == "addmm" and (bias is None or example_shape(bias) is None or len(example_shape(bias)) != 1):
        return SiteUse(node.name, False, "addmm whose added term is not a bias vector")
    why, x, bias = _compute_inputs(graph, node, read, x, bias, op)
    if why:
        return SiteUse(node.name, False, why)
    # x @ B with B = W or W^T, and W = V or V^T: roast_linear computes x @ V, or x @ V^T when flipped
    flip = read.transposed != b_is_weight_t
    memory, mapping, scale = read.materialize.args
    with graph.inserting_before(node):
        fused = graph.call_function(torch.ops.roastfx.roast_linear.default, (x, memory, list(mapping), scale, bias),
                                    ({"transpose_view": True} if flip else {}) | _norm_kwargs(read))
    fused.meta.update(node.meta)
    node.replace_all_uses_with(fused)
    graph.erase_node(node)
    return SiteUse(fused.name, True, "roast_linear" + (" (x @ V^T)" if flip else "") + f" from {op}"
                   + _norm_note(read))


def _fuse_einsum_blocks(graph, node) -> SiteUse | None:
    """A two-operand einsum over an n-D weight that is one GEMM (``weight_reads.einsum_blocks``: XLNet's and
    Funnel's (d_model, heads, head_dim) projections) -> x's contracted dims flattened, roast_linear, the
    result's last dim unflattened. Other einsums are left to ``_fuse_matmul``, which says why they stay."""
    if node.op != "call_function" or node.target not in _EINSUM:
        return None
    equation, operands = _einsum_operands(node)
    if len(operands) != 2 or not isinstance(equation, str):
        return None
    for i in (1, 0):
        read = weight_read(operands[i])
        if read is None or len(read.shape) < 3 or read.broadcast:
            continue
        rows = read.mapping[1] if read.transposed else read.mapping[0]  # the weight is (V or V^T).reshape(shape)
        split = next((k for k in range(1, len(read.shape)) if math.prod(read.shape[:k]) == rows), 0)
        blocks = einsum_blocks(equation, i, read.shape, split)
        if blocks is None:
            return None
        op = f"einsum {equation!r}"
        if _shared(read, op):
            return SiteUse(node.name, False, _shared(read, op))
        why, x, _ = _compute_inputs(graph, node, read, operands[1 - i], None, op)
        if why:
            return SiteUse(node.name, False, why)
        # x2 @ M or x2 @ M^T, with M = V^T when the weight is built from V^T, else V
        flip = read.transposed != blocks.transposed
        memory, mapping, scale = read.materialize.args
        with graph.inserting_before(node):
            if blocks.contracted > 1:
                x = graph.call_method("flatten", (x, -blocks.contracted))
            out = fused = graph.call_function(torch.ops.roastfx.roast_linear.default,
                                              (x, memory, list(mapping), scale, None),
                                              ({"transpose_view": True} if flip else {}) | _norm_kwargs(read))
            if len(blocks.kept) > 1:
                out = graph.call_method("unflatten", (fused, -1, blocks.kept))
        out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        return SiteUse(fused.name, True, "roast_linear" + (" (x @ V^T)" if flip else "") + f" from {op}, the "
                       f"{len(read.shape)}-D weight as a matrix" + _norm_note(read))
    return None


def _fuse_bilinear(graph, node) -> SiteUse | None:
    """``F.bilinear(x1, x2, W, b)`` (nn.Bilinear) over a compressed (out, in1, in2) weight -> roast_linear over
    the flattened outer product of x1 and x2: y = (x1 outer x2) @ W.reshape(out, in1 * in2).T + b."""
    if node.op != "call_function" or node.target not in (torch.bilinear, F.bilinear):
        return None
    x1, x2, weight, bias = (_arg(node, i, n) for i, n in enumerate(("input1", "input2", "weight", "bias")))
    read = weight_read(weight)
    if read is None:
        return None
    rows = read.mapping[1] if read.transposed else read.mapping[0]  # the weight is (V or V^T).reshape(shape)
    if len(read.shape) != 3 or read.broadcast or rows != read.shape[0]:
        return SiteUse(node.name, False, f"bilinear reads the weight reshaped to {read.shape}, not as the site's "
                                         "(out, in1 * in2) matrix")
    if _shared(read, "bilinear"):
        return SiteUse(node.name, False, _shared(read, "bilinear"))
    if _autocast_dtype(node, x1, bias) is not None or _cast_problem(read, x1, "bilinear"):
        return SiteUse(node.name, False, _cast_problem(read, x1, "bilinear") or "bilinear under autocast is not "
                                                                                "fused")
    memory, mapping, scale = read.materialize.args
    with graph.inserting_before(node):
        outer = graph.call_function(operator.mul, (graph.call_method("unsqueeze", (x1, -1)),
                                                   graph.call_method("unsqueeze", (x2, -2))))
        # z @ W2^T, W2 = V^T when the weight is built from V^T: z @ V, else z @ V^T
        fused = graph.call_function(torch.ops.roastfx.roast_linear.default,
                                    (graph.call_method("flatten", (outer, -2)), memory, list(mapping), scale, bias),
                                    ({} if read.transposed else {"transpose_view": True}) | _norm_kwargs(read))
    fused.meta.update(node.meta)
    node.replace_all_uses_with(fused)
    graph.erase_node(node)
    return SiteUse(fused.name, True, "roast_linear from bilinear, over x1 and x2's flattened outer product"
                   + _norm_note(read))


_CELL_MODES = {"lstm_cell": "LSTM", "gru_cell": "GRU", "rnn_tanh_cell": "RNN_TANH", "rnn_relu_cell": "RNN_RELU"}


def _fuse_cell(graph, node) -> list[SiteUse] | None:
    """An aten RNN cell op (``lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)``, ``gru_cell``, ``rnn_*_cell``:
    what a dense nn.LSTMCell/GRUCell/RNNCell runs, e.g. under in-compiler compression) over compressed weights
    -> its input and hidden projections as two roast_linear, then the gates (``codegen.recurrent.rnn_gates``)."""
    mode = _CELL_MODES.get(op_name(node))
    if node.op != "call_function" or mode is None or len(node.args) < 4 or node.kwargs:
        return None
    x, hx, w_ih, w_hh = node.args[:4]
    b_ih, b_hh = (node.args[4:6] + (None, None))[:2]
    reads = [weight_read(w) for w in (w_ih, w_hh)]
    if reads == [None, None]:
        return None
    name = op_name(node)
    why = next((f"{name}: a weight that is not a plain read of a compressed matrix" for r in reads
                if r is None or not r.matrix or r.broadcast), None)
    why = why or next((_shared(r, name) or _cast_problem(r, x, name) for r in reads
                       if _shared(r, name) or _cast_problem(r, x, name)), None)
    if why is None and _autocast_dtype(node, x) is not None:
        why = f"{name} under autocast is not decomposed"
    if why:
        return [SiteUse(node.name, False, why)]
    from roastfx.codegen.recurrent import rnn_gates

    h, c = tuple(hx) if mode == "LSTM" else (hx, None)
    with graph.inserting_before(node):
        # F.linear(x, W) = x @ W^T: x @ V when W = V^T (a cell's layout), else x @ V^T
        gx, gh = (graph.call_function(torch.ops.roastfx.roast_linear.default,
                                      (t, memory, list(mapping), scale, b),
                                      ({} if r.transposed else {"transpose_view": True}) | _norm_kwargs(r))
                  for t, r, b in ((x, reads[0], b_ih), (h, reads[1], b_hh))
                  for memory, mapping, scale in (r.materialize.args,))
        state = graph.call_function(rnn_gates, (mode, gx, gh, h, c))
        out = state if mode == "LSTM" else graph.call_function(operator.getitem, (state, 0))
    out.meta.update(node.meta)
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return [SiteUse(gx.name, True, f"roast_linear from {name} (input projection)" + _norm_note(reads[0])),
            SiteUse(gh.name, True, f"roast_linear from {name} (hidden projection)" + _norm_note(reads[1]))]


def _fuse_left_matmul(graph, node, read, y, op: str) -> SiteUse:
    """``W @ y`` (the weight as the left operand, y of shape (..., in, L)) as ``(y^T @ W^T)^T``: roast_linear on y
    with its last two dims swapped, and the result's swapped back; both swaps are views."""
    shape = example_shape(y)
    if op not in ("matmul", "mm"):
        return SiteUse(node.name, False, f"{op} reads the weight as its left operand (W @ x)")
    if shape is None or len(shape) < 2:
        return SiteUse(node.name, False, f"{op} reads the weight as its left operand (W @ x) and x is "
                                         + ("of unknown shape" if shape is None else "a vector"))
    if not read.matrix or read.broadcast:
        return SiteUse(node.name, False, f"{op} reads the weight as its left operand (W @ x), reshaped to "
                                         f"{read.shape}, not as the site's matrix")
    if _shared(read, op):
        return SiteUse(node.name, False, _shared(read, op))
    why, y, _ = _compute_inputs(graph, node, read, y, None, op)
    if why:
        return SiteUse(node.name, False, why)
    # W @ y = (y^T @ W^T)^T: roast_linear computes y^T @ B with B = W^T, i.e. y^T @ V^T when W = V
    flip = not read.transposed
    memory, mapping, scale = read.materialize.args
    with graph.inserting_before(node):
        y_t = graph.call_method("transpose", (y, -2, -1))
        fused = graph.call_function(torch.ops.roastfx.roast_linear.default, (y_t, memory, list(mapping), scale, None),
                                    ({"transpose_view": True} if flip else {}) | _norm_kwargs(read))
        out = graph.call_method("transpose", (fused, -2, -1))
    out.meta.update(node.meta)
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return SiteUse(fused.name, True, "roast_linear" + (" (x @ V^T)" if flip else "") + f" from {op} with the "
                   "weight on the left (W @ x, as (x^T @ W^T)^T)" + _norm_note(read))


_GROUPED_MM = {"_grouped_mm", "grouped_mm", "grouped_mm_fallback"}  # torch's and transformers' (its fallback op)


def _fuse_grouped(graph, node) -> SiteUse | None:
    """``grouped_mm(x, W, offs)`` (a mixture of experts' GEMM over its stacked weights, x's rows sorted by expert)
    whose W is a grouped site's read -> roastfx::roast_grouped_mm."""
    name = op_name(node).split(".")[0]
    if node.op != "call_function" or name not in _GROUPED_MM:
        return None
    weight = _arg(node, 1, "mat_b" if name != "grouped_mm_fallback" else "weight")
    read = grouped_read(weight)
    if read is None:
        if not reads_memory(weight):
            return None  # a dense weight: not ours
        return SiteUse(node.name, False, f"{name} reads a weight that is not a grouped site's (groups, K, N) or "
                                         "(groups, N, K) blocks")
    x, offs = node.args[0], _arg(node, 2, "offs")
    extra = {k: v for k, v in node.kwargs.items() if k not in ("mat_b", "weight", "offs") and v is not None}
    if len(node.args) > 3 or extra:
        return SiteUse(node.name, False, f"{name} with {sorted(extra) or 'a bias or out_dtype'} is not fused")
    shape = example_shape(x)
    if offs is None or shape is None or len(shape) != 2:
        return SiteUse(node.name, False, f"{name} without offs, or with x not 2-D (tokens, features), is not fused")
    if _shared(read, name):
        return SiteUse(node.name, False, _shared(read, name))
    why, x, _ = _compute_inputs(graph, node, read, x, None, name)
    if why:
        return SiteUse(node.name, False, why)
    memory, mapping, scale = read.materialize.args
    with graph.inserting_before(node):
        fused = graph.call_function(torch.ops.roastfx.roast_grouped_mm.default,
                                    (x, memory, offs, list(mapping), scale, read.groups),
                                    ({"transpose_view": True} if read.transposed else {}) | _norm_kwargs(read))
    fused.meta.update(node.meta)
    node.replace_all_uses_with(fused)
    graph.erase_node(node)
    return SiteUse(fused.name, True, f"roast_grouped_mm ({read.groups} groups" + (", x @ V_g^T" if read.transposed
                                                                                    else "") + f") from {name}"
                   + _norm_note(read))


def _picked_or_whole(node) -> tuple | None:
    """(grouped read, ids) for ``W[ids]``; (grouped read, None) for a grouped site's whole stacked weight, which a
    batched GEMM multiplies entry by entry (entry s by W_s, as if ids were 0, 1, ...); else None."""
    found = gathered_read(node)
    if found is None and isinstance(node, torch.fx.Node) and (read := grouped_read(node)) is not None:
        found = (read, None)
    return found


def _fuse_gathered(graph, node) -> SiteUse | None:
    """``bmm(W[ids], x)`` or ``bmm(x, W[ids])`` (also matmul, ``@``): each batch entry s multiplied by the stacked
    weight that ``ids[s]`` picks from a grouped site (transformers' ``batched_mm`` experts) -> ``roast_picked_mm``
    over x's rows (each of its ``rows`` rows per entry with the entry's group): no weight is gathered per row.
    The same for a stacked weight read whole by a batched GEMM (entry s times W_s: RecurrentGemma's per-head
    gates), and for ``baddbmm(bias, x, W, beta=, alpha=)``, whose bias and factors apply after the op."""
    batched = node.op == "call_function" and node.target is torch.baddbmm or (
        node.op == "call_method" and node.target == "baddbmm")
    if batched:
        if len(node.args) != 3 or set(node.kwargs) - {"beta", "alpha"}:
            return None
        bias, operands = node.args[0], node.args[1:]
    elif not (node.op == "call_function" and node.target in _MATMUL or node.op == "call_method"
              and node.target in _MATMUL_METHODS) or len(node.args) != 2 or node.kwargs:
        return None
    else:
        bias, operands = None, node.args
    name = op_name(node).strip("_")
    picked = [_picked_or_whole(a) for a in operands]
    if picked == [None, None]:
        return None
    left = picked[0] is not None  # the picked weights are the left operand: out[s] = W_s @ x[s]
    (read, ids), selected, x = picked[0] or picked[1], operands[1 - left], operands[left]
    whole = ids is None
    shapes = [example_shape(a) for a in (selected, x, node)]
    if any(s is None or len(s) != 3 for s in shapes) or name == "mm":
        return SiteUse(node.name, False, f"{name} of weights picked per row ({selected.name}) is fused for 3-D "
                                         "operands only (one picked weight per batch entry)")
    if whole and not statically_known_true(shapes[0][0] == read.groups):
        return SiteUse(node.name, False, f"{name}: the stacked weight's {read.groups} groups against "
                                         f"{shapes[0][0]} batch entries")
    if len(selected.users) > 1 or _shared(read, name):
        return SiteUse(node.name, False, _shared(read, name) or f"{name}: the picked weights have other users")
    if not statically_known_true(shapes[0][0] == shapes[1][0]):
        return SiteUse(node.name, False, f"{name} broadcasts x over the weights picked per row")
    rows = shapes[1][2] if left else shapes[1][1]  # x[s] is (K, rows) on the right of W_s, else (rows, K)
    if not isinstance(rows, int):
        return SiteUse(node.name, False, f"{name} of weights picked per row with a dynamic row count per pick")
    why, x, _ = _compute_inputs(graph, node, read, x, None, name)
    if why:
        return SiteUse(node.name, False, why)
    from roastfx.codegen.ops import roast_picked_mm

    memory, mapping, scale = read.materialize.args
    # a picked weight is B_g or B_g^T (read.transposed); x[s] @ W_s, or (x[s]^T @ W_s^T)^T when W_s is on the left
    flip = read.transposed != left
    with graph.inserting_before(node):
        if whole:  # the whole stack: entry s takes group s
            ids = graph.call_function(torch.arange, (read.groups,), {"device": graph.call_function(
                getattr, (x, "device"))})
        tokens = graph.call_method("transpose", (x, 1, 2)) if left else x  # (S, rows, K)
        flat = graph.call_method("reshape", (tokens, -1, shapes[1][1 if left else 2]))
        group = graph.call_method("reshape", (graph.call_method("expand", (  # each flat row's group
            graph.call_method("unsqueeze", (ids, 1)), -1, rows)), -1))
        fused = graph.call_function(roast_picked_mm, (flat, group, memory, list(mapping), scale, read.groups),
                                    ({"transpose_view": True} if flip else {}) | _norm_kwargs(read))
        out = graph.call_method("reshape", (fused, -1, rows, shapes[2][1 if left else 2]))
        if left:
            out = graph.call_method("transpose", (out, 1, 2))
        if batched:  # beta * bias + alpha * (x @ W), as baddbmm (beta 0 ignores the bias, NaNs included)
            beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
            out = out if alpha == 1 else graph.call_function(operator.mul, (out, alpha))
            if beta != 0:
                out = graph.call_function(operator.add, (
                    out, bias if beta == 1 else graph.call_function(operator.mul, (bias, beta))))
    out.meta.update(node.meta)
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    if not selected.users and selected.op != "placeholder":
        graph.erase_node(selected)
    how = "over the whole stack (entry s times group s)" if whole else "of weights picked per row: the rows " \
        "sorted by group"
    return SiteUse(fused.name, True, f"roast_picked_mm ({read.groups} groups" + (", x @ V_g^T" if flip else "")
                   + f") from {name} {how}, one roast_grouped_mm" + _norm_note(read))


def _norm_note(read) -> str:
    return ", gradient normalized" if read.grad_norm else ""


def _conv_padding(padding, kernel, dilation) -> list | str:
    """The conv's padding as one int per spatial dim, or why it cannot be."""
    if padding == "valid":
        return [0] * len(kernel)
    if padding == "same":
        extents = [d * (k - 1) for k, d in zip(kernel, dilation)]
        if any(e % 2 for e in extents):
            return "padding='same' with an even kernel extent pads one side more (not fused)"
        return [e // 2 for e in extents]
    return _per_dim(padding, len(kernel))


def _per_dim(value, dims) -> list:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * dims


def _fuse_conv(graph, node) -> SiteUse | None:
    row_scaled = node.op == "call_function" and node.target is row_scaled_conv
    if node.op != "call_function" or not (node.target in _CONV or row_scaled):
        return None
    read = weight_read(_arg(node, 1, "weight"))
    if read is None:
        return None
    dims = len(read.shape) - 2 if row_scaled else _CONV[node.target]
    cols = read.mapping[1]  # out channels
    if not read.transposed or read.broadcast or len(read.shape) != dims + 2 or read.shape[0] != cols:
        return SiteUse(node.name, False, f"conv{dims}d weight {read.shape} is not the site's V^T reshaped")
    if _shared(read, f"conv{dims}d"):
        return SiteUse(node.name, False, _shared(read, f"conv{dims}d"))
    kernel = list(read.shape[2:])
    stride = _per_dim(_arg(node, 3, "stride", 1), dims)
    dilation = _per_dim(_arg(node, 5, "dilation", 1), dims)
    padding = _conv_padding(_arg(node, 4, "padding", 0), kernel, dilation)
    groups = int(_arg(node, 6, "groups", 1))
    if isinstance(padding, str):
        return SiteUse(node.name, False, padding)
    why, x, bias = _compute_inputs(graph, node, read, node.args[0], _arg(node, 2, "bias"), f"conv{dims}d")
    if why:
        return SiteUse(node.name, False, why)
    memory, mapping, scale = read.materialize.args
    if row_scaled and read.grad_norm:
        return SiteUse(node.name, False, "a conv whose weight's rows are scaled (weight norm) over a weight read "
                                         "with grad_scaling='site'")
    with graph.inserting_before(node):
        if row_scaled:  # weight norm inside the reduction (split_weight_norm.py): the kernels scale each B row
            fused = graph.call_function(torch.ops.roastfx.roast_conv_row_scaled.default,
                                        (x, memory, list(mapping), scale, _arg(node, 7, "row_scale"), bias, kernel,
                                         stride, padding, dilation, groups))
        else:
            fused = graph.call_function(torch.ops.roastfx.roast_conv.default,
                                        (x, memory, list(mapping), scale, bias, kernel,
                                         stride, padding, dilation, groups), _norm_kwargs(read))
    fused.meta.update(node.meta)
    node.replace_all_uses_with(fused)
    graph.erase_node(node)
    what = "roast_conv_row_scaled" if row_scaled else "roast_conv"
    return SiteUse(fused.name, True, f"{what} ({dims}-d{_groups_note(list(mapping), groups)})" + _norm_note(read))


def _fuse_conv_transpose(graph, node) -> SiteUse | None:
    if node.op != "call_function" or node.target not in _CONV_TRANSPOSE:
        return None
    dims = _CONV_TRANSPOSE[node.target]
    name = f"conv_transpose{dims}d"
    read = weight_read(_arg(node, 1, "weight"))
    if read is None:
        return None
    if read.transposed or read.broadcast or len(read.shape) != dims + 2 or read.shape[0] != read.mapping[0]:
        return SiteUse(node.name, False, f"{name} weight {read.shape} is not the site's V reshaped")
    if _shared(read, name):
        return SiteUse(node.name, False, _shared(read, name))
    why, x, bias = _compute_inputs(graph, node, read, node.args[0], _arg(node, 2, "bias"), name)
    if why:
        return SiteUse(node.name, False, why)
    groups = int(_arg(node, 6, "groups", 1))
    kernel = list(read.shape[2:])
    conv = [_per_dim(_arg(node, i, key, default), dims)
            for i, key, default in ((3, "stride", 1), (4, "padding", 0), (5, "output_padding", 0), (7, "dilation", 1))]
    memory, mapping, scale = read.materialize.args
    with graph.inserting_before(node):
        fused = graph.call_function(torch.ops.roastfx.roast_conv_transpose.default,
                                    (x, memory, list(mapping), scale, bias, kernel,
                                     *conv, groups), _norm_kwargs(read))
    fused.meta.update(node.meta)
    node.replace_all_uses_with(fused)
    graph.erase_node(node)
    return SiteUse(fused.name, True, f"roast_conv_transpose ({dims}-d{_groups_note(list(mapping), groups, True)})"
                   + _norm_note(read))


def _groups_note(mapping: list, groups: int, transposed: bool = False) -> str:
    from roastfx.codegen.ops import column_windows, row_windows

    if groups == 1:
        return ""
    note = f", groups={groups} in one launch"
    if (row_windows if transposed else column_windows)(mapping, groups) is not None:
        return note
    what, size, tile = ("in channels", mapping[0], f"{mapping[2]} rows") if transposed else \
        ("out channels", mapping[1], f"{mapping[3]} columns")
    return (note + f"; groups of {size // groups} {what} split the hash tiles ({tile}), so under "
            "ROASTFX_CONV=im2col the op materializes W")


_EMBEDDING_NAMES = ("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
_BAG_NAMES = ("offsets", "max_norm", "norm_type", "scale_grad_by_freq", "mode", "sparse", "per_sample_weights",
              "include_last_offset", "padding_idx")


def _fuse_embedding(graph, node) -> SiteUse | None:
    if node.op != "call_function" or node.target not in _EMBEDDING | _EMBEDDING_BAG:
        return None
    bag = node.target in _EMBEDDING_BAG
    read = weight_read(_arg(node, 1, "weight"))
    if read is None:
        return None
    op = "embedding_bag" if bag else "embedding"
    if read.transposed or not read.matrix or read.broadcast:
        return SiteUse(node.name, False, f"{op} reads the table as {read.shape}, not as the site's view")
    if _shared(read, op):
        return SiteUse(node.name, False, _shared(read, op))
    extra = dict(zip(_BAG_NAMES if bag else _EMBEDDING_NAMES, node.args[2:]), **node.kwargs)
    if extra.get("max_norm") is not None or extra.get("scale_grad_by_freq") or extra.get("sparse"):
        return SiteUse(node.name, False, f"{op} with max_norm (renormalizes the table), scale_grad_by_freq or "
                                         "sparse is not fused")
    padding_idx = extra.get("padding_idx")
    if bag and (padding_idx is not None or extra.get("mode", "mean") not in ("sum", "mean", "max")):
        return SiteUse(node.name, False, "embedding_bag with padding_idx is not fused")
    if padding_idx is not None and padding_idx < 0:
        padding_idx += read.mapping[0]
    memory, mapping, scale = read.materialize.args
    ids = node.args[0]
    with graph.inserting_before(node):
        rows = graph.call_function(torch.ops.roastfx.roast_embedding.default,
                                   (ids, memory, list(mapping), scale, padding_idx), _norm_kwargs(read))
        if read.cast is not None:  # the rows of the cast table are the cast rows
            rows = graph.call_method("to", (rows, read.cast))
        fused = rows
        if bag:
            from roastfx.codegen.ops import embedding_bag_of_rows

            fused = graph.call_function(embedding_bag_of_rows,
                                        (rows, ids, extra.get("offsets"), extra.get("mode", "mean"),
                                         extra.get("per_sample_weights"), bool(extra.get("include_last_offset"))))
    fused.meta.update(node.meta)
    node.replace_all_uses_with(fused)
    graph.erase_node(node)
    return SiteUse(fused.name, True, "roast_embedding" + (" + bag reduce over the looked-up rows" if bag else "")
                   + _norm_note(read))


def _autocast_attention_inputs(graph, node, a) -> tuple:
    """(query, key, value, in_proj_bias, out_proj_bias) of a multi_head_attention_forward node, cast to the dtype
    autocast ran its projections in when that is not theirs (a bfloat16 query with float32 biases: F.linear
    casts them, the roast ops would not). The same node for inputs that were the same node (self-attention)."""
    value = node.meta.get("example_value")
    out = value[0] if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor) else None
    names = ("query", "key", "value", "in_proj_bias", "out_proj_bias")
    if out is None or not out.dtype.is_floating_point:
        return tuple(a[n] for n in names)
    cast = {t: cast_to(graph, t, out.dtype) for t in dict.fromkeys(a[n] for n in names)
            if isinstance(t, torch.fx.Node)}  # one cast per node: self-attention's query is its key and value
    return tuple(cast.get(a[n], a[n]) if isinstance(a[n], torch.fx.Node) else a[n] for n in names)


def _fuse_attention(graph, node) -> list[SiteUse] | None:
    """F.multi_head_attention_forward (nn.MultiheadAttention) over roast_linear projections."""
    if node.op != "call_function" or node.target is not F.multi_head_attention_forward:
        return None
    try:
        bound = inspect.signature(F.multi_head_attention_forward).bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    a = bound.arguments
    separate = bool(a["use_separate_proj_weight"])
    names = ("q_proj_weight", "k_proj_weight", "v_proj_weight") if separate else ("in_proj_weight",)
    reads = {name: weight_read(a[name]) for name in (*names, "out_proj_weight")}
    if all(r is None for r in reads.values()):
        return None
    why = None
    if any(a[n] is not None for n in ("bias_k", "bias_v", "static_k", "static_v")) or a["add_zero_attn"]:
        why = "nn.MultiheadAttention with bias_k/bias_v, add_zero_attn or static keys is not decomposed"
    elif any(r is None or not r.matrix or r.broadcast for r in reads.values()) or not all(
            reads[n].transposed for n in ("in_proj_weight", "out_proj_weight") if n in reads):
        why = ("nn.MultiheadAttention whose projections are not all plain reads of compressed weights"
               + (" (separate q/k/v weights)" if separate else ""))
    elif any(_shared(r, "nn.MultiheadAttention") for r in reads.values()):
        why = " / ".join(filter(None, (_shared(r, "nn.MultiheadAttention") for r in reads.values())))
    elif any(r.cast is not None for r in reads.values()):
        why = "nn.MultiheadAttention whose weights are read cast to another dtype is not decomposed"
    elif len({id(r.materialize.args[0]) for r in reads.values()}) > 1:
        why = "nn.MultiheadAttention whose projections read different memories"
    elif not separate and reads["in_proj_weight"].grad_norm and not a["query"] is a["key"] is a["value"]:
        why = ("nn.MultiheadAttention with distinct query/key/value inputs and grad_scaling='site': the q, k and v "
               "projections are separate roast ops, and the in-projection's gradient is normalized as a whole")
    if why is not None:
        return [SiteUse(node.name, False, why)]
    from roastfx.codegen.attention import roast_attention

    memory, out_mapping, out_scale = reads["out_proj_weight"].materialize.args
    if separate:  # F.linear(x, W): x @ V when W = V^T (a Linear's layout), else x @ V^T
        own = tuple((list(r.materialize.args[1]), r.materialize.args[2], not r.transposed, r.grad_norm)
                    for r in (reads[n] for n in names))
        in_args, in_norm = (None, None), False
    else:
        own, in_read = None, reads["in_proj_weight"]
        in_args, in_norm = (list(in_read.materialize.args[1]), in_read.materialize.args[2]), in_read.grad_norm
    with graph.inserting_before(node):
        query, key, value, in_bias, out_bias = _autocast_attention_inputs(graph, node, a)
        fused = graph.call_function(roast_attention, (
            query, key, value, a["num_heads"], memory, *in_args, in_bias,
            list(out_mapping), out_scale, out_bias, a["dropout_p"], a["training"], a["key_padding_mask"],
            a["need_weights"], a["attn_mask"], a["average_attn_weights"], in_norm,
            reads["out_proj_weight"].grad_norm, own))
    fused.meta.update(node.meta)
    node.replace_all_uses_with(fused)
    graph.erase_node(node)
    ins = [f"roast_attention: {n[0]} projection (its own weight) as roast_linear" for n in names] if separate else [
        "roast_attention: in-projection as roast_linear"]
    return [SiteUse(fused.name, True, why) for why in ins] + [
        SiteUse(fused.name, True, "roast_attention: out-projection as roast_linear")]


_ENCODER_WEIGHTS = {3: "qkv", 5: "proj", 14: "ffn1", 16: "ffn2"}  # argument positions of the fast path's weights


def _fuse_encoder_layer(graph, node) -> list[SiteUse] | None:
    """nn.TransformerEncoderLayer's inference fast path (one aten op taking dense weights), decomposed."""
    if node.op != "call_function" or node.target is not torch._transformer_encoder_layer_fwd:
        return None
    args = list(node.args)
    reads = {name: weight_read(args[i]) if len(args) > i else None for i, name in _ENCODER_WEIGHTS.items()}
    if all(r is None for r in reads.values()):
        return None
    why = None
    if len(args) < 18 or node.kwargs or any(a is not None for a in args[18:]):
        why = "nn.TransformerEncoderLayer fast path with a mask is not decomposed"
    elif any(r is None or not r.transposed or not r.matrix or r.broadcast for r in reads.values()):
        why = "nn.TransformerEncoderLayer fast path whose four weights are not all plain reads of compressed weights"
    elif any(len(n.users) > 1 for r in reads.values() for n in r.chain):
        why = "nn.TransformerEncoderLayer fast path: a rebuilt weight has other users"
    elif any(r.cast is not None for r in reads.values()):
        why = "nn.TransformerEncoderLayer fast path whose weights are read cast to another dtype is not decomposed"
    elif any(r.grad_norm for r in reads.values()):  # the fast path runs without gradients: not seen in practice
        why = "nn.TransformerEncoderLayer fast path with grad_scaling='site' weights is not decomposed"
    elif len({r.materialize.args[0] for r in reads.values()}) != 1:
        why = "nn.TransformerEncoderLayer fast path whose weights read different memories"
    if why is not None:
        return [SiteUse(node.name, False, why)]
    from roastfx.codegen.attention import roast_encoder_layer

    memory = reads["qkv"].materialize.args[0]
    site = {name: (list(r.materialize.args[1]), r.materialize.args[2]) for name, r in reads.items()}
    with graph.inserting_before(node):
        fused = graph.call_function(roast_encoder_layer, (
            args[0], args[2], memory, site["qkv"], args[4], site["proj"], args[6], args[7], args[8], args[9],
            args[10], args[11], args[12], args[13], site["ffn1"], args[15], site["ffn2"], args[17]))
    fused.meta.update(node.meta)
    node.replace_all_uses_with(fused)
    graph.erase_node(node)
    return [SiteUse(fused.name, True, f"roast_encoder_layer: {name} as roast_linear") for name in reads]


_FUSERS = (_fuse_einsum_blocks, _fuse_matmul, _fuse_bilinear, _fuse_cell, _fuse_grouped, _fuse_gathered, _fuse_conv,
           _fuse_conv_transpose, _fuse_embedding, _fuse_attention, _fuse_encoder_layer)

# why a read by these consumers keeps its materialize
_NO_ROAST_OP = {
    **dict.fromkeys(("lstm", "gru", "rnn_tanh", "rnn_relu"),
                    "the aten RNN op takes the dense flat weights (compressed nn.LSTM/GRU/RNN run step by step "
                    "instead, roastfx/rnn.py, except in a subclass with its own forward)"),
    "output": "the dense weight is itself an output of the graph (read for code dynamo runs eagerly, e.g. a Python "
              "loop over a data-dependent list of experts: transformers' experts_implementation='eager'; its "
              "'grouped_mm' (default) and 'batched_mm' fuse)",
    "_weight_norm": "weight norm rescales each slice of the weight by its norm before the op (the direction "
                    "parametrizations.weight.original1 is the site), and passes/split_weight_norm.py could not "
                    "move the scale out of the op",
    "autograd_function_apply": "the weight goes through a torch.autograd.Function, which no roast op applies",
}


def _replace(graph, node, out) -> None:
    """``out`` (the last node of a rewrite) takes ``node``'s place and metadata, keeping its own example value."""
    value = out.meta.get("example_value")
    out.meta = {**node.meta, **({"example_value": value} if value is not None else {})}
    node.replace_all_uses_with(out)
    graph.erase_node(node)


_ADD_PRODUCT = {torch.addmm: torch.mm, torch.baddbmm: torch.bmm}  # input + mat1 @ mat2, batched or not
_ADD_PRODUCT_METHODS = {"addmm": torch.mm, "baddbmm": torch.bmm}


def _split_added_products(graph) -> None:
    """``addmm`` / ``baddbmm(input, mat1, mat2, beta=, alpha=)`` over a weight read, other than addmm's
    bias-vector form (which roast_linear takes whole), rewritten as ``beta * input + alpha * (mat1 @ mat2)``
    (torch's meaning: with beta=0 input is not read), so the product fuses as an ``mm`` / ``bmm``
    (``bmm(x, W.expand(b, k, n))`` is x @ W)."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _ADD_PRODUCT:
            product, args = _ADD_PRODUCT[node.target], list(node.args)
        elif node.op == "call_method" and node.target in _ADD_PRODUCT_METHODS:
            product, args = _ADD_PRODUCT_METHODS[node.target], list(node.args)
        else:
            continue
        names = ("input", "mat1", "mat2") if product is torch.mm else ("input", "batch1", "batch2")
        args += [node.kwargs[n] for n in names[len(args):] if n in node.kwargs]
        if len(args) != 3 or not any(weight_read(a) is not None for a in args[1:]):
            continue
        beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
        bias = example_shape(args[0])
        if product is torch.mm and beta == 1 and alpha == 1 and bias is not None and len(bias) == 1:
            continue  # x @ W + b: _fuse_matmul's addmm
        with graph.inserting_before(node):
            out = call_with_example(graph, product, tuple(args[1:]), like=node)
            if alpha != 1:
                out = call_with_example(graph, operator.mul, (out, alpha), like=node)
            if beta != 0:
                # under autocast torch casts the added input to the dtype the product runs in (a float32 bias to
                # bfloat16): adding it uncast would promote the result back to float32
                added = cast_to(graph, args[0], _dtype(node)) if isinstance(args[0], torch.fx.Node) else args[0]
                if beta != 1:
                    added = call_with_example(graph, operator.mul, (added, beta))
                out = call_with_example(graph, operator.add, (added, out), like=node)
        _replace(graph, node, out)


_CAT = {torch.cat, torch.concat, torch.concatenate}


def _matmul_by_concatenation(node):
    """(x, the cat node) of ``x @ cat(parts, dim)`` (matmul / mm / ``@``, the concatenation on the right, 2-D),
    or None."""
    is_method = node.op == "call_method" and node.target in _MATMUL_METHODS - {"bmm"}
    if not (is_method or node.op == "call_function" and node.target in _MATMUL - {torch.bmm}):
        return None
    if len(node.args) != 2 or not isinstance(node.args[1], torch.fx.Node):
        return None
    cat = node.args[1]
    if cat.op != "call_function" or cat.target not in _CAT or len(cat.users) != 1:
        return None
    return node.args[0], cat


def _split_concatenated_weights(graph) -> None:
    """``x @ cat([P1, P2, ...], dim)`` where some part is a weight read (MobileBERT's head: ``cat([decoder.weight.t(),
    dense.weight], 0)``) -> one product per part, which then fuse as any ``x @ W``: along dim 0 (the
    contraction) ``x[..., :k1] @ P1 + x[..., k1:k1+k2] @ P2 + ...``, along dim 1 ``cat([x @ P1, x @ P2, ...], -1)``."""
    for node in list(graph.nodes):
        found = _matmul_by_concatenation(node)
        if found is None:
            continue
        x, cat = found
        parts = _arg(cat, 0, "tensors")
        dim = _arg(cat, 1, "dim", 0)
        shapes = [example_shape(p) if isinstance(p, torch.fx.Node) else None for p in parts or ()]
        if not parts or not isinstance(dim, int) or any(s is None or len(s) != 2 for s in shapes) \
                or not any(weight_read(p) is not None for p in parts) or example_shape(x) is None:
            continue
        dim %= 2
        with graph.inserting_before(node):
            if dim == 1:
                products = [call_with_example(graph, torch.matmul, (x, p)) for p in parts]
                out = call_with_example(graph, torch.cat, (products, -1), like=node)
            else:
                out, start = None, 0
                for part, shape in zip(parts, shapes):
                    piece = call_with_example(graph, torch.narrow, (x, -1, start, shape[0]))
                    product = call_with_example(graph, torch.matmul, (piece, part))
                    out = product if out is None else call_with_example(graph, operator.add, (out, product), like=node)
                    start += shape[0]
        _replace(graph, node, out)
        graph.erase_node(cat)


def _drop_unused_reads(graph) -> None:
    """Erase the materialize chains the rewrite left without users. Not graph.eliminate_dead_code: on
    dynamo's graph (before functionalization) it also erases unused in-place ops (``a.add_(1)``)."""
    for node in reversed(list(graph.nodes)):
        if (is_materialize(node) or is_chain_step(node)) and not node.users:
            graph.erase_node(node)


def fuse_roast_ops(gm: torch.fx.GraphModule) -> list[SiteUse]:
    """The pass: rewrite each fusable read, leave the rest; one SiteUse per read."""
    uses: list[SiteUse] = []
    reasons: dict[torch.fx.Node, str] = split_weight_norm(gm)  # the weight norms it leaves, and why
    graph = gm.graph
    _split_added_products(graph)
    _split_concatenated_weights(graph)
    for node in list(graph.nodes):
        for fuser in _FUSERS:
            found = fuser(graph, node)
            if found is None:
                continue
            for use in found if isinstance(found, list) else [found]:
                if use.fused:
                    uses.append(use)
                else:
                    for arg in node.all_input_nodes:
                        read = weight_read(arg) or (gathered_read(arg) or (None,))[0]
                        if read is not None:
                            reasons[read.materialize] = use.why
            break
    _drop_unused_reads(graph)
    for n in graph.nodes:
        if is_materialize(n):
            users = final_users(n)
            known = [_NO_ROAST_OP[k] for k in dict.fromkeys(op_name(u) or u.op for u in users) if k in _NO_ROAST_OP]
            names = ", ".join(f"{u.name} ({op_name(u) or u.op})" for u in users)
            why = reasons.get(n) or "; ".join(known) or f"materialized for {names or 'no user'}: no roast op for it"
            uses.append(SiteUse(n.name, False, why))
    gm.recompile()
    for u in uses:
        log.info("roast backend: %s %s (%s)", u.node, "fused" if u.fused else "fallback", u.why)
    return uses

