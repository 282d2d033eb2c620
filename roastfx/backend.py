"""The ``roast`` torch.compile backend (registered through the torch_dynamo_backends entry point).

The pipeline, in order: fuse_roast_ops (weight reads feeding linear/matmul become
one ``roastfx::roast_linear`` op; other reads stay ``roastfx::materialize``, the
correct fallback), then the rest of the graph goes to the inner compiler
(inductor by default; "aot_eager" or "eager" with options={"inner": ...}).
"""
from __future__ import annotations

import fnmatch
import logging

import torch

log = logging.getLogger("roastfx")

BACKEND_OPTIONS = ("target", "compression", "seed", "exclude", "report", "fallback", "inner")
INNER = ("inductor", "aot_eager", "eager")
FALLBACKS = ("materialize", "error")  # what to do with a weight read no roast op fuses


def parse_options(options) -> dict:
    options = dict(options or {})
    unknown = sorted(set(options) - set(BACKEND_OPTIONS))
    if unknown:
        raise ValueError(f"unknown roast backend option(s) {unknown}; valid options: {', '.join(BACKEND_OPTIONS)}")
    if "target" in options:
        from .profiles import get_profile

        get_profile(options["target"])
    if options.get("inner", "inductor") not in INNER:
        raise ValueError(f"inner={options['inner']!r} is not valid; accepted: {', '.join(INNER)}")
    if options.get("fallback", "materialize") not in FALLBACKS:
        raise ValueError(f"fallback={options['fallback']!r} is not valid; accepted: {', '.join(FALLBACKS)}")
    return options


PIPELINE = ("compress_graph (only with options['compression'])", "fuse_roast_ops", "inner compiler")


def roast_backend(gm: torch.fx.GraphModule, example_inputs, options=None, mode=None, **_):
    """Entry point for ``torch.compile(model, backend="roast")``."""
    from roastfx.passes.fuse_roast_ops import fuse_roast_ops

    opts = parse_options(options)
    extra_inputs = []
    if "compression" in opts:
        gm, memory = _compress_in_graph(gm, example_inputs, opts)
        if memory is not None:
            extra_inputs.append(memory)
    uses = fuse_roast_ops(gm)
    fused = sum(u.fused for u in uses)
    log.info("roast backend: %d weight uses fused, %d fall back to materialize", fused, len(uses) - fused)
    unfused = [u for u in uses if not u.fused]
    if unfused and opts.get("fallback") == "error":
        raise RuntimeError(
            "fallback='error': these weight reads have no fused roast op and would be materialized: "
            + "; ".join(f"{u.node}: {u.why}" for u in unfused[:8])
        )
    inner = opts.get("inner", "inductor")
    if inner == "eager":
        compiled = gm.forward
    else:
        from torch._dynamo.backends.registry import lookup_backend

        compiled = lookup_backend(inner)(gm, list(example_inputs) + extra_inputs)
    if not extra_inputs:
        return compiled
    return lambda *args: compiled(*args, *extra_inputs)


def _compress_in_graph(gm, example_inputs, opts):
    """Post-training compression of an uncompressed model's graph: (new graph, memory)."""
    from roastfx.compress import _site_scale, initial_memory, parse_compression
    from roastfx.passes.compress_graph import graph_sites, read_from_memory
    from roastfx.passes.plan_layout import plan_layout

    from .profiles import get_profile

    found = graph_sites(gm, example_inputs)
    patterns = opts.get("exclude", ())
    patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    found = [f for f in found if not any(fnmatch.fnmatchcase(f[2].name, p) for p in patterns)]
    if not found:
        log.warning("roast backend: this graph has no weight to compress")
        return gm, None
    trained = [f[2].name for f in found if f[1].requires_grad]
    if trained and torch.is_grad_enabled():
        raise RuntimeError(
            f"the roast backend cannot compress weights that are being trained ({trained[:3]}...): the optimizer "
            "would never see a memory created inside the compiler. Call roastfx.compress(model, ...) before "
            "torch.compile for training, or run this model under torch.no_grad() / torch.inference_mode()."
        )
    profile = get_profile(opts.get("target"))
    params = {spec.name: p for _, p, spec in found}
    specs = [spec for _, _, spec in found]
    memory_size = parse_compression(opts["compression"], sum(p.numel() for p in params.values()), 4)
    scales = {name: _site_scale(p) for name, p in params.items()}
    plan = plan_layout(specs, memory_size, scales, seed=int(opts.get("seed", 0)), target=profile.name,
                       cache_line=profile.alignment_elements(4), notes=("compressed inside the compiler",))
    memory = initial_memory(plan, params, "project").to(device=found[0][1].device, dtype=torch.float32)
    if opts.get("report"):
        with open(opts["report"], "w") as f:
            f.write(plan.to_json())
    log.info("roast backend: compressed %d weights in the graph into %d slots (%.1fx)",
             len(plan.sites), plan.memory_size, plan.ratio)
    new_gm = read_from_memory(gm, plan, {spec.name: node for node, _, spec in found})
    return new_gm, memory
