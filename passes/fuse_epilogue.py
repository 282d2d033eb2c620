"""Fold the pointwise chain after each ``roastfx::roast_linear`` into one epilogue op.

For each ``roast_linear(x, memory, mapping, scale, bias, act[, transpose_view, grad_norm])`` node, walk forward
while the value has a single user that is a pointwise op the epilogue IR can express
(codegen/epilogue.py): +, -, *, / by a constant or by a tensor that broadcasts to the
output without growing it (bias, residual, per-column scale ...), relu, gelu (erf or
tanh), silu, tanh, sigmoid, and casts to float32/float16/bfloat16. The walk stops at the
first op it cannot lower, which stays in the graph with everything after it. The
roast_linear and the chain become one ``roastfx::roast_linear_epilogue`` node whose
first steps are the bias and activation the roast_linear already had (and its grad_norm flag).

Runs after fuse_roast_ops; knows nothing about kernels.
"""
from __future__ import annotations

import logging
import numbers
import operator

import torch
import torch.nn.functional as F

from roastfx.codegen.epilogue import CAST_DTYPES, Epilogue, Step, fused_op

log = logging.getLogger("roastfx")

_aten = torch.ops.aten
_BINARY = {
    "add": {operator.add, torch.add, _aten.add.Tensor, _aten.add.Scalar},
    "sub": {operator.sub, torch.sub, _aten.sub.Tensor, _aten.sub.Scalar},
    "mul": {operator.mul, torch.mul, _aten.mul.Tensor, _aten.mul.Scalar},
    "div": {operator.truediv, torch.div, torch.true_divide, _aten.div.Tensor, _aten.div.Scalar},
}
_BINARY_METHODS = {"add": "add", "sub": "sub", "mul": "mul", "div": "div", "true_divide": "div"}
_UNARY = {
    "relu": {torch.relu, F.relu, _aten.relu.default},
    "silu": {F.silu, torch._C._nn.silu, _aten.silu.default},
    "tanh": {torch.tanh, F.tanh, _aten.tanh.default},
    "sigmoid": {torch.sigmoid, F.sigmoid, _aten.sigmoid.default},
}
_UNARY_METHODS = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}
_GELU = {F.gelu, _aten.gelu.default}
_CAST_METHODS = {"float": "float32", "half": "float16", "bfloat16": "bfloat16"}
_DTYPE_NAMES = {v: k for k, v in CAST_DTYPES.items()}
_REVERSED = {"sub": "rsub", "div": "rdiv", "add": "add", "mul": "mul"}


def _roast_linear_op():
    try:
        return torch.ops.roastfx.roast_linear.default
    except (AttributeError, RuntimeError):  # the op was never registered: no roast_linear in any graph
        return None


def _linear_args(node):
    names = ("x", "memory", "mapping", "scale", "bias", "act", "transpose_view", "grad_norm")
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    return (args["x"], args["memory"], args["mapping"], args["scale"], args.get("bias"), args.get("act", "none"),
            bool(args.get("transpose_view", False)), bool(args.get("grad_norm", False)))


def _meta_value(node):
    for key in ("val", "example_value", "tensor_meta"):
        if node.meta.get(key) is not None:
            return node.meta[key]
    return None


def _shape(node):
    val = _meta_value(node)
    shape = getattr(val, "shape", None)
    return tuple(shape) if shape is not None and hasattr(val, "dtype") else None


def _known(condition) -> bool:
    """True only when a (possibly symbolic) condition is true for every shape: no guard is added."""
    if isinstance(condition, bool):
        return condition
    try:
        from torch.fx.experimental.symbolic_shapes import statically_known_true
    except ImportError:
        return False
    return statically_known_true(condition)


def _fits(extra_shape, out_shape) -> bool:
    """``extra_shape`` broadcasts to ``out_shape`` without growing it."""
    if len(extra_shape) > len(out_shape):
        return False
    tail = out_shape[len(out_shape) - len(extra_shape):]
    return all(_known(e == 1) or _known(e == o) for e, o in zip(extra_shape, tail))


def _lower(user, cur):
    """(op, operand) for a user that applies a lowerable op to ``cur``: operand None, a number or a Node.

    Returns None if the user is not such an op.
    """
    args, kwargs = user.args, user.kwargs
    if user.op == "call_method":
        name = user.target
        if name in _BINARY_METHODS and len(args) == 2 and not kwargs:
            op = _BINARY_METHODS[name]
            if args[0] is cur:
                return op, args[1]
            return (_REVERSED[op], args[0]) if args[1] is cur else None
        if name in _UNARY_METHODS and args == (cur,) and not kwargs:
            return _UNARY_METHODS[name], None
        if name in _CAST_METHODS and args == (cur,) and not kwargs:
            return "cast:" + _CAST_METHODS[name], None
        if name == "to" and args[:1] == (cur,):
            dtype = args[1] if len(args) == 2 and not kwargs else kwargs.get("dtype") if len(args) == 1 else None
            if set(kwargs) <= {"dtype"} and dtype in _DTYPE_NAMES:
                return "cast:" + _DTYPE_NAMES[dtype], None
        return None
    if user.op != "call_function":
        return None
    target = user.target
    if target is operator.neg and args == (cur,):
        return "mul", -1.0
    for op, targets in _BINARY.items():
        if target in targets and len(args) == 2 and not kwargs:
            if args[0] is cur:
                return op, args[1]
            return (_REVERSED[op], args[0]) if args[1] is cur else None
    for op, targets in _UNARY.items():
        if target in targets and args == (cur,) and not kwargs.get("inplace"):
            return op, None
    if target in _GELU and args[:1] == (cur,) and len(args) <= 2:
        approximate = args[1] if len(args) == 2 else kwargs.get("approximate", "none")
        if approximate in ("none", "tanh") and set(kwargs) <= {"approximate"}:
            return ("gelu" if approximate == "none" else "gelu_tanh"), None
    return None


def _step(lowered, out_shape, extras, chain) -> Step | None:
    """The IR step for a lowered op, appending a tensor operand to ``extras``; None if the operand won't do."""
    op, operand = lowered
    if op.startswith("cast:"):
        return Step("cast", dtype=op[5:])
    if operand is None:
        return Step(op)
    if isinstance(operand, numbers.Real) and not isinstance(operand, bool):
        value = float(operand)
        if value != value or value in (float("inf"), float("-inf")):
            return None
        return Step(op, value=value)
    if not isinstance(operand, torch.fx.Node) or operand in chain:
        return None
    shape = _shape(operand)
    if out_shape is None or shape is None or not _fits(shape, out_shape):
        return None
    extras.append(operand)
    return Step(op, extra=len(extras) - 1)


def _fuse_one(graph: torch.fx.Graph, node: torch.fx.Node) -> str | None:
    x, memory, mapping, scale, bias, act, transpose_view, grad_norm = _linear_args(node)
    extras: list[torch.fx.Node] = []
    steps: list[Step] = []
    if bias is not None:
        extras.append(bias)
        steps.append(Step("add", extra=0))
    if act not in (None, "none"):
        steps.append(Step(act))
    out_shape = _shape(node)
    chain, cur, stopped = [node], node, None
    while len(cur.users) == 1:
        user = next(iter(cur.users))
        lowered = _lower(user, cur)
        step = _step(lowered, out_shape, extras, chain) if lowered is not None else None
        if step is None:
            stopped = user
            break
        steps.append(step)
        chain.append(user)
        cur = user
    if len(chain) == 1:
        return None
    epilogue = Epilogue(tuple(steps))
    last = chain[-1]
    with graph.inserting_before(last):
        # under dynamic=True dynamo may pass the scale as a symbolic float (a graph node): keep it as is
        scale = scale if isinstance(scale, torch.fx.Node) else float(scale)
        fused = graph.call_function(fused_op(), (x, memory, list(mapping), scale, list(extras),
                                                 epilogue.signature, transpose_view, grad_norm))
    fused.meta.update(last.meta)
    last.replace_all_uses_with(fused)
    for n in reversed(chain):
        graph.erase_node(n)
    folded = ", ".join(n.name for n in chain[1:])
    stop = f"; stops at {stopped.name} ({_describe(stopped)})" if stopped is not None and stopped.op != "output" else ""
    return f"{fused.name}: {node.name} + {folded} -> epilogue {epilogue.signature}{stop}"


def _describe(node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return getattr(node.target, "__name__", str(node.target))


def fuse_epilogue(gm: torch.fx.GraphModule) -> list[str]:
    """The pass: rewrite every roast_linear with a foldable pointwise chain; return what it folded."""
    target = _roast_linear_op()
    if target is None:
        return []
    folded = []
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is target:
            done = _fuse_one(gm.graph, node)
            if done:
                folded.append(done)
    if folded:
        gm.graph.lint()
        gm.recompile()
    for line in folded:
        log.info("roast backend: %s", line)
    return folded
