"""Fold the pointwise ops after each ``roastfx::roast_linear``, ``roast_conv``, ``roast_conv_transpose`` and
``roast_embedding`` into one epilogue op.

For each ``roast_linear(x, memory, mapping, scale, bias, act[, transpose_view, grad_norm])`` node
the pass grows, in graph order, the set of nodes that read it (or read nodes already in the
set) and that the epilogue IR can express (codegen/epilogue.py):

- +, -, *, / between values of the set, constants, and tensors from outside the set that
  broadcast to the output without growing it (bias, residual, per-column scale, another
  GEMM's output for a gated product ...); ``x ** n`` and ``pow(x, n)`` for n = 2, 3, 4;
  negation; relu, gelu (erf or tanh), silu, tanh, sigmoid, exp, erf; casts to
  float32/float16/bfloat16;
- views and reshapes that keep the last dimension (GPT-2's Conv1D: ``addmm`` then ``view``),
  dropout that is off (eval, or p=0), ``contiguous``: no step, the same value.

The set may read a value several times (GPT-2's gelu_new is ten nodes that read their input
three times), but only its last node may be read from outside it: the pass keeps the longest
graph-ordered prefix of the set with that property. The roast_linear and the prefix become one
``roastfx::roast_linear_epilogue`` node whose first steps are the bias and activation the
roast_linear already had (and its grad_norm flag); a trailing view becomes a reshape of the
fused node's output, and an outside tensor read after a view is reshaped to the GEMM's
(rows, N) layout first. Everything the pass cannot express stays in the graph.

Runs after fuse_roast_ops; knows nothing about kernels.
"""
from __future__ import annotations

import logging
import math
import numbers
import operator

import torch
import torch.nn.functional as F

from roastfx.codegen.epilogue import (CAST_DTYPES, Epilogue, Step, conv_fused_op, conv_transpose_fused_op,
                                     embedding_fused_op, fused_op)

log = logging.getLogger("roastfx")

_aten = torch.ops.aten
_PREV = object()  # an operand: the step just emitted for the same node (pow's repeated products)


class _Local:
    """An operand: the j-th step emitted for the same node (batch norm's intermediate values)."""

    def __init__(self, j: int):
        self.j = j


class _Channel:
    """An operand: a (C,) vector along the output's dim 1 (batch norm's statistics and affine)."""

    def __init__(self, node):
        self.node = node
_BINARY = {
    "add": {operator.add, torch.add, _aten.add.Tensor, _aten.add.Scalar},
    "sub": {operator.sub, torch.sub, _aten.sub.Tensor, _aten.sub.Scalar},
    "mul": {operator.mul, torch.mul, _aten.mul.Tensor, _aten.mul.Scalar},
    "div": {operator.truediv, torch.div, torch.true_divide, _aten.div.Tensor, _aten.div.Scalar},
}
_BINARY_METHODS = {"add": "add", "sub": "sub", "mul": "mul", "div": "div", "true_divide": "div"}
# x += y and friends: foldable when x is a value of the set (nobody else can see it change)
_INPLACE = {operator.iadd: "add", operator.isub: "sub", operator.imul: "mul", operator.itruediv: "div"}
_INPLACE_METHODS = {"add_": "add", "sub_": "sub", "mul_": "mul", "div_": "div"}
_UNARY = {
    "relu": {torch.relu, F.relu, _aten.relu.default},
    "silu": {F.silu, torch._C._nn.silu, _aten.silu.default},
    "tanh": {torch.tanh, F.tanh, _aten.tanh.default},
    "sigmoid": {torch.sigmoid, F.sigmoid, _aten.sigmoid.default},
    "exp": {torch.exp, _aten.exp.default},
    "erf": {torch.erf, torch.special.erf, _aten.erf.default},
}
_UNARY_METHODS = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid", "exp": "exp", "erf": "erf"}
_NEG = {operator.neg, torch.neg, _aten.neg.default}
_POW = {operator.pow, torch.pow, _aten.pow.Tensor_Scalar}
_DROPOUT = {F.dropout, torch.dropout}
_BATCH_NORM = {F.batch_norm}
_VIEW_METHODS = ("view", "reshape")
_IDENTITY_METHODS = ("contiguous",)
_GELU = {F.gelu, _aten.gelu.default}
_CAST_METHODS = {"float": "float32", "half": "float16", "bfloat16": "bfloat16"}
_DTYPE_NAMES = {v: k for k, v in CAST_DTYPES.items()}


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


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _pow_steps(base, exponent):
    """``base ** exponent`` as products, for an integer exponent 2..4."""
    if not _number(exponent) or float(exponent) not in (2.0, 3.0, 4.0):
        return None
    steps = [("mul", [base, base])]
    for _ in range(int(exponent) - 2):
        steps.append(("mul", [_PREV, base]))
    return steps


def _batch_norm_steps(node):
    """Eval batch norm, (x - mean) * rsqrt(var + eps) * weight + bias, as steps; None in training."""
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    mean, var = args.get("running_mean"), args.get("running_var")
    eps = args.get("eps", 1e-5)
    if set(args) - set(names) or args.get("training", False) is not False or mean is None or var is None \
            or not _number(eps):
        return None
    steps = [("sub", [args["input"], _Channel(mean)]), ("add", [_Channel(var), float(eps)]),
             ("rsqrt", [_Local(1)]), ("mul", [_Local(0), _Local(2)])]
    if args.get("weight") is not None:
        steps.append(("mul", [_PREV, _Channel(args["weight"])]))
    if args.get("bias") is not None:
        steps.append(("add", [_PREV, _Channel(args["bias"])]))
    # batch norm returns its input's dtype (a bfloat16 conv output under autocast, with float32 statistics):
    # the steps would promote to the statistics' dtype, so they end with a cast back
    out, stats = _meta_value(node), _meta_value(mean)
    if out is None or stats is None or out.dtype not in _DTYPE_NAMES:
        return None
    if out.dtype != stats.dtype:
        steps.append(("cast:" + _DTYPE_NAMES[out.dtype], [_PREV]))
    return "ops", steps


def _dropout_is_off(node) -> bool:
    names = ("input", "p", "training", "inplace") if node.target is F.dropout else ("input", "p", "train")
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    if set(args) - set(names) or args.get("inplace"):
        return False
    training = args.get("training", args.get("train", node.target is F.dropout))
    p = args.get("p", 0.5)
    return training is False or (_number(p) and float(p) == 0.0)


def _lower(user):
    """What a node does, if the epilogue can express it:

    ("ops", [(op, operands), ...]) IR steps, each operand a Node, a number or _PREV;
    ("inplace", [(op, [target, operand])]) the same for ``target op= operand``;
    ("same", node) the value of ``node`` (dropout that is off, contiguous);
    ("view", node) ``node`` reshaped; None otherwise.
    """
    args, kwargs = user.args, user.kwargs
    if user.op == "call_method":
        name = user.target
        if name in _BINARY_METHODS and len(args) == 2 and not kwargs:
            return "ops", [(_BINARY_METHODS[name], list(args))]
        if name in _INPLACE_METHODS and len(args) == 2 and not kwargs:
            return "inplace", [(_INPLACE_METHODS[name], list(args))]
        if name in _UNARY_METHODS and len(args) == 1 and not kwargs:
            return "ops", [(_UNARY_METHODS[name], list(args))]
        if name == "neg" and len(args) == 1 and not kwargs:
            return "ops", [("mul", [args[0], -1.0])]
        if name in _CAST_METHODS and len(args) == 1 and not kwargs:
            return "ops", [("cast:" + _CAST_METHODS[name], list(args))]
        if name == "to" and args:
            dtype = args[1] if len(args) == 2 and not kwargs else kwargs.get("dtype") if len(args) == 1 else None
            if set(kwargs) <= {"dtype"} and dtype in _DTYPE_NAMES:
                return "ops", [("cast:" + _DTYPE_NAMES[dtype], [args[0]])]
        if name == "pow" and len(args) == 2 and not kwargs:
            steps = _pow_steps(args[0], args[1])
            return ("ops", steps) if steps else None
        if name in _VIEW_METHODS and len(args) >= 2 and not kwargs and \
                not any(isinstance(a, torch.dtype) for a in args[1:]):  # x.view(dtype) reinterprets bits
            return "view", args[0]
        if name in _IDENTITY_METHODS and len(args) == 1 and not kwargs:
            return "same", args[0]
        return None
    if user.op != "call_function":
        return None
    target = user.target
    if target in _INPLACE and len(args) == 2 and not kwargs:
        return "inplace", [(_INPLACE[target], list(args))]
    if target in _NEG and len(args) == 1 and not kwargs:
        return "ops", [("mul", [args[0], -1.0])]
    if target in _POW and len(args) == 2 and not kwargs:
        steps = _pow_steps(args[0], args[1])
        return ("ops", steps) if steps else None
    for op, targets in _BINARY.items():
        if target in targets and len(args) == 2 and not kwargs:
            return "ops", [(op, list(args))]
    for op, targets in _UNARY.items():
        if target in targets and len(args) == 1 and not kwargs.get("inplace") and set(kwargs) <= {"inplace"}:
            return "ops", [(op, list(args))]
    if target in _GELU and len(args) in (1, 2):
        approximate = args[1] if len(args) == 2 else kwargs.get("approximate", "none")
        if approximate in ("none", "tanh") and set(kwargs) <= {"approximate"}:
            return "ops", [("gelu" if approximate == "none" else "gelu_tanh", [args[0]])]
    if target in _DROPOUT and args and _dropout_is_off(user):
        return "same", args[0]
    if target in _BATCH_NORM:
        return _batch_norm_steps(user)
    if target is torch.reshape and len(args) == 2 and not kwargs:
        return "view", args[0]
    return None


def _is_scalar(val) -> bool:
    return isinstance(val, (torch.SymFloat, torch.SymInt, float, int)) and not isinstance(val, bool)


def _same_shape(a, b) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(_known(x == y) for x, y in zip(a, b))


def _numel(shape):
    return math.prod(shape) if shape else 1


class _Growth:
    """The set of nodes folded into one root's epilogue, grown in graph order."""

    def __init__(self, root, bias, act, conv=False):
        self.root = root
        self.root_shape = _shape(root)
        self.conv = conv  # a conv's output (N, C, *spatial): channels on dim 1, no views
        self.steps: list[Step] = []
        # (node, how it is passed: None as it is, "flat" (1, .., 1, N) -> (N,), "rows" (.., N) -> (rows, N),
        # "scalar" a symbolic number as a 0-dim float64 tensor, "channel" a (C,) vector -> (C, 1, .., 1))
        self.extras: list[tuple[torch.fx.Node, str | None]] = []
        if bias is not None:
            self.extras.append((bias, "channel" if conv else None))
            self.steps.append(Step("add", ("v0", "x0")))
        if act not in (None, "none"):
            self.steps.append(Step(act, (f"v{len(self.steps)}",)))
        self.initial = len(self.steps)
        self.members = [root]
        self.ref = {root: f"v{len(self.steps)}"}
        self.shape = {root: self.root_shape}
        self.view = {root: None}  # the last view node on the way from the root, None if none
        self.steps_after = [len(self.steps)]
        self._downstream = None

    def downstream(self):
        """Every node that reads the root, directly or not: none of them can be an outside operand."""
        if self._downstream is None:
            seen, todo = set(), [self.root]
            while todo:
                for u in todo.pop().users:
                    if u not in seen:
                        seen.add(u)
                        todo.append(u)
            self._downstream = seen
        return self._downstream

    def _extra(self, node, consumer_shape, pending):
        """The ref of an outside tensor read at ``consumer_shape``, or None if it cannot be one."""
        channel = isinstance(node, _Channel)
        node = node.node if channel else node
        if node in self.downstream():
            return None
        shape = _shape(node)
        if channel:  # a (C,) vector along dim 1: as it is on a 2-D output, else reshaped to (C, 1, .., 1)
            if consumer_shape is None or shape is None or len(shape) != 1 or len(consumer_shape) < 2 \
                    or not _known(shape[0] == consumer_shape[1]):
                return None
            if not self.conv and not _same_shape(consumer_shape, self.root_shape):
                return None  # after a view dim 1 is not the fused op's dim 1
            how = None if len(consumer_shape) == 2 else "channel"
        elif shape is None and _is_scalar(_meta_value(node)) and self.root_shape is not None:
            how = "scalar"  # a symbolic number (dynamic=True traces floats such as math.pi as inputs)
        elif shape is None or not _fits(shape, consumer_shape):
            return None
        elif self.conv or _same_shape(consumer_shape, self.root_shape) or len(shape) <= 1:
            how = None
        elif all(_known(d == 1) for d in shape[:-1]):
            how = "flat"  # (1, ..., 1, N) -> (N,)
        elif _same_shape(shape, consumer_shape) and len(self.root_shape) == 2:
            how = "rows"  # read after a view: the same elements in the GEMM's (rows, N) layout
        else:
            return None
        key = (node, how)
        known = self.extras + pending
        if key not in known:
            pending.append(key)
            known = self.extras + pending
        return f"x{known.index(key)}"

    def add(self, node) -> bool:
        """Fold ``node`` if the epilogue can express it; False (and no change) otherwise."""
        lowered = _lower(node)
        if lowered is None:
            return False
        kind, what = lowered
        if kind == "inplace":
            if what[0][1][0] not in self.ref:
                return False  # it would change a tensor outside the set
            if any(_reads_after(m, node) for m in self.members):
                return False  # a later read of the set's tensor (or a view of it) sees the changed value
            kind = "ops"
        if kind == "same":
            if what not in self.ref:
                return False
            self._commit(node, self.ref[what], self.shape[what], self.view[what], [], [])
            return True
        if kind == "view":
            if self.conv:
                return False  # a conv's output keeps its layout: channels on dim 1
            out_shape, src = _shape(node), self.shape.get(what)
            if what not in self.ref or not out_shape or src is None or not (
                    _known(out_shape[-1] == self.root_shape[-1]) and _known(_numel(out_shape) == _numel(src))):
                return False  # a view that moves the last dimension would mix the GEMM's columns
            self._commit(node, self.ref[what], out_shape, node, [], [])
            return True
        inputs = [a for _, operands in what for a in operands if isinstance(a, torch.fx.Node) and a in self.ref]
        if not inputs:
            return False
        # a pointwise op on the set's values has their shape: outside operands may not grow it
        out_shape = self.shape[inputs[0]]
        if out_shape is None:
            # without shapes (an fx trace with no shape propagation) only ops on the set's values and
            # constants are safe
            if any(self.shape[a] is not None for a in inputs) or any(
                    isinstance(a, torch.fx.Node) and a not in self.ref for _, ops in what for a in ops):
                return False
        elif any(not _same_shape(out_shape, self.shape[a]) for a in inputs):
            return False  # two values of the set in different layouts
        views = {self.view[a] for a in inputs}
        if len(views) != 1:
            return False
        pending, steps = [], []
        for op, operands in what:
            args = []
            for a in operands:
                if a is _PREV:
                    args.append(f"v{len(self.steps) + len(steps)}")
                elif isinstance(a, _Local):
                    args.append(f"v{len(self.steps) + a.j + 1}")
                elif isinstance(a, _Channel):
                    ref = self._extra(a, out_shape, pending)
                    if ref is None:
                        return False
                    args.append(ref)
                elif isinstance(a, torch.fx.Node):
                    ref = self.ref.get(a) or self._extra(a, out_shape, pending)
                    if ref is None:
                        return False
                    args.append(ref)
                elif _number(a):
                    args.append(float(a))
                else:
                    return False
            try:
                steps.append(Step("cast", tuple(args), dtype=op[5:]) if op.startswith("cast:") else Step(op, tuple(args)))
            except (ValueError, TypeError):
                return False
        self._commit(node, f"v{len(self.steps) + len(steps)}", out_shape, views.pop(), steps, pending)
        return True

    def _commit(self, node, ref, shape, view, steps, extras):
        self.steps.extend(steps)
        self.extras.extend(extras)
        self.members.append(node)
        self.ref[node] = ref
        self.shape[node] = shape
        self.view[node] = view
        self.steps_after.append(len(self.steps))

    def best_prefix(self) -> int:
        """The largest p such that members[:p+1] is read from outside only through members[p], whose
        value is the last step, with a step beyond the root's own bias and activation; 0 if none."""
        for p in range(len(self.members) - 1, 0, -1):
            inside = set(self.members[:p + 1])
            escapes = [m for m in self.members[:p + 1] if any(u not in inside for u in m.users)]
            last = self.members[p]
            if (escapes == [last] and self.steps_after[p] > self.initial
                    and self.ref[last] == f"v{self.steps_after[p]}"):
                return p
        return 0


def _reads_after(value, node) -> bool:
    """Whether a user of ``value`` other than ``node`` comes after ``node`` in the graph."""
    others = {u for u in value.users if u is not node}
    cur = node.next
    while others and cur.op != "root":
        if cur in others:
            return True
        cur = cur.next
    return False


def _grow(node, bias, act, conv=False) -> _Growth | None:
    growth = _Growth(node, bias, act, conv)
    if growth.root_shape is not None and not growth.root_shape:
        return None
    waiting = set(node.users)
    cur = node.next
    while waiting and cur.op != "root":
        if cur in waiting:
            waiting.discard(cur)
            if growth.add(cur):
                waiting.update(cur.users)
        cur = cur.next
    return growth


def _reshape_args(view):
    """The size arguments of a view node, to reshape the fused output the same way."""
    return tuple(view.args[1:]) if view.op == "call_method" else (view.args[1],)


_CONV_NAMES = ("x", "memory", "mapping", "scale", "bias", "kernel", "stride", "padding", "dilation", "groups",
               "grad_norm")
_CONV_TRANSPOSE_NAMES = ("x", "memory", "mapping", "scale", "bias", "kernel", "stride", "padding", "output_padding",
                         "dilation", "groups", "grad_norm")


def _conv_args(node, transposed=False):
    args = dict(zip(_CONV_TRANSPOSE_NAMES if transposed else _CONV_NAMES, node.args))
    args.update(node.kwargs)
    args["grad_norm"] = bool(args.get("grad_norm", False))
    return args


def _embedding_args(node):
    names = ("ids", "memory", "mapping", "scale", "padding_idx", "grad_norm")
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    return args


def _fuse_one(graph: torch.fx.Graph, node: torch.fx.Node, conv: bool = False, embedding: bool = False,
              transposed: bool = False) -> str | None:
    if embedding:
        e = _embedding_args(node)
        x, memory, mapping, scale, bias, act = e["ids"], e["memory"], e["mapping"], e["scale"], None, "none"
        grad_norm = bool(e.get("grad_norm", False))
    elif conv:
        c = _conv_args(node, transposed)
        shape = _shape(node)
        if shape is None or len(shape) != len(c["kernel"]) + 2:
            return None  # an unbatched conv: its channels are not on dim 1
        x, memory, mapping, scale, bias, grad_norm = (c[k] for k in ("x", "memory", "mapping", "scale", "bias",
                                                                   "grad_norm"))
        act = "none"
    else:
        x, memory, mapping, scale, bias, act, transpose_view, grad_norm = _linear_args(node)
    growth = _grow(node, bias, act, conv)
    p = growth.best_prefix() if growth is not None else 0
    if not p:
        return None
    members = growth.members[:p + 1]
    last = members[-1]
    epilogue = Epilogue(tuple(growth.steps[:growth.steps_after[p]]))
    extras = growth.extras[:epilogue.num_extras]
    with graph.inserting_before(last):
        operands = []
        for extra, how in extras:
            if how == "flat":
                extra = graph.call_method("reshape", (extra, -1))
            elif how == "rows":
                extra = graph.call_method("reshape", (extra, -1, growth.root_shape[-1]))
            elif how == "scalar":  # float64 and 0-dim: it promotes like the Python number it stands for
                extra = graph.call_function(torch.scalar_tensor, (extra,),
                                            {"dtype": torch.float64, "device": _meta_value(node).device})
            elif how == "channel":
                extra = graph.call_method("reshape", (extra, -1, *[1] * (len(growth.root_shape) - 2)))
            operands.append(extra)
        # under dynamic=True dynamo may pass the scale as a symbolic float (a graph node): keep it as is
        scale = scale if isinstance(scale, torch.fx.Node) else float(scale)
        if embedding:
            fused = graph.call_function(embedding_fused_op(), (x, memory, list(mapping), scale, operands,
                                                               epilogue.signature, e.get("padding_idx"), grad_norm))
        elif conv and transposed:
            fused = graph.call_function(conv_transpose_fused_op(), (
                x, memory, list(mapping), scale, operands, epilogue.signature, list(c["kernel"]), list(c["stride"]),
                list(c["padding"]), list(c["output_padding"]), list(c["dilation"]), int(c.get("groups", 1)),
                grad_norm))
        elif conv:
            fused = graph.call_function(conv_fused_op(), (x, memory, list(mapping), scale, operands,
                                                          epilogue.signature, list(c["kernel"]), list(c["stride"]),
                                                          list(c["padding"]), list(c["dilation"]),
                                                          int(c["groups"]), grad_norm))
        else:
            fused = graph.call_function(fused_op(), (x, memory, list(mapping), scale, operands,
                                                     epilogue.signature, transpose_view, grad_norm))
        result = fused
        if growth.view[last] is not None:
            result = graph.call_method("reshape", (fused, *_reshape_args(growth.view[last])))
    result.meta.update(last.meta)
    if result is not fused:  # the fused node has the GEMM's layout and the epilogue's dtype
        fused.meta.update(node.meta)
        val, out = node.meta.get("val"), last.meta.get("val")
        if val is not None and out is not None and getattr(out, "dtype", val.dtype) != val.dtype:
            fused.meta["val"] = val.to(out.dtype)
    stopped = next((u for u in last.users), None)
    last.replace_all_uses_with(result)
    for n in reversed(members):
        graph.erase_node(n)
    folded = ", ".join(n.name for n in members[1:])
    stop = f"; stops at {stopped.name} ({_describe(stopped)})" if stopped is not None and stopped.op != "output" else ""
    return f"{fused.name}: {node.name} + {folded} -> epilogue {epilogue.signature}{stop}"


def _describe(node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return getattr(node.target, "__name__", str(node.target))


def _roast_conv_op():
    try:
        return torch.ops.roastfx.roast_conv.default
    except (AttributeError, RuntimeError):
        return None


def _roast_conv_transpose_op():
    try:
        return torch.ops.roastfx.roast_conv_transpose.default
    except (AttributeError, RuntimeError):
        return None


def _roast_embedding_op():
    try:
        return torch.ops.roastfx.roast_embedding.default
    except (AttributeError, RuntimeError):
        return None


def fuse_epilogue(gm: torch.fx.GraphModule) -> list[str]:
    """The pass: rewrite every roast_linear, roast_conv, roast_conv_transpose and roast_embedding with foldable
    pointwise ops; return what it folded."""
    linear, conv, embedding = _roast_linear_op(), _roast_conv_op(), _roast_embedding_op()
    transposed = _roast_conv_transpose_op()
    roots = {op for op in (linear, conv, transposed, embedding) if op is not None}
    if not roots:
        return []
    folded = []
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in roots:
            done = _fuse_one(gm.graph, node, conv=node.target in (conv, transposed), embedding=node.target is embedding,
                             transposed=node.target is transposed)
            if done:
                folded.append(done)
    if folded:
        gm.graph.lint()
        gm.recompile()
    for line in folded:
        log.info("roast backend: %s", line)
    return folded
