"""Rewrite ``linear(x, <weight read from the memory>)`` into one ``roastfx::roast_linear`` op,
and ``embedding(ids, <table read from the memory>)`` into ``roastfx::roast_embedding``.

Matches, in dynamo's graph of a compressed model, a ``roastfx::materialize``
whose B view reaches a matmul-like op only through the reshape (and transpose)
that turns it back into the dense weight, and replaces the whole chain with
``roast_linear(x, memory, mapping, scale, bias)``, so the dense weight is never
built. Anything else keeps the materialize (the correct fallback).
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger("roastfx")

_LINEAR = {torch._C._nn.linear, F.linear}
_MATMUL = {operator.matmul, torch.matmul}
_EMBEDDING = {F.embedding}
_RESHAPE = {"reshape", "view"}
_TRANSPOSE = {"t"}


@dataclass
class SiteUse:
    node: str  # the graph node that reads a compressed weight
    fused: bool
    why: str


def _is_materialize(node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.roastfx.materialize.default


def _method_or_fn(node, names) -> bool:
    if node.op == "call_method":
        return node.target in names
    return node.op == "call_function" and getattr(node.target, "__name__", "") in names


def _source(weight) -> tuple[torch.fx.Node | None, int, list]:
    """Walk back from a weight through reshape/t to a materialize: (node, transposes, chain)."""
    chain, transposes, node = [], 0, weight
    while isinstance(node, torch.fx.Node) and not _is_materialize(node):
        if _method_or_fn(node, _RESHAPE) or _method_or_fn(node, _TRANSPOSE):
            transposes += _method_or_fn(node, _TRANSPOSE)
            chain.append(node)
            node = node.args[0]
        else:
            return None, 0, []
    return (node if isinstance(node, torch.fx.Node) else None), transposes, chain


def _weight_shape(node) -> tuple | None:
    val = node.meta.get("example_value")
    return tuple(val.shape) if val is not None else None


def fuse_roast_ops(gm: torch.fx.GraphModule) -> list[SiteUse]:
    """The pass: rewrite each fusable use, leave the rest; return what happened to each use."""
    uses: list[SiteUse] = []
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _LINEAR | _MATMUL:
            continue
        is_linear = node.target in _LINEAR
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        mat, transposes, chain = _source(weight)
        if mat is None:
            continue
        memory, mapping, scale = mat.args
        rows, cols = mapping[0], mapping[1]
        shape = _weight_shape(weight)
        # linear(x, W) = x @ W.T must equal x @ V; matmul(x, W) = x @ W must equal x @ V
        want = (cols, rows) if is_linear else (rows, cols)
        parity_ok = transposes % 2 == (1 if is_linear else 0)
        if shape != want or not parity_ok or any(len(n.users) > 1 for n in chain):
            uses.append(SiteUse(node.name, False, f"weight view {shape} is not the site's plain view {want}"))
            continue
        bias = None
        if is_linear:
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        with graph.inserting_before(node):
            fused = graph.call_function(torch.ops.roastfx.roast_linear.default,
                                        (node.args[0], memory, list(mapping), scale, bias))
        fused.meta.update(node.meta)
        node.replace_all_uses_with(fused)
        graph.erase_node(node)
        act = _fuse_activation(graph, fused)
        uses.append(SiteUse(fused.name, True, "roast_linear" + (f" + {act}" if act else "")))
    uses.extend(_fuse_embeddings(graph))
    graph.eliminate_dead_code()
    for n in graph.nodes:
        if _is_materialize(n):
            users = ", ".join(u.name for u in n.users)
            uses.append(SiteUse(n.name, False, f"materialized for {users or 'no user'} (no fused op yet)"))
    gm.recompile()
    for u in uses:
        log.info("roast backend: %s %s (%s)", u.node, "fused" if u.fused else "fallback", u.why)
    return uses


def _activation_of(node) -> str | None:
    """The epilogue activation this node computes on its first argument, if roast_linear can fuse it."""
    if node.op == "call_method" and node.target == "relu" and len(node.args) == 1:
        return "relu"
    if node.op != "call_function":
        return None
    if node.target in (torch.relu, F.relu) and not node.kwargs.get("inplace") and len(node.args) == 1:
        return "relu"
    if node.target is F.silu and not node.kwargs.get("inplace") and len(node.args) == 1:
        return "silu"
    if node.target is F.gelu and node.kwargs.get("approximate") == "tanh" and len(node.args) == 1:
        return "gelu_tanh"
    return None


def _fuse_activation(graph: torch.fx.Graph, fused: torch.fx.Node) -> str | None:
    """Fold the single activation that follows a roast_linear into its epilogue."""
    if len(fused.users) != 1:
        return None
    (user,) = fused.users
    act = _activation_of(user)
    if act is None or user.args[0] is not fused:
        return None
    fused.args = (*fused.args, act)
    user.replace_all_uses_with(fused)
    graph.erase_node(user)
    return act


def _embedding_options_plain(node) -> bool:
    """padding_idx, max_norm (which renormalizes the table in place) and scale_grad_by_freq are not fused."""
    names = ("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
    extra = dict(zip(names, node.args[2:]), **node.kwargs)
    return (extra.get("padding_idx") is None and extra.get("max_norm") is None
            and not extra.get("scale_grad_by_freq") and not extra.get("sparse"))


def _fuse_embeddings(graph: torch.fx.Graph) -> list[SiteUse]:
    uses = []
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _EMBEDDING:
            continue
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        mat, transposes, chain = _source(weight)
        if mat is None:
            continue
        memory, mapping, scale = mat.args
        plain = _weight_shape(weight) == (mapping[0], mapping[1]) and transposes == 0
        if not plain or not _embedding_options_plain(node) or any(len(n.users) > 1 for n in chain):
            uses.append(SiteUse(node.name, False, "embedding with padding_idx/max_norm or a reshaped table"))
            continue
        with graph.inserting_before(node):
            fused = graph.call_function(torch.ops.roastfx.roast_embedding.default,
                                        (node.args[0], memory, list(mapping), scale))
        fused.meta.update(node.meta)
        node.replace_all_uses_with(fused)
        graph.erase_node(node)
        uses.append(SiteUse(fused.name, True, "roast_embedding"))
    return uses
