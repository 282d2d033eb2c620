"""The cost-model planner: per site, the tile and alignment with the least predicted time.

Windows, hash constants and the Plan are built exactly as ``plan_layout`` builds
them (same seed, same ``make_site``); only the choice of tile shape and
alignment differs. Candidates are scored by passes/cost_model.py over a range of
token counts; everything is closed-form per candidate, so a billion-parameter
model plans in well under a second and no per-element index is ever built.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import networkx as nx

from roastfx.plan import SCHEMES, Plan
from roastfx.profiles import HardwareProfile, get_profile

from .capture_sites import SiteSpec
from .cost_model import EMBEDDING_OPS, Layout, geometry, itemsize, positions, predicted_time
from .plan_layout import (MIN_POSITIONS, _pow2_at_least, _validate_tile, choose_tile, group_width, make_site,
                          site_windows, view_shape)

DEFAULT_TOKENS = (1, 16, 256, 4096)  # decode to prefill
MODES = ("infer", "train")
MAX_TILE_SIDE = 256
TOLERANCE = 0.01  # candidates within 1% of the best predicted time count as equally fast


def execution_graph(specs: list[SiteSpec], order: Iterable[str] | None = None) -> nx.DiGraph:
    """Sites as nodes, an edge from each site to the next one executed.

    ``order`` is the execution order of site names (e.g. from a trace); without it,
    parameter order stands in for execution order. Nodes carry their SiteSpec.
    """
    by_name = {s.name: s for s in specs}
    names = list(order) if order is not None else [s.name for s in specs]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"execution order names unknown sites {unknown[:5]}; sites: {list(by_name)[:10]}")
    names += [n for n in by_name if n not in names]
    graph = nx.DiGraph()
    for n in names:
        graph.add_node(n, spec=by_name[n])
    for a, b in zip(names, names[1:]):
        if a != b and not graph.has_edge(b, a):
            graph.add_edge(a, b)
    return graph


def candidates(rows: int, cols: int, op: str, window: tuple[int, int], line_elements: int, *, tile=None,
               alignment=None, chunk=None, group_cols: int | None = None) -> list[tuple[int, int, int]]:
    """(tile_rows, tile_cols, alignment) choices that keep >= MIN_POSITIONS aligned positions; with
    ``group_cols`` (a grouped site) only tiles whose columns divide it."""
    start, size = window
    sides = [2**e for e in range(int(math.log2(MAX_TILE_SIDE)) + 1)]
    if tile is not None:
        shapes = [tuple(tile)]
    elif op in EMBEDDING_OPS:
        shapes = [(1, chunk)] if chunk else [(1, c) for c in sides if c <= _pow2_at_least(cols)]
    else:
        shapes = [(r, c) for r in sides if r <= _pow2_at_least(rows) for c in sides if c <= _pow2_at_least(cols)]
        small = min(line_elements, _pow2_at_least(rows) * _pow2_at_least(cols))
        shapes = [s for s in shapes if s[0] * s[1] >= small]  # runs shorter than a line only waste lines
        if group_cols:
            shapes = [s for s in shapes if group_cols % s[1] == 0] or shapes  # none divides: the op materializes
    aligns = [alignment] if alignment is not None else [2**e for e in range(int(math.log2(line_elements)) + 1)]
    out = []
    for tk, tn in shapes:
        for a in aligns:
            if start % a or (alignment is None and a > _pow2_at_least(tk * tn)) or tk * tn > size:
                continue
            if tile is None and (size - tk * tn) // a + 1 < MIN_POSITIONS:
                continue
            out.append((tk, tn, a))
    if not out:
        # a window too small for every candidate: the default planner's shrinking rule
        out = [choose_tile(rows, cols, op, size, line_elements, tile, alignment, chunk, group_cols)]
    return out


def choose_layout(spec: SiteSpec, window: tuple[int, int], profile: HardwareProfile, *, memory_size: int,
                  memory_itemsize: int, token_counts=DEFAULT_TOKENS, mode: str = "infer", compute_dtype=None,
                  tile=None, alignment=None, chunk=None, tolerance: float = TOLERANCE) -> tuple[int, int, int]:
    """The (tile_rows, tile_cols, alignment) of least predicted time (summed over every op that reads the
    weight: a tied embedding's lookup and its lm_head GEMM); near-ties go to more positions."""
    rows, cols = view_shape(spec)
    start, size = window
    line_elements = profile.alignment_elements(memory_itemsize)
    scored = []
    width = group_width(spec)
    for tk, tn, a in candidates(rows, cols, spec.op, window, line_elements, tile=tile, alignment=alignment,
                                chunk=chunk, group_cols=width):
        lay = Layout(rows, cols, tk, tn, a, start, size)
        gs = [geometry(lay, op, spec.dtype, profile, memory_size=memory_size, memory_itemsize=memory_itemsize,
                       compute_dtype=compute_dtype, groups=cols // width if width else 1)
              for op in (spec.op, *spec.other_ops)]
        scored.append(((tk, tn, a), [sum(predicted_time(g, profile, t, mode) for g in gs) for t in token_counts],
                       positions(lay)))
    best_at = [min(times[i] for _, times, _ in scored) or 1e-30 for i in range(len(token_counts))]
    # a candidate's score is its worst slowdown against the best candidate at any token count
    score = {c: max(t / b for t, b in zip(times, best_at)) for c, times, _ in scored}
    # alignment by time alone (the smallest one only where a larger saves nothing) ...
    by_shape: dict[tuple[int, int], tuple[int, int, int]] = {}
    for c, _, _ in scored:
        kept = by_shape.get(c[:2])
        if kept is None or score[c] < score[kept] * (1 - 1e-9):
            by_shape[c[:2]] = c
    # ... the tile shape within `tolerance` of the best: the smallest span (most positions,
    # finest sharing), then the squarest
    best = min(score[c] for c in by_shape.values())
    near = [c for c in by_shape.values() if score[c] <= best * (1 + tolerance)]
    return min(near, key=lambda c: (c[0] * c[1], abs(math.log2(c[0]) - math.log2(c[1])), -c[0]))


def plan_with_cost_model(
    specs: list[SiteSpec],
    memory_size: int,
    scales: dict[str, float],
    profile: HardwareProfile | str | None = None,
    seed: int = 0,
    *,
    scheme: str = "roast",
    memory_dtype: str = "float32",
    token_counts=DEFAULT_TOKENS,
    mode: str = "infer",
    compute_dtype: str | None = None,
    tile=None,
    alignment=None,
    chunk=None,
    order: Iterable[str] | None = None,
    notes=(),
    progress: Callable[[int, int], None] | None = None,
    tolerance: float = TOLERANCE,
) -> Plan:
    """Lay out every site in one memory of ``memory_size`` slots, tiles chosen by predicted time."""
    profile = get_profile(profile)
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; accepted: {', '.join(SCHEMES)}")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not valid; accepted: {', '.join(MODES)}")
    token_counts = tuple(token_counts)
    if not token_counts or any(not isinstance(t, int) or isinstance(t, bool) or t < 1 for t in token_counts):
        raise ValueError(f"token_counts must be positive ints, got {token_counts!r}")
    _validate_tile("hash", tile, alignment, chunk)
    if not specs:
        raise ValueError("nothing to plan: the model has no weight that feeds a matmul-like op")
    if not isinstance(memory_size, int) or memory_size < 1:
        raise ValueError(f"memory_size must be a positive int (slots), got {memory_size!r}")
    for spec in specs:
        if 0 in spec.shape:
            raise ValueError(f"site {spec.name!r} has shape {spec.shape}: an empty weight cannot be tiled")
        if spec.name not in scales:
            raise ValueError(f"no scale for site {spec.name!r}; scales has {len(scales)} entries")
    if scheme == "hashednet":
        tile, alignment = (1, 1), 1
    mem_itemsize = itemsize(memory_dtype)
    line_elements = profile.alignment_elements(mem_itemsize)

    graph = execution_graph(specs, order)
    windows = site_windows(specs, memory_size, scheme, alignment or line_elements, fixed=alignment is not None)
    windows = dict(zip((s.name for s in specs), windows))
    chosen: dict[tuple, tuple[int, int, int]] = {}
    sites = {}
    names = list(nx.topological_sort(graph))
    for done, name in enumerate(names, 1):
        spec = graph.nodes[name]["spec"]
        window = windows[name]
        key = (view_shape(spec), spec.op, spec.other_ops, spec.dtype, window)
        if key not in chosen:
            chosen[key] = choose_layout(
                spec, window, profile, memory_size=memory_size, memory_itemsize=mem_itemsize,
                token_counts=token_counts, mode=mode, compute_dtype=compute_dtype, tile=tile, alignment=alignment,
                chunk=chunk, tolerance=tolerance)
        tk, tn, a = chosen[key]
        if tk * tn > window[1]:
            raise ValueError(
                f"memory too small: site {name!r} needs a hash tile of {tk}x{tn} = {tk * tn} slots but its "
                f"window has {window[1]} (memory_size={memory_size}); raise the compression budget"
            )
        sites[name] = make_site(spec, float(scales[name]), seed, (tk, tn), a, window)
        if progress is not None:
            progress(done, len(names))
    note = (f"cost-model planner: target {profile.name}, mode {mode}, token counts "
            f"{', '.join(map(str, token_counts))}")
    return Plan(seed=int(seed), memory_size=int(memory_size), memory_dtype=memory_dtype, scheme=scheme,
                target=profile.name, sites=tuple(sites[s.name] for s in specs), notes=tuple(notes) + (note,))
