"""How a weight operand of a graph is read from the memory.

In dynamo's graph of a compressed model a weight is ``roastfx::materialize``
(the site's B view V, (rows, cols)) followed by ops that rebuild the dense
weight: reshape/view, t/transpose/permute/.T/.mT, expand/unsqueeze; with
``grad_scaling="site"`` also ``roastfx::site_grad_norm`` (identity forward; its
backward divides the view's gradient by its RMS); and a cast (``.to(dtype)``, ``.type(dtype)``,
``.float()`` ...) where the weight is read in another dtype than the memory's (``memory_dtype="float32"``
under a bfloat16 model; a router computing in float32), which a roast op computing in its input's dtype does
itself. ``weight_read`` replays that
chain and says what the weight is in terms of V, and whether the roast op must
normalize the gradient (its ``grad_norm`` flag), which is what a rewrite into a
roast op needs to know.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch._dispatch.python import enable_python_dispatcher

# the consumers in dynamo's graph that read a weight as a GEMM operand (F.conv1d/2d/3d and F.conv_transpose*
# are these same functions), with their spatial dims
LINEAR_OPS = {torch._C._nn.linear, torch.nn.functional.linear}
CONV_OPS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
CONV_TRANSPOSE_OPS = {torch.conv_transpose1d: 1, torch.conv_transpose2d: 2, torch.conv_transpose3d: 3}

_RESHAPE = {"reshape", "view", "squeeze"}  # squeezing size-1 dims is a reshape
_TRANSPOSE = {"t", "transpose", "permute", "T", "mT"}
_BROADCAST = {"expand", "unsqueeze"}
_IDENTITY = {"contiguous"}
CHAIN_OPS = _RESHAPE | _TRANSPOSE | _BROADCAST | _IDENTITY  # ops that rebuild a weight from its view


@dataclass
class WeightRead:
    """A weight computed from one materialize: ``(V or V^T).reshape(shape)``, maybe broadcast."""

    materialize: torch.fx.Node
    transposed: bool  # built from V^T (else from V)
    shape: tuple  # its shape without the broadcast dims
    broadcast: int  # leading dims added by expand/unsqueeze
    chain: list  # the nodes between the materialize and the weight
    grad_norm: bool = False  # the chain holds a site_grad_norm: the roast op normalizes the view's gradient
    cast: torch.dtype | None = None  # the chain casts the weight to this dtype

    @property
    def mapping(self) -> list:
        return list(self.materialize.args[1])

    @property
    def matrix(self) -> bool:
        """Exactly V or V^T, 2-D (possibly broadcast over leading dims)."""
        rows, cols = self.mapping[0], self.mapping[1]
        return self.shape == ((cols, rows) if self.transposed else (rows, cols))


def is_materialize(node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.roastfx.materialize.default


def is_site_grad_norm(node) -> bool:
    if node.op != "call_function":
        return False
    try:
        return node.target is torch.ops.roastfx.site_grad_norm.default
    except (AttributeError, RuntimeError):  # never registered: no model in this process scales gradients
        return False


_CAST_METHODS = {"float": torch.float32, "double": torch.float64, "half": torch.float16,
                 "bfloat16": torch.bfloat16}


def cast_dtype(node) -> torch.dtype | None:
    """The dtype of a pure dtype cast, ``t.to(dtype)`` or ``t.type(dtype)`` (no device, copy or memory format),
    ``t.float()``, ``t.double()``, ``t.half()`` or ``t.bfloat16()``, else None."""
    if node.op != "call_method" or node.kwargs:
        return None
    if node.target in _CAST_METHODS and len(node.args) == 1:
        return _CAST_METHODS[node.target]
    if node.target not in ("to", "type") or len(node.args) != 2:
        return None
    return node.args[1] if isinstance(node.args[1], torch.dtype) else None


def is_chain_step(node) -> bool:
    """Whether ``node`` is one of the ops that rebuild a weight from its view (a reshape, transpose,
    broadcast, site_grad_norm or pure dtype cast)."""
    return is_site_grad_norm(node) or cast_dtype(node) is not None or (
        node.op in ("call_method", "call_function") and op_name(node) in CHAIN_OPS)


def transpose_property(node) -> str | None:
    """"T" or "mT" when ``node`` reads that transposing property (``w.T``: a ``getattr`` call in dynamo's
    graph), else None."""
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2 and node.args[1] in ("T", "mT"):
        return node.args[1]
    return None


def op_name(node) -> str:
    """The op a node calls; the transposing properties ``w.T`` and ``w.mT`` as "T" and "mT"."""
    if node.op == "call_method":
        return node.target
    if node.op != "call_function":
        return ""
    return transpose_property(node) or getattr(node.target, "__name__", "")


def example_shape(node) -> tuple | None:
    val = node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _swaps_2d(node) -> bool:
    """t(), .T, .mT, transpose(a, b) or permute(1, 0) of a 2-D tensor: does it swap the two dims?"""
    if node.target == "t" or op_name(node) in ("t", "T", "mT"):
        return True
    dims = [d for a in node.args[1:] for d in (a if isinstance(a, (list, tuple)) else (a,))]
    if op_name(node) == "transpose":
        return len(dims) == 2 and dims[0] % 2 != dims[1] % 2
    return [d % 2 for d in dims] == [1, 0]


def _chain(weight):
    """(materialize, chain from the weight back to it, grad_norm, cast) of a weight operand, or None when it does
    not come from one materialize through chain steps only."""
    chain, node, norms, casts = [], weight, 0, []
    while isinstance(node, torch.fx.Node) and not is_materialize(node):
        norms += is_site_grad_norm(node)
        if not is_chain_step(node):
            return None
        if cast_dtype(node) is not None:
            casts.append(cast_dtype(node))
        chain.append(node)
        node = node.args[0]
    if not isinstance(node, torch.fx.Node) or norms > 1 or len(casts) > 1:
        return None
    return node, chain, norms == 1, casts[0] if casts else None


def reads_memory(weight) -> bool:
    """Whether ``weight`` comes from one materialize through chain steps only (a compressed weight's read)."""
    return _chain(weight) is not None


def weight_read(weight) -> WeightRead | None:
    """The read behind a weight operand, or None when it does not come from one materialize
    through reshape / transpose / broadcast ops only."""
    found = _chain(weight)
    if found is None:
        return None
    node, chain, norm, cast = found
    mapping = node.args[1]
    read = WeightRead(node, False, (mapping[0], mapping[1]), 0, chain, norm, cast)
    for step in reversed(chain):  # replay the chain from the view to the weight
        name, out = op_name(step), example_shape(step)
        if name in _IDENTITY or is_site_grad_norm(step) or cast_dtype(step) is not None:
            continue
        if name in _RESHAPE and not read.broadcast and out is not None:
            read.shape = out
        elif name in _TRANSPOSE and read.matrix and not read.broadcast:
            if _swaps_2d(step):
                read.transposed, read.shape = not read.transposed, read.shape[::-1]
        elif name in _BROADCAST and read.matrix and out is not None and out[-2:] == read.shape:
            read.broadcast = len(out) - 2
        elif name == "unsqueeze" and not read.broadcast and out is not None:
            read.shape = out  # a size-1 dim added elsewhere than in front of a matrix: a reshape
        else:
            return None
    return read


@dataclass
class GroupedRead:
    """A stacked (groups, ., .) weight computed from one materialize of a grouped site's view V (K, groups * N):
    group g is B_g = V[:, g*N:(g+1)*N] (``transposed``: B_g^T), as a grouped GEMM reads it."""

    materialize: torch.fx.Node
    groups: int
    transposed: bool
    chain: list
    grad_norm: bool = False
    cast: torch.dtype | None = None

    @property
    def mapping(self) -> list:
        return list(self.materialize.args[1])


def _dims(step) -> list[int]:
    return [d for a in step.args[1:] for d in (a if isinstance(a, (list, tuple)) else (a,))]


def grouped_read(weight) -> GroupedRead | None:
    """The read behind a grouped GEMM's weight operand, or None when it is not a grouped site's view split into
    (K, groups, N) and permuted to (groups, K, N) or (groups, N, K), through reshapes, transposes and permutes:
    the chain is replayed on the axes' names."""
    found = _chain(weight)
    if found is None:
        return None
    node, chain, norm, cast = found
    k, width = node.args[1][0], node.args[1][1]
    axes, sizes, groups = ["k", "gn"], {"k": k, "gn": width}, None
    for step in reversed(chain):
        name, out = op_name(step), example_shape(step)
        if name in _IDENTITY or is_site_grad_norm(step) or cast_dtype(step) is not None:
            continue
        if step.kwargs or out is None:
            return None
        if name in _RESHAPE:
            if axes == ["k", "gn"] and len(out) == 3 and out[0] == k and out[1] * out[2] == width:
                axes, groups = ["k", "g", "n"], out[1]
                sizes.update(g=out[1], n=out[2])
            elif out != tuple(sizes[a] for a in axes):
                return None
        elif name in ("T", "mT") and len(axes) == 3:  # .T reverses the dims, .mT swaps the last two
            axes = axes[::-1] if name == "T" else [axes[0], axes[2], axes[1]]
        elif name in ("transpose", "permute") and len(axes) == 3:
            dims = [d % 3 for d in _dims(step)]
            if name == "transpose" and len(dims) == 2:
                axes[dims[0]], axes[dims[1]] = axes[dims[1]], axes[dims[0]]
            elif name == "permute" and sorted(dims) == [0, 1, 2]:
                axes = [axes[d] for d in dims]
            else:
                return None
        else:
            return None
    if axes not in (["g", "k", "n"], ["g", "n", "k"]):
        return None
    return GroupedRead(node, groups, axes == ["g", "n", "k"], chain, norm, cast)


def gathered_read(node) -> tuple[GroupedRead, torch.fx.Node] | None:
    """(the grouped read, ids) when ``node`` picks one stacked weight per row, ``W[ids]`` or
    ``W.index_select(0, ids)`` with ids a 1-D integer tensor (transformers' ``batched_mm`` experts), W a grouped
    site's read; else None."""
    if not isinstance(node, torch.fx.Node) or node.op not in ("call_function", "call_method") or node.kwargs:
        return None
    name = op_name(node)
    if name == "getitem" and len(node.args) == 2:
        weight, ids = node.args
        if isinstance(ids, (tuple, list)) and len(ids) == 1:
            ids = ids[0]
    elif name == "index_select" and len(node.args) == 3 and node.args[1] == 0:
        weight, _, ids = node.args
    else:
        return None
    val = ids.meta.get("example_value") if isinstance(ids, torch.fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() != 1 or val.dtype.is_floating_point or val.dtype == torch.bool:
        return None
    read = grouped_read(weight)
    return None if read is None else (read, ids)


def _einsum_specs(equation: str, weight_index: int) -> tuple[str, str, str] | None:
    """(the weight's subscripts, x's, the output's) of a two-operand einsum with an explicit output ("..." as
    "*"), or None."""
    eq = equation.replace(" ", "").replace("...", "*")
    if "->" not in eq:
        return None
    inputs, out = eq.split("->")
    specs = inputs.split(",")
    if len(specs) != 2:
        return None
    return specs[weight_index], specs[1 - weight_index], out


def einsum_as_matmul(equation: str, weight_index: int) -> bool | None:
    """For a two-operand einsum whose operand ``weight_index`` is a 2-D W: False when it computes
    x @ W (contracting x's last dim with W's first), True when x @ W.T, None otherwise."""
    specs = _einsum_specs(equation, weight_index)
    if specs is None:
        return None
    w, x, out = specs
    if len(w) != 2 or w[0] == w[1] or "*" in w or not x or len(set(x)) != len(x) or x[-1] not in w:
        return None
    contracted = x[-1]
    kept = w[1] if w[0] == contracted else w[0]
    if out != x[:-1] + kept or kept in x:
        return None
    return w[1] == contracted


@dataclass
class EinsumBlocks:
    """An einsum of x with an n-D weight W that is one GEMM: x's trailing ``contracted`` dims flattened, times
    the matrix M = W.reshape(prod(W's first ``split`` dims), prod(the rest)) (``transposed``: times M^T), the
    result's last dim unflattened to ``kept``."""

    contracted: int
    transposed: bool
    kept: tuple


def einsum_blocks(equation: str, weight_index: int, shape: tuple, split: int) -> EinsumBlocks | None:
    """For a two-operand einsum whose operand ``weight_index`` is a weight of ``shape``: whether it contracts
    exactly W's first ``split`` dims or exactly the others, in W's order, with x's last dims, keeping W's other
    dims last in the output (``"ibh,hnd->ibnd"``, ``"ibnd,hnd->ibh"``: XLNet's and Funnel's (d_model, heads,
    head_dim) projections), and nothing else shared: then an ``EinsumBlocks``, else None."""
    specs = _einsum_specs(equation, weight_index)
    if specs is None or not 0 < split < len(shape):
        return None
    w, x, out = specs
    if len(w) != len(shape) or "*" in w or len(set(w)) != len(w) or len(set(x)) != len(x) or len(set(out)) != len(out):
        return None
    for contracted, kept, transposed in ((w[:split], w[split:], False), (w[split:], w[:split], True)):
        prefix = x[:len(x) - len(contracted)]
        if x.endswith(contracted) and out == prefix + kept and not set(prefix) & set(w):
            sizes = tuple(shape[w.index(c)] for c in kept)
            return EinsumBlocks(len(contracted), transposed, sizes)
    return None


def final_users(node) -> list:
    """The users of a weight after the reshape/transpose chain that rebuilds it."""
    out = []
    for user in node.users:
        if is_chain_step(user) and user.args and user.args[0] is node:
            out.extend(final_users(user))
        else:
            out.append(user)
    return out


def with_example(node, like=None):
    """Give a new node the fake value dynamo gives every node (``meta["example_value"]``), computed from its
    inputs' in their fake mode, so the passes after this one see its shape and dtype. Where the inputs have
    none that fake mode takes (compress_graph's reads hold meta tensors), ``like``'s (a node of the same
    shape and dtype), if given."""
    def value(a):
        return a.meta.get("example_value") if isinstance(a, torch.fx.Node) else a

    args = torch.fx.node.map_aggregate(node.args, value)
    kwargs = torch.fx.node.map_aggregate(node.kwargs, value)
    tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
    mode = getattr(tensors[0], "fake_mode", None) if tensors else None
    if mode is not None and all(getattr(t, "fake_mode", None) is mode for t in tensors) and \
            all(value(a) is not None for a in node.all_input_nodes):
        # as dynamo runs ops on fake values: with the Python dispatcher, whose decompositions take symbolic sizes
        # (under torch 2.11 linear's C++ one asks a dynamic-shape tensor for its numel and fails)
        with mode, enable_python_dispatcher():
            if node.op == "call_method":
                node.meta["example_value"] = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                node.meta["example_value"] = node.target(*args, **kwargs)
    elif like is not None and "example_value" in like.meta:
        node.meta["example_value"] = like.meta["example_value"]
    return node


def cast_to(graph, node, dtype):
    """``node`` cast to ``dtype`` by a new node with its example value (None, or node already in it: ``node``).
    Under autocast an op computes in a lower precision than the float32 tensors next to it (a bias, weight
    norm's g), and combining them uncast would promote the result where eager's op gives its own dtype."""
    if dtype is None or getattr(node.meta.get("example_value"), "dtype", None) == dtype:
        return node
    return with_example(graph.call_method("to", (node, dtype)))


def call_with_example(graph, target, args, kwargs=None, like=None):
    return with_example(graph.call_function(target, args, kwargs or {}), like)
