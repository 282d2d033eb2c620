"""The ``roast`` torch.compile backend (registered through the torch_dynamo_backends entry point).

The pipeline, in order: fuse_linear (weight reads feeding linear/matmul become
one ``roastfx::roast_linear`` op; other reads stay ``roastfx::materialize``, the
correct fallback), then the rest of the graph goes to the inner compiler
(inductor by default; "aot_eager" or "eager" with options={"inner": ...}).
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("roastfx")

BACKEND_OPTIONS = ("target", "compression", "seed", "exclude", "report", "fallback", "inner")
INNER = ("inductor", "aot_eager", "eager")


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
    if "compression" in options:
        raise NotImplementedError(
            "compressing inside the compiler (options={'compression': ...}) is not available yet; "
            "call roastfx.compress(model, ...) before torch.compile(model, backend='roast')"
        )
    return options


PIPELINE = ("fuse_linear",)


def roast_backend(gm: torch.fx.GraphModule, example_inputs, options=None, mode=None, **_):
    """Entry point for ``torch.compile(model, backend="roast")``."""
    from roastfx.passes.fuse_linear import fuse_linear

    opts = parse_options(options)
    uses = fuse_linear(gm)
    fused = sum(u.fused for u in uses)
    log.info("roast backend: %d weight uses fused, %d fall back to materialize", fused, len(uses) - fused)
    inner = opts.get("inner", "inductor")
    if inner == "eager":
        return gm.forward
    from torch._dynamo.backends.registry import lookup_backend

    return lookup_backend(inner)(gm, example_inputs)
