"""The ``roast`` torch.compile backend (registered through the torch_dynamo_backends entry point).

The pipeline, in order: compress_graph (only with options["compression"]: an
uncompressed model's weight reads become reads of one memory), fuse_roast_ops
(weight reads feeding matmul-like ops become one roast op; other reads stay
``roastfx::materialize``, the correct fallback), fuse_epilogue (the pointwise
chain after each roast_linear becomes the epilogue of one generated kernel), then
the inner compiler
(inductor by default; "aot_eager" or "eager" with options={"inner": ...}).
"""
from __future__ import annotations

import dataclasses
import logging
import weakref
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger("roastfx")

BACKEND_OPTIONS = ("target", "compression", "seed", "exclude", "report", "fallback", "inner")
INNER = ("inductor", "aot_eager", "eager")
FALLBACKS = ("materialize", "error")  # what to do with a weight read no roast op fuses
# torch.compile's modes ("default" reaches a backend as no mode at all)
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _cache_key_patch() -> dict:
    """Inductor's config patch that keys its compiled-graph caches on what roastfx decides while a graph is
    traced: the kernel path (ROASTFX_KERNELS, ROASTFX_CONV) picks which ops a roast op's backward records, and
    the roastfx sources. Without it a graph compiled under ROASTFX_KERNELS=triton is read back from the
    on-disk cache in a later process on the reference path. The key rides on a no-op post-grad pass's
    uuid (inductor's documented hook for passes that change compiled code); a pass the user installed
    runs as before and keeps its own uuid in the key."""
    import glob
    import os

    import torch._inductor.config as inductor_config
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    user = inductor_config.post_grad_custom_pre_pass
    if user is not None and not isinstance(user, CustomGraphPass):
        return {}  # a pass without a uuid: inductor does not cache these graphs at all

    from roastfx import codegen, passes

    sources = tuple(sorted(path for package in (codegen, passes)
                           for path in glob.glob(os.path.join(os.path.dirname(package.__file__), "*.py"))))
    modes = ";".join(f"{k}={os.environ.get(k, '')}" for k in ("ROASTFX_KERNELS", "ROASTFX_CONV"))

    class RoastCacheKey(CustomGraphPass):
        def __call__(self, graph):
            if user is not None:
                user(graph)

        def uuid(self):
            return (get_hash_for_files(sources, modes), user.uuid() if user is not None else None)

    return {"post_grad_custom_pre_pass": RoastCacheKey()}


def parse_options(options) -> dict:
    options = dict(options or {})
    unknown = sorted(set(options) - set(BACKEND_OPTIONS))
    if unknown:
        raise ValueError(f"unknown roast backend option(s) {unknown}; valid options: {', '.join(BACKEND_OPTIONS)}")
    if "target" in options:
        from .profiles import get_profile

        get_profile(options["target"])
    seed = options.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"options['seed']={seed!r} is not valid; accepted: a non-negative int")
    if "exclude" in options:
        from roastfx.compress import _patterns

        options["exclude"] = _patterns("options['exclude']", options["exclude"])
    if options.get("inner", "inductor") not in INNER:
        raise ValueError(f"inner={options['inner']!r} is not valid; accepted: {', '.join(INNER)}")
    if options.get("fallback", "materialize") not in FALLBACKS:
        raise ValueError(f"fallback={options['fallback']!r} is not valid; accepted: {', '.join(FALLBACKS)}")
    return options


def apply_mode(mode) -> dict:
    """Validate torch.compile's ``mode``; max-autotune modes turn on ROAST kernel autotuning.

    Returns inductor's config patches for the mode (the rest of the graph honours it too).
    """
    if mode is None:
        return {}
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not valid for the roast backend; accepted: {', '.join(MODES)}")
    if mode.startswith("max-autotune"):
        from roastfx.codegen import configs

        configs.set_autotune(True)  # read at launch time, so it stays on for the process
        log.info("roast backend: mode=%r turns on kernel autotuning among plan-compatible configs", mode)
    from torch._inductor import list_mode_options

    return list_mode_options(mode)


PIPELINE = ("compress_graph (only with options['compression'])", "fuse_roast_ops", "fuse_epilogue", "inner compiler")


def roast_backend(gm: torch.fx.GraphModule, example_inputs, options=None, mode=None, **_):
    """Entry point for ``torch.compile(model, backend="roast")``."""
    from roastfx.passes.fuse_epilogue import fuse_epilogue
    from roastfx.passes.fuse_roast_ops import fuse_roast_ops

    opts = parse_options(options)
    inductor_patches = apply_mode(mode)
    extra_inputs = []
    if "compression" in opts:
        gm, memory = _compress_in_graph(gm, example_inputs, opts, options)
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
    folded = fuse_epilogue(gm)
    log.info("roast backend: %d epilogue chains folded into generated kernels", len(folded))
    inner = opts.get("inner", "inductor")
    inputs = list(example_inputs) + extra_inputs
    if inner == "eager":
        compiled = gm.forward
    elif inner == "inductor":
        from torch._inductor.compile_fx import compile_fx

        compiled = compile_fx(gm, inputs, config_patches={**inductor_patches, **_cache_key_patch()})
    else:
        from torch._dynamo.backends.registry import lookup_backend

        compiled = lookup_backend(inner)(gm, inputs)
    if not extra_inputs:
        return compiled
    return lambda *args: compiled(*args, *extra_inputs)


@dataclass
class InGraphCompression:
    """One plan and one memory for every graph of one compiled model (graph breaks, recompiles)."""

    options: object  # the torch.compile call's options dict (kept alive: it is the key)
    plan: object
    memory: torch.Tensor
    site_of_param: dict  # id(parameter) -> site name


# model -> its in-graph compressions, one per torch.compile call (its options object)
_SHARED: "weakref.WeakKeyDictionary[nn.Module, list[InGraphCompression]]" = weakref.WeakKeyDictionary()


def _compress_in_graph(gm, example_inputs, opts, key):
    """Post-training compression of an uncompressed model's graph: (new graph, memory).

    The plan covers the whole model the graph's parameters belong to (found from
    dynamo's frame), so every graph of one torch.compile call reads one memory.
    """
    from roastfx.passes.compress_graph import frame_root, graph_sites, read_from_memory

    found = graph_sites(gm, example_inputs)
    if not found:
        log.info("roast backend: this graph has no weight to compress")
        return gm, None
    trained = [f[2].name for f in found if f[1].requires_grad]
    if trained and torch.is_grad_enabled():
        raise RuntimeError(
            f"the roast backend cannot compress weights that are being trained ({trained[:3]}...): the optimizer "
            "would never see a memory created inside the compiler. Call roastfx.compress(model, ...) before "
            "torch.compile for training, or run this model under torch.no_grad() / torch.inference_mode()."
        )
    root = frame_root(gm, [f[1] for f in found])
    shared = _shared_compression(root, found, opts, key) if root is not None else None
    if shared is None:
        log.warning("roast backend: the model behind this graph was not found; it gets a plan and memory of its "
                    "own (graph breaks would not share one memory)")
        shared = _new_compression(None, found, opts, key)
    site_nodes = {}
    for node, param, spec in found:
        name = shared.site_of_param.get(id(param))
        if name is None:
            log.warning("roast backend: %s feeds a matmul in this graph but is not in the model's plan (excluded, "
                        "or used only functionally and first seen after the plan was made); it stays dense", spec.name)
        else:
            site_nodes[name] = node
    if not site_nodes:
        return gm, None
    return read_from_memory(gm, shared.plan, site_nodes), shared.memory


def _shared_compression(root, found, opts, key) -> InGraphCompression:
    entries = _SHARED.setdefault(root, [])
    for entry in entries:
        if entry.options is key:
            return entry
    entry = _new_compression(root, found, opts, key)
    entries.append(entry)
    return entry


def _new_compression(root, found, opts, key) -> InGraphCompression:
    """Plan the model's sites (all of root's, as roastfx.compress would, plus this graph's functional
    ones; or only this graph's when root is None) and project the dense weights into a memory."""
    from roastfx.compress import _site_scale, initial_memory, parse_compression
    from roastfx.passes.capture_sites import find_sites, name_matches
    from roastfx.passes.plan_layout import plan_layout

    from .module import default_memory_dtype, dtype_name
    from .profiles import get_profile

    patterns = opts.get("exclude", ())  # parse_options made it a tuple of patterns
    if root is not None:
        specs, _ = find_sites(root, None, patterns)
        named = dict(root.named_parameters(remove_duplicate=False))
        params = {s.name: named[s.name] for s in specs}
        known = {id(p) for p in params.values()}
        names: dict[int, list[str]] = {}
        for name, p in named.items():
            names.setdefault(id(p), []).append(name)
        for _, param, spec in found:  # weights used functionally in this graph
            if id(param) in names:  # named as in the model (as compress names it), not by dynamo's source
                spec = dataclasses.replace(spec, name=names[id(param)][0], bindings=tuple(names[id(param)]))
            if id(param) not in known and not name_matches(spec.bindings, patterns):
                specs.append(spec)
                params[spec.name] = param
                known.add(id(param))
        order = {name: i for i, name in enumerate(named)}
        specs.sort(key=lambda spec: order.get(spec.name, len(order)))  # the model's parameter order
    else:
        found = [f for f in found if not name_matches((f[2].name,), patterns)]
        specs = [spec for _, _, spec in found]
        params = {spec.name: p for _, p, spec in found}
    if not specs:
        raise ValueError(f"options['exclude']={list(patterns)} leaves no weight to compress")
    profile = get_profile(opts.get("target"))
    dtype = default_memory_dtype(p.dtype for p in params.values())  # as roastfx.compress chooses it
    itemsize = dtype.itemsize
    memory_size = parse_compression(opts["compression"], sum(p.numel() for p in params.values()), itemsize)
    scales = {name: _site_scale(p) for name, p in params.items()}
    plan = plan_layout(specs, memory_size, scales, seed=int(opts.get("seed", 0)), target=profile.name,
                       cache_line=profile.alignment_elements(itemsize), memory_dtype=dtype_name(dtype),
                       notes=("compressed inside the compiler",))
    device = next(iter(params.values())).device
    memory = initial_memory(plan, params, "project").to(device=device, dtype=dtype)
    if opts.get("report"):
        with open(opts["report"], "w") as f:
            f.write(plan.to_json())
    log.info("roast backend: compressed %d weights into %d slots (%.1fx), one memory for every graph of the model",
             len(plan.sites), plan.memory_size, plan.ratio)
    site_of_param = {id(params[s.name]): s.name for s in plan.sites}
    return InGraphCompression(key, plan, memory, site_of_param)
