"""Compress inside the compiler: turn weight placeholders of dynamo's graph into memory reads.

For an uncompressed model compiled with ``options={"compression": ...}``: dynamo
hands parameters to the backend as placeholders whose example inputs are the
live ``nn.Parameter`` objects. ``graph_sites`` finds those that feed matmul-like
ops; ``read_from_memory`` builds a fresh GraphModule (dynamo's own must not gain
inputs) with one extra input, the memory, and every site's uses rewired to
``roastfx::materialize`` of it. The user's dense weights are left untouched.
``frame_root`` finds the model those parameters belong to, so that every graph
of one model (graph breaks, recompiles) can share one plan and one memory.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from roastfx.codegen.reference import GROUPED, grouped_dims
from roastfx.plan import Plan

from .capture_sites import SiteSpec, dtype_name, trace_uses

MEMORY_INPUT = "roast_memory"


def _param_name(node: torch.fx.Node) -> str:
    """The parameter's name in the model (e.g. fc1.weight), read from dynamo's source."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    name = getattr(source, "name", None)
    name = name() if callable(name) else name
    if isinstance(name, str):
        keys = re.findall(r"\['([^']+)'\]", name)
        if keys and keys[0] == "self":
            keys = keys[1:]
        if keys:
            return ".".join(keys)
    return node.name


def graph_sites(gm: torch.fx.GraphModule, example_inputs) -> list[tuple[torch.fx.Node, nn.Parameter, SiteSpec]]:
    """(placeholder, parameter, spec) for each parameter input that feeds a matmul-like op."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    found = []
    for node, value in zip(placeholders, example_inputs):
        if not isinstance(value, nn.Parameter) or value.dim() < 2:
            continue
        uses = trace_uses(node)
        if uses:
            op, transposed = uses[0]
            name = _param_name(node)
            found.append((node, value, SiteSpec(name, (name,), tuple(value.shape), op, transposed,
                                                dtype_name(value))))
    return found


def frame_root(gm: torch.fx.GraphModule, params) -> nn.Module | None:
    """The module whose parameters these are, read from the frame dynamo is compiling: the
    local (``self`` of a forward) or global the parameters' sources start from.

    None when it cannot be found (dynamo's tracer is internal API; no version is relied on).
    """
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        scopes = {"local_name": tx.f_locals, "global_name": tx.f_globals}
    except Exception:  # not inside dynamo, or its internals changed
        return None
    wanted = {id(p) for p in params}
    for node in gm.graph.nodes:
        source = getattr(node.meta.get("grapharg"), "source", None) if node.op == "placeholder" else None
        while getattr(source, "base", None) is not None:
            source = source.base
        for attr, scope in scopes.items():
            value = scope.get(getattr(source, attr, None)) if source is not None else None
            if isinstance(value, nn.Module) and wanted <= {id(p) for p in value.parameters()}:
                return value
    return None


def _read_weight(graph: torch.fx.Graph, memory: torch.fx.Node, site) -> torch.fx.Node:
    """materialize -> (t) -> reshape: the site's dense weight rebuilt from the memory."""
    m = site.mapping
    mapping = [int(v) for v in m.to_dict().values()]
    view = graph.call_function(torch.ops.roastfx.materialize.default, (memory, mapping, site.scale))
    view.meta["example_value"] = torch.empty((m.rows, m.cols), device="meta")
    weight = view
    if site.op == GROUPED:  # (K, groups * N) -> (K, groups, N) -> the stored order (codegen.reference.view_to_weight)
        groups, k, n = grouped_dims(site.shape, site.transposed)
        weight = graph.call_method("reshape", (view, (k, groups, n)))
        weight.meta["example_value"] = torch.empty((k, groups, n), device="meta")
        weight = graph.call_method("permute", (weight, (1, 2, 0) if site.transposed else (1, 0, 2)))
        weight.meta["example_value"] = torch.empty(site.shape, device="meta")
        return weight
    if site.transposed:
        weight = graph.call_method("t", (view,))
        weight.meta["example_value"] = torch.empty((m.cols, m.rows), device="meta")
    weight = graph.call_method("reshape", (weight, site.shape))
    weight.meta["example_value"] = torch.empty(site.shape, device="meta")
    return weight


def read_from_memory(gm: torch.fx.GraphModule, plan: Plan,
                     site_nodes: dict[str, torch.fx.Node]) -> torch.fx.GraphModule:
    """A fresh GraphModule whose last input is the memory and whose sites (those of the plan
    that ``site_nodes`` names: this graph's) read from it."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    output = graph.graph_copy(gm.graph, env, return_output_node=True)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]):
        memory = graph.placeholder(MEMORY_INPUT)
    for site in plan.sites:
        if site.name not in site_nodes:
            continue
        old = env[site_nodes[site.name]]
        for user in list(old.users):  # one read per use, as dynamo records a compressed model: each fuses alone
            with graph.inserting_before(user):
                user.replace_input_with(old, _read_weight(graph, memory, site))
    value, old_output = output
    graph.output(value).meta = dict(old_output.meta)
    new = torch.fx.GraphModule(gm, graph)
    new.graph.lint()
    return new
