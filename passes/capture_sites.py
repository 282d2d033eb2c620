"""Find the sites of a model: every weight that feeds a matmul-like op.

Two sources, merged: module types (always) and, given example inputs, a trace
of the model (torch.export, non-strict) that also finds weights used
functionally (``x @ self.w``, ``F.linear(x, self.w)``, ``torch.einsum``), through
view-like ops and indexing (a mixture of experts' stacked (experts, out, in) weight,
one expert's slice per ``F.linear``). Where torch.export cannot trace the model
(data-dependent control flow, such as a loop over the experts a router picked), the
example inputs run it eagerly under a `torch.overrides.TorchFunctionMode` that follows
each parameter through the same ops to its consumers. Tied weights (one tensor bound
under several names) become one site.
"""
from __future__ import annotations

import contextlib
import fnmatch
import io
import logging
import sys
from dataclasses import dataclass

import torch
from torch import nn

from roastfx.codegen.reference import GROUPED

from .weight_reads import transpose_property

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
    if isinstance(module, nn.Bilinear):  # (out, in1, in2): y = (x1 outer x2 flattened) @ W.reshape(out, -1).T
        return [("weight", "linear", True)]
    if isinstance(module, nn.RNNCellBase):
        return [("weight_ih", "rnn", True), ("weight_hh", "rnn", True)]
    # transformers.pytorch_utils.Conv1D (GPT-2): weight is (in, out), forward is x @ W
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return [("weight", "matmul", False)]
    return []


def weight_source(module: nn.Module, attr: str) -> nn.Parameter | None:
    """The parameter a module's weight ``attr`` is, or is computed from when that parameter has the weight's
    shape: torch.nn.utils.parametrize's ``original`` (spectral_norm, orthogonal, a user's parametrization),
    weight_norm's direction ``original1`` (its magnitude ``original0`` stays dense), prune's ``weight_orig``
    (the mask stays a buffer). The parametrization then runs on the weight read from the memory."""
    p = module._parameters.get(attr) if attr in module._parameters else None
    if isinstance(p, nn.Parameter):
        return p
    source = None
    if nn.utils.parametrize.is_parametrized(module, attr):
        originals = [q for q in module.parametrizations[attr].parameters(recurse=False)]
        with torch.no_grad():
            shape = getattr(module, attr).shape
        same = [q for q in originals if q.shape == shape]
        source = same[0] if len(same) == 1 else None
    elif isinstance(module._parameters.get(attr + "_orig"), nn.Parameter) and hasattr(module, attr + "_mask"):
        source = module._parameters[attr + "_orig"]
        source = source if source.shape == getattr(module, attr).shape else None
    return source


_VIEW_OPS = {
    "t", "transpose", "permute", "T", "mT", "numpy_T", "view", "reshape", "expand", "_to_copy", "to", "contiguous",
    "detach", "alias", "clone", "unsqueeze", "squeeze", "type_as", "_unsafe_view", "lift_fresh_copy",
    "type", "float", "double", "half", "bfloat16",  # casts as tensor methods (dynamo's graphs)
}
# T, mT: the properties (an eager run sees them; dynamo's graph holds getattr calls, export's aten.numpy_T, aten.mT)
_TRANSPOSE_OPS = {"t", "transpose", "permute", "T", "mT", "numpy_T"}
# ops that pick part of a weight (one expert of a stacked (experts, out, in) parameter): a weight that reaches
# a consumer through one of these is read as a whole and indexed, so its view is laid out as stored
# (transposed=False: rows along the leading, stacked axis)
_INDEX_OPS = {"select", "index", "narrow", "slice", "__getitem__", "getitem", "index_select", "unbind", "chunk",
              "split", "split_with_sizes"}
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
    "lstm_cell": ("rnn", True), "gru_cell": ("rnn", True), "rnn_tanh_cell": ("rnn", True),
    "rnn_relu_cell": ("rnn", True), "bilinear": ("linear", True), "inner": ("linear", True),
    "tensordot": ("matmul", False),
    "_native_multi_head_attention": ("attention", True),
    # a mixture of experts' GEMM over its stacked (experts, ...) weights: torch's and transformers' (which
    # transformers' MoE layers use under torch.export and torch.compile)
    "_grouped_mm": ("linear", False), "grouped_mm": ("linear", False), "grouped_mm_fallback": ("linear", False),
}
_LOOKUPS = ("embedding", "embedding_bag")
_STACKED = {"_grouped_mm", "grouped_mm", "grouped_mm_fallback"}  # read whole, laid out as stored


_WEIGHT_SECOND = {"linear", "inner", "tensordot", "conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d",
                  "conv_transpose2d", "conv_transpose3d"}
_BIAS_FIRST = {"addmm", "baddbmm", "addmv"}
_CELL_WEIGHTS = (2, 3)  # lstm_cell(x, hx, w_ih, w_hh, b_ih, b_hh) and the other cells: the weights' positions
_MATMUL_FAMILY = {"mm", "matmul", "bmm", "mv", "addmm", "baddbmm", "addmv"}  # operands by position: x @ W or W @ x
# batched GEMMs: a 3-D weight read whole by one is stacked per batch entry (RecurrentGemma's per-head gates,
# baddbmm(b, x, W)), a grouped site as if each entry had been picked
_BATCHED = {"bmm", "baddbmm", "matmul"}


def _op_name(node: torch.fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


def _consumer_use(name: str, position: int | None, transposes: int, indexed: bool, ndim: int = 2
                  ) -> tuple[str, bool] | None:
    """(op, transposed) of an ``ndim``-D weight reaching consumer ``name`` as its argument ``position`` after
    ``transposes`` transposing views (and, ``indexed``, an indexing op), or None where it is no matmul
    operand there. A 3-D weight indexed for a GEMM, or read by a grouped GEMM, is a grouped site (stacked
    experts): transposed when each group is read transposed (F.linear on W[e], stored (experts, out, in))."""
    if name in _BIAS_FIRST and position == 0 or name in _WEIGHT_SECOND and position != 1 or (
            name.endswith("_cell") and position not in _CELL_WEIGHTS or name == "bilinear" and position != 2):
        return None  # the tensor is a bias here (or a cell's state), not a matmul operand
    op, transposed = _CONSUMERS[name]
    if not (indexed or name in _STACKED or ndim == 3 and name in _BATCHED):
        return op, transposed ^ bool(transposes % 2)
    if ndim == 3 and op in ("linear", "matmul"):
        # the view's rows are what each group's GEMM contracts: a group multiplied from the left (W[ids] @ x,
        # transformers' batched_mm experts) is read transposed, so the layout is the grouped GEMM's
        left = name in _MATMUL_FAMILY and position == (1 if name in _BIAS_FIRST else 0)
        return GROUPED, transposed ^ bool(transposes % 2) ^ left
    return op, False  # part of a weight (a slice of a fused projection): laid out as stored


def _ndim(node: torch.fx.Node) -> int:
    val = node.meta.get("val", node.meta.get("example_value"))
    return val.dim() if isinstance(val, torch.Tensor) else 2


def trace_uses(node: torch.fx.Node, transposes: int = 0, depth: int = 0, indexed: bool = False,
               ndim: int | None = None) -> list[tuple[str, bool]]:
    """Follow a parameter through view-like and indexing ops to the matmul-like ops that consume it."""
    ndim = _ndim(node) if ndim is None else ndim
    uses = []
    for user in node.users:
        if user.op not in ("call_function", "call_method") or depth > 8:
            continue
        # dynamo's graphs hold tensor methods as call_method nodes (w.transpose(-2, -1)) and the properties w.T,
        # w.mT as getattr calls; export's, aten calls
        name = user.target if user.op == "call_method" else transpose_property(user) or _op_name(user)
        if name in _CONSUMERS:
            use = _consumer_use(name, next((i for i, a in enumerate(user.args) if a is node), None), transposes,
                                indexed, ndim)
            if use is not None:
                uses.append(use)
        elif name in _VIEW_OPS or name in _INDEX_OPS:
            uses.extend(trace_uses(user, transposes + (name in _TRANSPOSE_OPS), depth + 1,
                                   indexed or name in _INDEX_OPS, ndim))
        elif name in ("cat", "concat", "concatenate") and ndim == 2:
            # a part of a 2-D concatenation a matmul takes (MobileBERT's head): fuse_roast_ops splits the product
            uses.extend(trace_uses(user, transposes, depth + 1, indexed, ndim))
        elif name == "_weight_norm" and user.args and user.args[0] is node:
            # weight norm's direction (parametrizations.weight.original1): the weight the op gets has its shape
            uses.extend(trace_uses(user, transposes, depth + 1, indexed, ndim))
    return uses


def _split_inputs(example_inputs) -> tuple[tuple, dict]:
    """(args, kwargs) of ``example_inputs``: a tuple or list of positional inputs, one input, or a dict of
    keyword inputs."""
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if len(args) == 1 and isinstance(args[0], dict):
        return (), args[0]
    return args, {}


def _tensor_leaves(out) -> list[torch.Tensor]:
    """The tensors in a model's output, through dicts (transformers' ModelOutput is one), lists and tuples;
    other objects (a transformers KV cache) are dropped."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensor_leaves(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensor_leaves(v)]
    return []


class _TensorOutputs(nn.Module):
    """``model`` with only the tensors of its output, as a list: torch.export refuses outputs of types it does not
    know (a transformers DynamicCache), and the sites only need the graph up to the tensors."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return _tensor_leaves(self.model(*args, **kwargs))


# torch's loggers that warn while a failing export gives up: the failure is expected where the model has
# data-dependent control flow, and find_sites says what it did instead
_EXPORT_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch.export", "torch._export")


@contextlib.contextmanager
def _quiet_export():
    """Within: those loggers below ERROR silenced, and stderr held back (torch.export prints a failed trace's
    partial graph there, dozens of lines); what was held back is written out if the export succeeds."""
    loggers = [logging.getLogger(name) for name in _EXPORT_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
        sys.stderr.write(held.getvalue())
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def traced_sites(model: nn.Module, example_inputs) -> dict[str, tuple[str, bool]]:
    """Parameter name -> (op, transposed) for each parameter a trace shows feeding a matmul."""
    args, kwargs = _split_inputs(example_inputs)
    with _quiet_export():
        exported = torch.export.export(_TensorOutputs(model), args, kwargs, strict=False)
    placeholder_to_param = exported.graph_signature.inputs_to_parameters
    found = {}
    for node in exported.graph_module.graph.nodes:
        if node.op == "placeholder" and node.name in placeholder_to_param:
            uses = trace_uses(node)
            if uses:
                found[placeholder_to_param[node.name].removeprefix("model.")] = uses[0]
    return found


class _ParameterUses(torch.overrides.TorchFunctionMode):
    """While active, follows each parameter of ``params`` (id -> name) through view-like and indexing ops
    (tensor methods and torch functions alike) and records, per parameter name, the (op, transposed) of the
    first matmul-like op that consumes it: `trace_uses` on an eager run."""

    def __init__(self, params: dict[int, str], ndims: dict[int, int] | None = None):
        super().__init__()
        ndims = ndims or {}
        # id -> (name, transposes, indexed, tensor, ndim): the tensor keeps its id from being reused during the run
        self.origin = {pid: (name, 0, False, None, ndims.get(pid, 2)) for pid, name in params.items()}
        self.found: dict[str, tuple[str, bool]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "").split(".")[-1]
        if name == "__get__":  # a property of the tensor (w.T): its getter's descriptor has the name
            name = getattr(getattr(func, "__self__", None), "__name__", "")
        if name in ("__matmul__", "__rmatmul__"):
            name = "matmul"
        if name in _CONSUMERS:
            for position, arg in [*enumerate(args), *((None, v) for v in kwargs.values())]:
                origin = self.origin.get(id(arg)) if isinstance(arg, torch.Tensor) else None
                if origin is not None and origin[0] not in self.found:
                    use = _consumer_use(name, 1 if position is None and "weight" in kwargs and
                                        kwargs["weight"] is arg else position, origin[1], origin[2], origin[4])
                    if use is not None:
                        self.found[origin[0]] = use
        elif name in _VIEW_OPS or name in _INDEX_OPS:
            source = args[0] if args and isinstance(args[0], torch.Tensor) else None
            origin = self.origin.get(id(source)) if source is not None else None
            if origin is not None:
                step = (origin[0], origin[1] + (name in _TRANSPOSE_OPS), origin[2] or name in _INDEX_OPS)
                for t in _tensor_leaves(out):
                    self.origin[id(t)] = (*step, t, origin[4])
        return out


def eager_sites(model: nn.Module, example_inputs) -> dict[str, tuple[str, bool]]:
    """`traced_sites` by running the model on the example inputs (no gradients) under `_ParameterUses`: for
    models torch.export cannot trace, such as a mixture of experts that loops over the experts its router
    picked for these inputs (only the experts the inputs reach are found). The run leaves no trace: the
    model's buffers (a batch norm's running statistics) and the random number generators' states are put
    back as they were."""
    args, kwargs = _split_inputs(example_inputs)
    params, ndims = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        params.setdefault(id(p), name)
        ndims[id(p)] = p.dim()
    mode = _ParameterUses(params, ndims)
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cpu_rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        with torch.no_grad(), mode:
            model(*args, **kwargs)
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        torch.random.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    return mode.found


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
            p = weight_source(module, attr)
            if isinstance(p, nn.Parameter) and p.dim() >= 2:
                if not any(m is module for m, _ in readers.setdefault(id(p), [])):
                    readers[id(p)].append((module, op))
                # a weight tied between a lookup and a GEMM (a tied lm_head) is laid out for the lookup,
                # whichever module comes first: the lookup reads whole rows of the view (ROBE chunks), and the
                # GEMM reads the view transposed (x @ V^T), fused either way
                if id(p) not in kinds or (op in _LOOKUPS and kinds[id(p)][0] not in _LOOKUPS):
                    kinds[id(p)] = (op, transposed)

    if example_inputs is not None:
        name_to_id = {n: pid for pid, names in by_param.items() for n in names}
        how = "traced the model (torch.export)"
        try:
            traced = traced_sites(model, example_inputs)
        except Exception as err:  # data-dependent control flow, say: run the model eagerly instead
            reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}" if str(err) else type(err).__name__
            try:
                traced = eager_sites(model, example_inputs)
                how = f"ran the model on example_inputs (torch.export could not trace it: {reason})"
            except Exception as err2:  # a model that does not run on its example inputs: module types only
                traced = None
                reason2 = f"{type(err2).__name__}: {str(err2).splitlines()[0][:200]}"
                notes.append(f"could not trace the model ({reason}) nor run it on example_inputs ({reason2}); "
                             "found sites by module type only")
                log.warning(notes[-1])
        if traced is not None:
            extra = 0
            for pname, kind in traced.items():
                pid = name_to_id.get(pname)
                if pid is not None and pid not in kinds and params[pid].dim() >= 2:
                    kinds[pid] = kind
                    extra += 1
            notes.append(f"{how}: {len(traced)} weights feed matmul-like ops ({extra} used functionally)")
    else:
        notes.append("no example_inputs: found sites by module type only (functional uses such as x @ self.w "
                     "need example_inputs to be found)")

    specs, not_real = [], []
    for pid, names in by_param.items():
        if pid not in kinds:
            continue
        p = params[pid]
        if not p.is_floating_point():  # a complex weight: a real memory cannot hold its imaginary part
            not_real.append(f"{names[0]} ({str(p.dtype).removeprefix('torch.')})")
            continue
        op, transposed = kinds[pid]
        others = [o for _, o in readers.get(pid, [])]  # a tied lm_head: the embedding's GEMM too
        if op in others:
            others.remove(op)
        others = tuple(others)
        specs.append(SiteSpec(names[0], tuple(names), tuple(p.shape), op, transposed, dtype_name(p), others))

    if not_real:
        notes.append(f"left dense, not floating-point (a memory holds real numbers): {', '.join(not_real)}")
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
