"""Find the sites of a model: every weight that feeds a matmul-like op.

Two sources, merged: module types (always) and, given example inputs, a trace
of the model (torch.export, non-strict) that also finds weights used
functionally (``x @ self.w``, ``F.linear(x, self.w)``, ``torch.einsum``).
Tied weights (one tensor bound under several names) become one site.
"""
from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger("roastfx")


@dataclass(frozen=True)
class SiteSpec:
    """A weight to compress, before the plan gives it a mapping."""

    name: str
    bindings: tuple[str, ...]
    shape: tuple[int, ...]
    op: str
    transposed: bool
    dtype: str
    other_ops: tuple[str, ...] = ()  # the ops of other modules that read the same (tied) weight


def name_matches(names, patterns) -> bool:
    """Whether a name pattern (fnmatch) matches one of a weight's names or the path of its
    module: how ``exclude`` and ``own_window`` pick sites."""
    paths = [n.rsplit(".", 1)[0] for n in names if "." in n]
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in (*names, *paths))


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def module_weight_attrs(module: nn.Module) -> list[tuple[str, str, bool]]:
    """(attr, op, transposed) for each matmul weight this module type is known to hold."""
    if isinstance(module, nn.Linear):
        return [("weight", "linear", True)]
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return [("weight", "conv", True)]
    # ConvTranspose weights are (in, out/groups, *kernel): the GEMM is x (pixels, in) @ W2d, then col2im
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return [("weight", "conv_transpose", False)]
    if isinstance(module, nn.EmbeddingBag):
        return [("weight", "embedding_bag", False)]
    if isinstance(module, nn.Embedding):
        return [("weight", "embedding", False)]
    if isinstance(module, nn.MultiheadAttention):
        names = ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"]
        return [(n, "attention", True) for n in names if isinstance(getattr(module, n, None), nn.Parameter)]
    if isinstance(module, nn.RNNBase):
        return [(n, "rnn", True) for n in module._flat_weights_names if n.startswith("weight_")]
    # transformers.pytorch_utils.Conv1D (GPT-2): weight is (in, out), forward is x @ W
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return [("weight", "matmul", False)]
    return []


_VIEW_OPS = {
    "t", "transpose", "permute", "view", "reshape", "expand", "_to_copy", "to", "contiguous",
    "detach", "alias", "clone", "unsqueeze", "squeeze", "type_as", "_unsafe_view", "lift_fresh_copy",
}
_TRANSPOSE_OPS = {"t", "transpose", "permute"}
_CONSUMERS = {
    "linear": ("linear", True), "addmm": ("matmul", False), "mm": ("matmul", False),
    "matmul": ("matmul", False), "bmm": ("matmul", False), "mv": ("matmul", False),
    "einsum": ("matmul", False), "baddbmm": ("matmul", False), "addmv": ("matmul", False),
    "conv1d": ("conv", True), "conv2d": ("conv", True), "conv3d": ("conv", True),
    "convolution": ("conv", True), "embedding": ("embedding", False),
    "conv_transpose1d": ("conv_transpose", False), "conv_transpose2d": ("conv_transpose", False),
    "conv_transpose3d": ("conv_transpose", False),
    "embedding_bag": ("embedding_bag", False), "_embedding_bag": ("embedding_bag", False),
    "lstm": ("rnn", True), "gru": ("rnn", True), "rnn_tanh": ("rnn", True), "rnn_relu": ("rnn", True),
    "_native_multi_head_attention": ("attention", True),
}


_WEIGHT_SECOND = {"linear", "conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d",
                  "conv_transpose3d"}
_BIAS_FIRST = {"addmm", "baddbmm", "addmv"}


def _op_name(node: torch.fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


def trace_uses(node: torch.fx.Node, transposes: int = 0, depth: int = 0) -> list[tuple[str, bool]]:
    """Follow a parameter through view-like ops to the matmul-like ops that consume it."""
    uses = []
    for user in node.users:
        if user.op != "call_function" or depth > 8:
            continue
        name = _op_name(user)
        if name in _CONSUMERS:
            position = next((i for i, a in enumerate(user.args) if a is node), None)
            if name in _BIAS_FIRST and position == 0 or name in _WEIGHT_SECOND and position != 1:
                continue  # the tensor is a bias here, not a matmul operand
            op, transposed = _CONSUMERS[name]
            uses.append((op, transposed ^ bool(transposes % 2)))
        elif name in _VIEW_OPS:
            uses.extend(trace_uses(user, transposes + (name in _TRANSPOSE_OPS), depth + 1))
    return uses


def traced_sites(model: nn.Module, example_inputs) -> dict[str, tuple[str, bool]]:
    """Parameter name -> (op, transposed) for each parameter a trace shows feeding a matmul."""
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    kwargs = {}
    if len(args) == 1 and isinstance(args[0], dict):
        args, kwargs = (), args[0]
    exported = torch.export.export(model, args, kwargs, strict=False)
    placeholder_to_param = exported.graph_signature.inputs_to_parameters
    found = {}
    for node in exported.graph_module.graph.nodes:
        if node.op == "placeholder" and node.name in placeholder_to_param:
            uses = trace_uses(node)
            if uses:
                found[placeholder_to_param[node.name]] = uses[0]
    return found


def find_sites(model: nn.Module, example_inputs=None, exclude=()) -> tuple[list[SiteSpec], list[str]]:
    """All sites of ``model`` (in parameter order) and notes on how they were found."""
    notes = []
    by_param: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(p), []).append(name)
        params[id(p)] = p

    kinds: dict[int, tuple[str, bool]] = {}
    readers: dict[int, list] = {}  # per weight, (module, op) of each module that reads it
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr, op, transposed in module_weight_attrs(module):
            p = getattr(module, attr, None)
            if isinstance(p, nn.Parameter) and p.dim() >= 2:
                kinds.setdefault(id(p), (op, transposed))
                if not any(m is module for m, _ in readers.setdefault(id(p), [])):
                    readers[id(p)].append((module, op))

    if example_inputs is not None:
        name_to_id = {n: pid for pid, names in by_param.items() for n in names}
        try:
            traced = traced_sites(model, example_inputs)
        except Exception as err:  # a model torch.export cannot trace still compresses by module type
            traced = {}
            notes.append(f"could not trace the model ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                         "found sites by module type only")
            log.warning(notes[-1])
        extra = 0
        for pname, kind in traced.items():
            pid = name_to_id.get(pname)
            if pid is not None and pid not in kinds and params[pid].dim() >= 2:
                kinds[pid] = kind
                extra += 1
        notes.append(f"traced the model: {len(traced)} weights feed matmul-like ops ({extra} used functionally)")
    else:
        notes.append("no example_inputs: found sites by module type only (functional uses such as x @ self.w "
                     "need example_inputs to be found)")

    specs = []
    for pid, names in by_param.items():
        if pid not in kinds:
            continue
        p = params[pid]
        op, transposed = kinds[pid]
        others = tuple(o for _, o in readers.get(pid, [])[1:])  # a tied lm_head: the embedding's GEMM too
        specs.append(SiteSpec(names[0], tuple(names), tuple(p.shape), op, transposed, dtype_name(p), others))

    patterns = tuple(exclude)
    if patterns:
        kept = []
        matched = {pat: False for pat in patterns}
        for spec in specs:
            hits = [pat for pat in patterns if name_matches(spec.bindings, (pat,))]
            matched.update(dict.fromkeys(hits, True))
            if not hits:
                kept.append(spec)
        unmatched = [p for p, m in matched.items() if not m]
        if unmatched:
            raise ValueError(
                f"exclude patterns {unmatched} match no compressible weight; "
                f"compressible weights: {[s.name for s in specs]}"
            )
        notes.append(f"excluded {len(specs) - len(kept)} weights matching {list(patterns)}")
        specs = kept
    return specs, notes
