"""``roastfx.compress``: make a model ROAST-backed, in place.

Every check runs and the memory is built before the model is touched, so a
failed call leaves the model exactly as it was.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re

import torch
from torch import nn

from roastfx.codegen.reference import project, weight_to_view
from roastfx.passes.capture_sites import find_sites
from roastfx.passes.plan_cost import plan_with_cost_model
from roastfx.passes.plan_layout import plan_layout, seeded_int
from roastfx.plan import SCHEMES, Plan, check_grad_scaling
from roastfx.profiles import get_profile

from .module import install, memory_dtype, roast_state

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
    elif isinstance(compression, str):
        text = compression.strip().lower().replace(" ", "")
        m_factor = re.fullmatch(r"([0-9]*\.?[0-9]+)x", text)
        m_bytes = re.fullmatch(r"([0-9]*\.?[0-9]+)(b|kb|mb|gb|kib|mib|gib)", text)
        if m_factor:
            factor = float(m_factor.group(1))
            if factor < 1:
                raise ValueError(f"compression={compression!r}: a factor must be >= 1x; accepted: {accepted}")
            ratio = 1.0 / factor
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
    return max(1, math.ceil(dense_numel * ratio))


def _site_scale(weight: torch.Tensor) -> float:
    """The magnitude a site's recovered weights keep: the std of its dense weight
    (1/sqrt(3*fan_in), PyTorch's default init, when the weight is constant)."""
    w = weight.detach().to(torch.float64)
    std = float(w.std()) if w.numel() > 1 else 0.0
    if not math.isfinite(std) or std == 0.0:
        fan_in = math.prod(w.shape[1:]) if w.dim() > 1 else w.numel()
        std = 1.0 / math.sqrt(3.0 * max(1, fan_in))
    return std


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
    **options,
) -> nn.Module:
    """Compress ``model`` in place with one global ROAST memory and return it.

    compression: a ratio in (0, 1] (0.01), a factor ("100x") or a byte budget ("10MB").
    init: "project" keeps the current weights as well as the memory allows (least
    squares); "random" draws a fresh memory for training from scratch.
    options: tile=(rows, cols), alignment=elements, chunk=embedding chunk, memory_dtype,
    planner="default" (fixed rules) or "cost" (tiles chosen by the cache/tile cost model).
    grad_scaling: "none" (default: the memory gets the exact gradient) or "site": each
    site's weight gradient is divided by its root mean square before it is added into
    the memory, so sites whose gradients differ by orders of magnitude (a classifier
    head, embeddings behind a LayerNorm, deep encoder weights) all steer the slots
    they share. Recommended for training globally shared models with Adam; it is
    stored in the plan, so checkpoints keep it. See docs/results.md.
    """
    unknown = sorted(set(options) - set(COMPRESS_OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; accepted options: {', '.join(COMPRESS_OPTIONS)}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress expects an nn.Module, got {type(model).__name__}")
    if roast_state(model) is not None:
        raise ValueError("this model is already ROAST-compressed (it has a roast_memory); compress a dense model")
    if init not in INITS:
        raise ValueError(f"init={init!r} is not valid; accepted: {', '.join(INITS)}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme={scheme!r} is not valid; accepted: {', '.join(SCHEMES)}")
    check_grad_scaling(grad_scaling)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative int")
    if isinstance(exclude, str):
        exclude = (exclude,)
    planner = options.get("planner", "default")
    if planner not in PLANNERS:
        raise ValueError(f"planner={planner!r} is not valid; accepted: {', '.join(PLANNERS)}")
    profile = get_profile(target)
    mem_dtype_name = options.get("memory_dtype", "float32")
    mem_dtype = memory_dtype(mem_dtype_name)
    itemsize = torch.empty((), dtype=mem_dtype).element_size()

    specs, notes = find_sites(model, example_inputs, exclude)
    if not specs:
        raise ValueError(
            f"nothing to compress in {type(model).__name__}: no weight feeds a matmul-like op "
            "(nn.Linear, Conv1d/2d/3d, Embedding, EmbeddingBag, MultiheadAttention, RNNs, transformers Conv1D, "
            "or functional uses found with example_inputs)"
        )
    for n in notes:
        log.info(n)
    params = dict(model.named_parameters(remove_duplicate=False))
    dense_numel = sum(params[s.name].numel() for s in specs)
    memory_size = parse_compression(compression, dense_numel, itemsize)
    scales = {s.name: _site_scale(params[s.name]) for s in specs}
    tiling = dict(tile=options.get("tile"), alignment=options.get("alignment"), chunk=options.get("chunk"))
    if planner == "cost":
        plan = plan_with_cost_model(specs, memory_size, scales, profile, seed, scheme=scheme,
                                    memory_dtype=mem_dtype_name, notes=notes, **tiling)
    else:
        plan = plan_layout(specs, memory_size, scales, seed=seed, scheme=scheme, target=profile.name,
                           cache_line=profile.alignment_elements(itemsize), memory_dtype=mem_dtype_name,
                           notes=notes, **tiling)
    plan = dataclasses.replace(plan, grad_scaling=grad_scaling)
    memory = initial_memory(plan, params, init)
    device = params[specs[0].name].device
    install(model, plan, memory.to(device=device, dtype=mem_dtype))
    log.info("compressed %d sites, %d dense weights into %d memory slots (%.1fx)",
             len(plan.sites), plan.dense_numel, plan.memory_size, plan.ratio)
    return model


def initial_memory(plan: Plan, params: dict, init: str) -> torch.Tensor:
    """float64 memory: projection of the dense weights, or N(0, 1) from the plan's seed."""
    if init == "random":
        gen = torch.Generator().manual_seed(seeded_int(plan.seed, "memory-init", modulus=2**63))
        return torch.randn(plan.memory_size, generator=gen, dtype=torch.float64)
    views = [weight_to_view(params[s.name], s.transposed) for s in plan.sites]
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
    if roast_state(model) is not None:
        raise ValueError("this model is already ROAST-compressed; apply a plan to a dense model")
    params = dict(model.named_parameters(remove_duplicate=False))
    problems = binding_problems(params, plan)
    if problems:
        raise ValueError("the plan was made for another architecture: " + "; ".join(problems[:10]))
    device = params[plan.sites[0].name].device
    memory = torch.zeros(plan.memory_size, dtype=memory_dtype(plan.memory_dtype), device=device)
    install(model, plan, memory)
    return model
