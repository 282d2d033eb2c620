"""The ``roast`` torch.compile backend (registered through the torch_dynamo_backends entry point).

Today it validates its options and runs dynamo's graph with the reference path:
the ROAST lookups of a compressed model are already in the graph. Rewriting
them into fused roast ops is the backend issue's work.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("roastfx")

BACKEND_OPTIONS = ("target", "compression", "seed", "exclude", "report", "fallback")


def parse_options(options) -> dict:
    options = dict(options or {})
    unknown = sorted(set(options) - set(BACKEND_OPTIONS))
    if unknown:
        raise ValueError(f"unknown roast backend option(s) {unknown}; valid options: {', '.join(BACKEND_OPTIONS)}")
    if "target" in options:
        from .profiles import get_profile

        get_profile(options["target"])
    if "compression" in options:
        raise NotImplementedError(
            "compressing inside the compiler (options={'compression': ...}) is not available yet; "
            "call roastfx.compress(model, ...) before torch.compile(model, backend='roast')"
        )
    return options


def roast_backend(gm: torch.fx.GraphModule, example_inputs, options=None, mode=None, **_):
    """Entry point for ``torch.compile(model, backend="roast")``."""
    parse_options(options)
    log.info("roast backend: graph with %d nodes runs on the reference path", len(gm.graph.nodes))
    return gm.forward
