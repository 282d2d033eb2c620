"""``roastfx.compress``: make a model ROAST-backed, in place.

Every check runs and the memory is built before the model is touched, so a
failed call leaves the model exactly as it was.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
import warnings
from fractions import Fraction

import torch
from torch import nn

from roastfx.codegen.reference import GROUPED, grouped_dims, weight_to_view
from roastfx.codegen.runs import project
from roastfx.passes.capture_sites import find_sites, name_matches
from roastfx.passes.plan_cost import plan_with_cost_model
from roastfx.passes.plan_layout import plan_layout, seeded_int
from roastfx.plan import SCHEMES, Plan, check_grad_scaling
from roastfx.profiles import get_profile

from .module import already_compressed, default_memory_dtype, dtype_name, install, memory_dtype

log = logging.getLogger("roastfx")

INITS = ("project", "random")
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
COMPRESS_OPTIONS = ("tile", "alignment", "chunk", "memory_dtype", "planner")
PLANNERS = ("default", "cost")


def parse_compression(compression, dense_numel: int, itemsize: int) -> int:
    """Memory slots for a ratio (0.01, "100x") or a byte budget ("10MB")."""
    accepted = "a ratio in (0, 1] such as 0.01, a factor such as '100x', or a byte budget such as '10MB'"
    if isinstance(compression, bool) or compression is None:
        raise ValueError(f"compression={compression!r} is not valid; accepted: {accepted}")
    if isinstance(compression, (int, float)):
        ratio = float(compression)
        exact = Fraction(repr(ratio)) if math.isfinite(ratio) else None  # the decimal the user wrote
    elif isinstance(compression, str):
        text = compression.strip().lower().replace(" ", "")
        m_factor = re.fullmatch(r"([0-9]*\.?[0-9]+)x", text)
        m_bytes = re.fullmatch(r"([0-9]*\.?[0-9]+)(b|kb|mb|gb|kib|mib|gib)", text)
        if m_factor:
            factor = float(m_factor.group(1))
            if factor < 1:
                raise ValueError(f"compression={compression!r}: a factor must be >= 1x; accepted: {accepted}")
            ratio = 1.0 / factor
            exact = 1 / Fraction(m_factor.group(1))
        elif m_bytes:
            slots = int(float(m_bytes.group(1)) * _UNITS[m_bytes.group(2)]) // itemsize
            if slots < 1:
                raise ValueError(f"compression={compression!r} is less than one {itemsize}-byte memory slot")
            if slots > dense_numel:
                raise ValueError(
                    f"compression={compression!r} ({slots} slots) is larger than the dense weights ({dense_numel}); "
                    "a budget must not exceed the model"
                )
            return slots
        else:
            raise ValueError(f"compression={compression!r} cannot be parsed; accepted: {accepted}")
    else:
        raise ValueError(f"compression={compression!r} ({type(compression).__name__}) is not valid; accepted: {accepted}")
    if not (0.0 < ratio <= 1.0) or math.isnan(ratio):
        raise ValueError(f"compression={compression!r} is outside (0, 1]; accepted: {accepted}")
    if dense_numel * ratio < 1:
        raise ValueError(f"compression={compression!r} leaves less than one memory slot for the {dense_numel} "
                         f"weights to compress; the most this model can be compressed is {dense_numel}x")
    return math.ceil(dense_numel * exact)  # exact: "300x" of 2100 weights is 7 slots, not ceil(7.000000001)


def site_fan_in(spec) -> int:
    """The inputs each output of a site's weight reads: its (in,) dims, or K for a grouped site's experts."""
    if spec.op == GROUPED:
        return grouped_dims(spec.shape, spec.transposed)[1]
    return math.prod(spec.shape[1:]) if len(spec.shape) > 1 else math.prod(spec.shape)


def _site_scale(weight: torch.Tensor, fan_in: int | None = None) -> float:
    """The magnitude a site's recovered weights keep: the std of its dense weight
    (1/sqrt(3*fan_in), PyTorch's default init, when the weight is constant)."""
    w = weight.detach().to(torch.float64)
    std = float(w.std()) if w.numel() > 1 else 0.0
    if not math.isfinite(std) or std == 0.0:
        if fan_in is None:
            fan_in = math.prod(w.shape[1:]) if w.dim() > 1 else w.numel()
        std = 1.0 / math.sqrt(3.0 * max(1, fan_in))
    return std


def _check_materialized(model: nn.Module) -> None:
    """A clear error for parameters that hold no values yet: lazy modules' (before their first forward) and
    any on the meta device (a model built there for planning)."""
    lazy = [n for n, p in model.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:
        raise ValueError(f"cannot compress {type(model).__name__}: {lazy[:5]} are uninitialized (lazy modules, "
                         "e.g. nn.LazyLinear); run the model once on a batch to initialize them, then compress")
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise ValueError(f"cannot compress {type(model).__name__}: {len(meta)} parameters are on the meta device "
                         f"({meta[:3]}...), with no values to project or to scale a fresh memory by; build the "
                         "model on a real device (to plan it alone: `roastfx plan MODULE:FACTORY --meta`)")


def compress(
    model: nn.Module,
    compression="100x",
    seed: int = 0,
    target=None,
    exclude=(),
    example_inputs=None,
    init: str = "project",
    scheme: str = "roast",
    grad_scaling: str = "none",
    own_window=(),
    **options,
) -> nn.Module:
    """Compress ``model`` in place with one global ROAST memory and return it.

    compression: a ratio in (0, 1] (0.01), a factor ("100x") or a byte budget ("10MB").
    init: "project" keeps the current weights as well as the memory allows (least
    squares); "random" draws a fresh memory for training from scratch.
    options: tile=(rows, cols), alignment=elements, chunk=embedding chunk, memory_dtype (default: the
    weights' dtype; e.g. "float32" under a bfloat16 model keeps an fp32 master memory, and the weights are
    read cast to bfloat16), planner="default" (fixed rules) or "cost" (tiles chosen by the cache/tile
    cost model). The weights are always read in their own dtype, and follow model.to / .double() / .half().
    grad_scaling: "none" (default: the memory gets the exact gradient) or "site": each
    site's weight gradient is divided by its root mean square before it is added into
    the memory, so sites whose gradients differ by orders of magnitude (a classifier
    head, embeddings behind a LayerNorm, deep encoder weights) all steer the slots
    they share. Each read of a weight is normalized on its own: a module called twice in
    a forward, or two modules tied to one weight, read it twice (eager and compiled alike).
    Recommended for training globally shared models with Adam; it is
    stored in the plan, so checkpoints keep it. See docs/results.md.
    own_window: name patterns (fnmatch, as ``exclude``) of sites that scheme="roast" keeps
    out of the shared memory: they get their own window at its end, sized by their share
    of the dense weights (at least one slot); the other sites share the rest globally.
    Meant for small weights that act on every example, e.g. a transformer's position and
    token-type embeddings, whose slots would otherwise drift with every other site's
    gradient (docs/results.md). Equal memory; the windows are in the plan.

    A model with compressed nn.LSTM/GRU/RNN weights turns on ``torch._dynamo.config.allow_rnn``, so that
    torch.compile traces those modules, step by step (roastfx/rnn.py), instead of running them eagerly.
    """
    unknown = sorted(set(options) - set(COMPRESS_OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; accepted options: {', '.join(COMPRESS_OPTIONS)}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress expects an nn.Module, got {type(model).__name__}")
    why = already_compressed(model)
    if why:
        raise ValueError(f"cannot compress {type(model).__name__}: {why}; compress a dense model")
    if init not in INITS:
        raise ValueError(f"init={init!r} is not valid; accepted: {', '.join(INITS)}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme={scheme!r} is not valid; accepted: {', '.join(SCHEMES)}")
    check_grad_scaling(grad_scaling)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative int")
    exclude = _patterns("exclude", exclude)
    own_window = _patterns("own_window", own_window)
    if own_window and scheme != "roast":
        raise ValueError(f"own_window applies to scheme='roast' (global sharing); scheme={scheme!r} already gives "
                         "every site its own window")
    planner = options.get("planner", "default")
    if planner not in PLANNERS:
        raise ValueError(f"planner={planner!r} is not valid; accepted: {', '.join(PLANNERS)}")
    profile = get_profile(target)
    if options.get("memory_dtype") is not None:
        memory_dtype(options["memory_dtype"])  # a bad name fails before the model is traced
    _check_materialized(model)

    specs, notes = find_sites(model, example_inputs, exclude)
    if not specs:
        if exclude and find_sites(model, example_inputs, ())[0]:
            raise ValueError(f"nothing to compress in {type(model).__name__}: exclude={list(exclude)!r} excludes "
                             "every weight that feeds a matmul-like op")
        traced = [n for n in notes if n.startswith(("could not trace", "left dense, not floating-point"))]
        raise ValueError(
            f"nothing to compress in {type(model).__name__}: no floating-point weight feeds a matmul-like op "
            "(nn.Linear, Conv1d/2d/3d, Embedding, EmbeddingBag, MultiheadAttention, RNNs and RNN cells, Bilinear, "
            "transformers Conv1D, "
            "or functional uses found with example_inputs)" + "".join(f"; {n}" for n in traced)
        )
    for n in notes:
        log.info(n)
    params = dict(model.named_parameters(remove_duplicate=False))
    specs = _leave_frozen_dense(specs, params, notes)
    weight_dtypes = {s.name: params[s.name].dtype for s in specs}
    mem_dtype = memory_dtype(options.get("memory_dtype") or default_memory_dtype(weight_dtypes.values()))
    mem_dtype_name = dtype_name(mem_dtype)
    itemsize = mem_dtype.itemsize
    dense_numel = sum(params[s.name].numel() for s in specs)
    memory_size = parse_compression(compression, dense_numel, itemsize)
    scales = {s.name: _site_scale(params[s.name], site_fan_in(s)) for s in specs}
    tiling = dict(tile=options.get("tile"), alignment=options.get("alignment"), chunk=options.get("chunk"))

    def make_plan(group, size):
        if planner == "cost":
            return plan_with_cost_model(group, size, scales, profile, seed, scheme=scheme,
                                        memory_dtype=mem_dtype_name, notes=notes, **tiling)
        return plan_layout(group, size, scales, seed=seed, scheme=scheme, target=profile.name,
                           cache_line=profile.alignment_elements(itemsize), memory_dtype=mem_dtype_name,
                           notes=notes, **tiling)

    own = [s for s in specs if name_matches(s.bindings, own_window)]
    if own_window and not own:
        raise ValueError(f"own_window={own_window!r} matches no compressed site; sites: {[s.name for s in specs]}")
    if own and len(own) == len(specs):
        raise ValueError("own_window matches every site: nothing would share the memory; use scheme='roast-local'")
    plan = make_plan(specs, memory_size) if not own else _plan_with_own_window(
        specs, own, memory_size, make_plan, math.lcm(profile.alignment_elements(itemsize), options.get("alignment") or 1))
    plan = dataclasses.replace(plan, grad_scaling=grad_scaling)
    memory = initial_memory(plan, params, init)
    device = params[specs[0].name].device
    memory = nn.Parameter(memory.to(device=device, dtype=mem_dtype),
                          requires_grad=any(params[s.name].requires_grad for s in specs))
    install(model, plan, memory, weight_dtypes)
    log.info("compressed %d sites, %d dense weights into %d memory slots (%.1fx)",
             len(plan.sites), plan.dense_numel, plan.memory_size, plan.ratio)
    return model


def _patterns(name: str, value) -> tuple[str, ...]:
    """``exclude`` / ``own_window``: one fnmatch pattern or an iterable of them."""
    if isinstance(value, str):
        return (value,)
    if value is None:
        return ()
    try:
        patterns = tuple(value)
    except TypeError:
        raise ValueError(f"{name}={value!r} is not valid; accepted: a name pattern or a list of them, e.g. "
                         "['classifier*', '*.pooler.*']") from None
    bad = [p for p in patterns if not isinstance(p, str)]
    if bad:
        raise ValueError(f"{name}={value!r}: {bad[0]!r} is not a name pattern; accepted: strings (fnmatch "
                         "patterns over parameter and module names), e.g. ['classifier*']")
    return patterns


def _leave_frozen_dense(specs, params: dict, notes: list) -> list:
    """The sites to compress: all of them, or where some weights are frozen (requires_grad=False) and others
    train, the trainable ones. They share one memory, trainable or frozen as a whole, which would train the
    frozen ones too; so those stay dense, exactly as they are (a fixed sinusoidal position table: Whisper's,
    Marian's), with a warning naming them."""
    frozen = [s.name for s in specs if not params[s.name].requires_grad]
    if not frozen or len(frozen) == len(specs):
        return specs
    warnings.warn(
        f"{len(frozen)} of the {len(specs)} weights to compress are frozen (requires_grad=False: "
        f"{frozen[:4]}{' ...' if len(frozen) > 4 else ''}) while the others train: they are left dense, as they "
        "are, since the one memory the others share trains as a whole and would train them too. To compress "
        "them, set requires_grad=True on them before compressing; to keep them dense without this warning, "
        "exclude them (exclude=[...])", stacklevel=3)
    notes.extend(f"left dense, frozen (requires_grad=False) beside trainable weights: {name}" for name in frozen)
    return [s for s in specs if params[s.name].requires_grad]


def _plan_with_own_window(specs, own, memory_size: int, make_plan, align: int) -> Plan:
    """Plan ``own`` in one window at the end of the memory and the other sites globally in the rest."""
    own_names = {s.name for s in own}
    shared = [s for s in specs if s.name not in own_names]
    numel = {s.name: math.prod(s.shape) for s in specs}
    share = sum(numel[s.name] for s in own) / sum(numel.values())
    rest = (memory_size - max(1, round(memory_size * share))) // align * align
    if rest < 1:
        raise ValueError(f"memory of {memory_size} slots is too small to give own_window sites a window of their own")
    shared_plan, own_plan = make_plan(shared, rest), make_plan(own, memory_size - rest)
    sites = {s.name: s for s in shared_plan.sites}
    for s in own_plan.sites:
        sites[s.name] = dataclasses.replace(s, mapping=dataclasses.replace(s.mapping, window_start=s.mapping.window_start + rest))
    return dataclasses.replace(shared_plan, memory_size=memory_size, sites=tuple(sites[s.name] for s in specs))


def initial_memory(plan: Plan, params: dict, init: str) -> torch.Tensor:
    """float64 memory: projection of the dense weights, or N(0, 1) from the plan's seed."""
    if init == "random":
        gen = torch.Generator().manual_seed(seeded_int(plan.seed, "memory-init", modulus=2**63))
        return torch.randn(plan.memory_size, generator=gen, dtype=torch.float64)
    views = [weight_to_view(params[s.name], s.transposed, s.op) for s in plan.sites]
    return project(views, [s.mapping for s in plan.sites], [s.scale for s in plan.sites], plan.memory_size)


def binding_problems(params: dict, plan: Plan) -> list[str]:
    """Each plan binding the model lacks or holds with another shape."""
    problems = []
    for site in plan.sites:
        for b in site.bindings:
            if b not in params:
                problems.append(f"{b}: not in the model")
            elif tuple(params[b].shape) != site.shape:
                problems.append(f"{b}: model {tuple(params[b].shape)}, plan {site.shape}")
    return problems


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Make a dense ``model`` ROAST-backed with a given plan (memory left at zero)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    problems = binding_problems(params, plan)
    if problems:
        raise ValueError("the plan was made for another architecture: " + "; ".join(problems[:10]))
    why = already_compressed(model)
    if why:
        raise ValueError(f"cannot apply a plan to {type(model).__name__}: {why}; apply it to a dense model")
    device = params[plan.sites[0].name].device
    memory = torch.zeros(plan.memory_size, dtype=memory_dtype(plan.memory_dtype), device=device)
    # the weights are read in this model's dtypes, as its other parameters are (load_state_dict keeps them too)
    install(model, plan, memory, {s.name: params[s.name].dtype for s in plan.sites})
    return model
