"""Predicted time of a site's GEMM on a hardware profile: a roofline over cache lines.

Every quantity is a *prediction* from datasheet figures, never a measurement.
Times are sympy expressions in the token count ``T`` (rows of the GEMM's A
operand: tokens, or output pixels for a conv), built by the same code that the
planner evaluates numerically, so the report's formulas are the ones the
planner minimized. docs/planner.md writes the formulas out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import sympy
import torch

from roastfx.profiles import HardwareProfile

T = sympy.Symbol("T", positive=True, integer=True)

EMBEDDING_OPS = ("embedding", "embedding_bag")
_ITEMSIZE = {"float64": 8, "float32": 4, "tf32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "int8": 1}


def itemsize(dtype: str) -> int:
    key = str(dtype).removeprefix("torch.")
    if key not in _ITEMSIZE:
        raise ValueError(f"unknown dtype {dtype!r}; the cost model knows {', '.join(_ITEMSIZE)}")
    return _ITEMSIZE[key]


@dataclass(frozen=True)
class Layout:
    """What the cost model reads of a mapping (a TileHash has every field)."""

    rows: int
    cols: int
    tile_rows: int
    tile_cols: int
    alignment: int
    window_start: int
    window_size: int

    @property
    def span(self) -> int:
        return self.tile_rows * self.tile_cols


def positions(layout) -> int:
    """Distinct aligned start positions a tile may take in its window."""
    return (layout.window_size - layout.tile_rows * layout.tile_cols) // layout.alignment + 1


def effective_width(layout) -> int:
    """Slots over which one tile element's landing place is spread (alignment x positions)."""
    return layout.alignment * positions(layout)


# -- cache lines --------------------------------------------------------------------------------------
@lru_cache(maxsize=65536)
def expected_lines(span: int, alignment: int, itemsize: int, line_bytes: int) -> float:
    """Expected cache lines touched by a run of ``span`` elements whose start is a multiple of ``alignment``.

    The start's byte offset within a line takes every multiple of gcd(alignment*itemsize, line)
    with equal chance (a hashed offset); a run starting r bytes into a line touches
    ceil((r + span*itemsize) / line) lines.
    """
    if span <= 0:
        return 0.0
    step = math.gcd(alignment * itemsize, line_bytes)
    nbytes = span * itemsize
    total = sum(-(-(r + nbytes) // line_bytes) for r in range(0, line_bytes, step))
    return total / (line_bytes // step)


@dataclass(frozen=True)
class Reads:
    """One pass over every tile of a site: expected line reads and contiguous runs."""

    lines: float
    runs: int


def tile_reads(layout, itemsize: int, line_bytes: int) -> Reads:
    """Expected line reads of one pass over all tiles, edge tiles included.

    A tile with all its columns is one run of rows_in_tile*tile_cols slots; a tile cut
    by the right edge is one run of the remaining columns per row.
    """
    tr, tc, a = layout.tile_rows, layout.tile_cols, layout.alignment
    gr, gc = -(-layout.rows // tr), -(-layout.cols // tc)
    rr, cc = layout.rows - (gr - 1) * tr, layout.cols - (gc - 1) * tc
    full_cols = gc if cc == tc else gc - 1
    lines = full_cols * ((gr - 1) * expected_lines(tr * tc, a, itemsize, line_bytes)
                         + expected_lines(rr * tc, a, itemsize, line_bytes))
    runs = full_cols * gr
    if cc != tc:
        # the run of row k starts at offset + k*tc: its alignment is what offset and k*tc share
        row_align = math.gcd(a, tc)
        nrows = (gr - 1) * tr + rr
        lines += nrows * expected_lines(cc, row_align, itemsize, line_bytes)
        runs += nrows
    return Reads(lines, runs)


def row_reads(layout, itemsize: int, line_bytes: int) -> Reads:
    """Expected line reads of one embedding row (its chunks of tile_cols elements)."""
    tc = layout.tile_cols
    chunks = -(-layout.cols // tc)
    last = layout.cols - (chunks - 1) * tc
    lines = (chunks - 1) * expected_lines(tc, layout.alignment, itemsize, line_bytes) + expected_lines(
        last, layout.alignment, itemsize, line_bytes)
    return Reads(lines, chunks)


# -- the roofline ------------------------------------------------------------------------------------
def _symbolic(*xs) -> bool:
    return any(isinstance(x, sympy.Basic) for x in xs)


def _ceil(x):
    return sympy.ceiling(x) if _symbolic(x) else math.ceil(x)


def _max(a, b):
    return sympy.Max(a, b) if _symbolic(a, b) else max(a, b)


def memory_time(dram_bytes, l2_bytes, profile: HardwareProfile):
    """Seconds to move bytes from DRAM and from the cache (both streams counted, no overlap)."""
    return dram_bytes / (profile.dram_gbps * 1e9) + l2_bytes / (profile.l2_gbps * 1e9)


def roofline(flops, dram_bytes, l2_bytes, profile: HardwareProfile, dtype: str):
    """max(compute, memory) seconds: the kernel is as slow as its slower resource."""
    return _max(flops / (profile.peak(dtype) * 1e12), memory_time(dram_bytes, l2_bytes, profile))


@dataclass(frozen=True)
class Geometry:
    """The token-independent numbers of one site on one profile."""

    op: str
    rows: int
    cols: int
    numel: int
    act_itemsize: int
    compute_dtype: str
    weight_bytes: float  # one pass over every tile (lines x line bytes + per-run overhead)
    resident: float  # fraction of first-touch reads served by the cache (the whole memory's share of it)
    reuse: float  # fraction of repeated reads (later M blocks) served by the cache
    block_m: int
    atomic_s: float  # backward: seconds of atomic adds into the memory
    uses: int
    groups: int = 1  # a grouped site (stacked experts): each token multiplies one group's cols / groups columns


def default_compute_dtype(dtype: str) -> str:
    """The dtype a site's GEMM computes in: float32 follows torch's float32 matmul precision, as the
    kernels do (codegen.triton_matmul.dot_precision): TF32 tensor cores unless it is "highest", where
    the dot runs on FMA units at the float32 peak."""
    if dtype == "float32" and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return dtype


def geometry(layout, op: str, dtype: str, profile: HardwareProfile, *, memory_size: int, memory_itemsize: int,
             compute_dtype: str | None = None, uses: int = 1, run_overhead_bytes: int | None = None,
             groups: int = 1) -> Geometry:
    """Token-independent cost inputs of a site laid out as ``layout``; ``groups``: a grouped site's view
    holds that many column blocks, one per group (expert), each token reading one of them."""
    line = profile.cache_line_bytes
    overhead = profile.sector_bytes if run_overhead_bytes is None else run_overhead_bytes
    reads = row_reads(layout, memory_itemsize, line) if op in EMBEDDING_OPS else tile_reads(layout, memory_itemsize,
                                                                                              line)
    weight_bytes = reads.lines * line + reads.runs * overhead
    cache = profile.cache_resident_bytes
    resident = min(1.0, cache / max(1, memory_size * memory_itemsize))
    working_set = min(weight_bytes, layout.window_size * memory_itemsize)
    reuse = min(1.0, cache / max(1.0, working_set))
    numel = layout.rows * layout.cols
    # backward: one atomic add per weight element; updates in flight at once that hit the same slot serialize
    in_flight = min(numel, profile.units * profile.kernel_block[0] * profile.kernel_block[1])
    contention = in_flight / (layout.window_size - layout.tile_rows * layout.tile_cols + 1)
    atomic_s = numel * (1.0 + contention) / profile.atomic_rate()
    cdtype = compute_dtype or default_compute_dtype(dtype)
    return Geometry(op, layout.rows, layout.cols, numel, itemsize(cdtype), cdtype, weight_bytes, resident, reuse,
                    profile.kernel_block[0], atomic_s, uses, groups)


def costs(g: Geometry, profile: HardwareProfile, tokens=T) -> dict:
    """Predicted FLOPs, bytes and seconds of one site for ``tokens`` (a number or the symbol T).

    Keys: flops, dram_bytes, l2_bytes, t_compute, t_memory, t_forward, t_backward, t_train.
    """
    u = g.uses
    if g.op in EMBEDDING_OPS:
        # each token reads one row of chunks and writes it out; embeddings do no FLOPs worth counting
        act_bytes = tokens * (g.cols * g.act_itemsize + 8)
        flops = 0
        weight = tokens * g.weight_bytes
        dram = act_bytes + weight * (1 - g.resident)
        l2 = weight * g.resident
        t_fwd = memory_time(dram, l2, profile)
        atomic = g.atomic_s * tokens / max(1, g.rows)  # only the rows looked up receive gradients
        t_bwd = memory_time(act_bytes, 0, profile) + atomic
        t_compute = 0
    else:
        # a grouped site: each token multiplies one group's block of cols / groups columns, and each group's
        # tiles are read again by that group's later M blocks (tokens spread evenly over the groups)
        width = g.cols / g.groups
        act_bytes = tokens * (g.rows + width) * g.act_itemsize
        flops = 2 * tokens * g.rows * width
        repeats = _ceil(tokens / (g.block_m * g.groups)) - 1  # later M blocks read every tile again
        dram = act_bytes + g.weight_bytes * (1 - g.resident) + repeats * g.weight_bytes * (1 - g.reuse)
        l2 = g.weight_bytes * g.resident + repeats * g.weight_bytes * g.reuse
        t_compute = flops / (profile.peak(g.compute_dtype) * 1e12)
        t_fwd = roofline(flops, dram, l2, profile, g.compute_dtype)
        # dX = dY @ B^T reads B like the forward; dW = X^T @ dY reads activations and adds into the memory
        t_dw = roofline(flops, act_bytes, 0, profile, g.compute_dtype)
        t_bwd = t_fwd + t_dw + g.atomic_s
    return {
        "flops": u * flops, "dram_bytes": u * dram, "l2_bytes": u * l2, "t_compute": u * t_compute,
        "t_memory": u * memory_time(dram, l2, profile), "t_forward": u * t_fwd, "t_backward": u * t_bwd,
        "t_train": u * (t_fwd + t_bwd),
    }


def predicted_time(g: Geometry, profile: HardwareProfile, tokens: int, mode: str = "infer") -> float:
    """Seconds for one site at a given token count; mode "infer" (forward) or "train" (forward + backward)."""
    c = costs(g, profile, tokens)
    return float(c["t_forward"] if mode == "infer" else c["t_train"])


def symbolic_costs(g: Geometry, profile: HardwareProfile) -> dict:
    """The same costs as sympy expressions in T."""
    return {k: sympy.sympify(v) for k, v in costs(g, profile, T).items()}


# -- collision load -----------------------------------------------------------------------------------
def _same_slot(lo_x: float, e_x: float, s_x: float, lo_y: float, e_y: float, s_y: float, grid: int = 8) -> float:
    """P(two elements land on one slot): x uniform on [lo_x + q, lo_x + q + e_x) with q uniform in [0, s_x),
    likewise y; averaged over a grid of in-tile positions q (the ramps at the window ends)."""
    total = 0.0
    for gx in range(grid):
        qx = lo_x + (gx + 0.5) * s_x / grid
        for gy in range(grid):
            qy = lo_y + (gy + 0.5) * s_y / grid
            total += max(0.0, min(qx + e_x, qy + e_y) - max(qx, qy))
    return total / (grid * grid) / (e_x * e_y)


def _spread_key(lay) -> tuple[int, int, int]:
    """(window start, width, occupied in-tile extent): where one element of the site may land."""
    tr, tc = min(lay.tile_rows, lay.rows), lay.tile_cols
    occupied = tr * tc if lay.cols >= tc else (tr - 1) * tc + lay.cols
    return lay.window_start, effective_width(lay), occupied


def expected_collisions(layouts: list, numels: list[int] | None = None) -> list[float]:
    """Per site: expected number of *other* weight elements that share the slot of one of its elements.

    Analytic: an element at in-tile position q lands uniformly on [start + q, start + q + width) with
    width = alignment x positions; two elements share a slot with probability overlap / (width_x width_y).
    An element's own tile never collides with itself. Layouts are grouped, so the cost grows with the
    number of distinct layouts, not of sites.
    """
    numels = numels or [lay.rows * lay.cols for lay in layouts]
    groups: dict[tuple, int] = {}
    for n, lay in zip(numels, layouts):
        groups[_spread_key(lay)] = groups.get(_spread_key(lay), 0) + n
    seen: dict[tuple, float] = {}
    for key in groups:
        seen[key] = sum(n * _same_slot(*key, *other) for other, n in groups.items())
    out = []
    for lay in layouts:
        key = _spread_key(lay)
        own_tile = min(lay.tile_rows, lay.rows) * min(lay.tile_cols, lay.cols) * _same_slot(*key, *key)
        out.append(max(0.0, seen[key] - own_tile))
    return out


def analytic_load(layouts: list, memory_size: int, samples: int = 4096) -> dict:
    """Slot load (weight elements per memory slot) under independent uniform tile offsets.

    mean is exact (elements / slots). The expected load of slot s is a sum of trapezoids, one per
    layout (uniform landing interval widened by the in-tile extent), evaluated at ``samples`` slots;
    std combines that profile's spread (low load at window ends) with a Poisson spread per slot.
    The real hash spreads one site's tiles more evenly than independent offsets, so a counted
    spread is usually below this one.
    """
    groups: dict[tuple, int] = {}
    for lay in layouts:
        groups[_spread_key(lay)] = groups.get(_spread_key(lay), 0) + lay.rows * lay.cols
    k = min(memory_size, samples)
    profile = []
    for i in range(k):
        slot = (i + 0.5) * memory_size / k
        mu = 0.0
        for (start, width, occupied), n in groups.items():
            x = slot - start
            covered = min(x, occupied) - max(x - width, 0.0)
            if covered > 0:
                mu += n * covered / (occupied * width)
        profile.append(mu)
    mean = sum(lay.rows * lay.cols for lay in layouts) / memory_size
    profile_mean = sum(profile) / k
    var = sum((mu - profile_mean) ** 2 for mu in profile) / k + profile_mean
    return {"mean": mean, "interior_mean": max(profile), "std": math.sqrt(var)}


MAX_EXACT_SLOTS = 2**26
MAX_EXACT_TILES = 2**24


def exact_load_feasible(mappings: list, memory_size: int) -> bool:
    tiles = sum(m.grid[0] * m.grid[1] for m in mappings)
    return memory_size <= MAX_EXACT_SLOTS and tiles <= MAX_EXACT_TILES


def tile_offsets(mapping) -> torch.Tensor:
    """Start slot of every tile of one mapping, (grid_rows, grid_cols) int64."""
    gr, gc = mapping.grid
    i = torch.arange(gr, dtype=torch.int64)[:, None]
    j = torch.arange(gc, dtype=torch.int64)[None, :]
    return mapping.tile_offset(i, j)


def slot_load_by_tiles(mappings: list, memory_size: int) -> torch.Tensor:
    """Exact elements per memory slot, computed per tile run (no per-element index).

    Equal to codegen.reference.slot_load, at the cost of one offset per tile instead of per element.
    """
    starts, ends = [], []
    for m in mappings:
        off = tile_offsets(m)
        gr, gc = off.shape
        tr, tc = m.tile_rows, m.tile_cols
        rows_in = torch.full((gr, 1), tr, dtype=torch.int64)
        rows_in[-1] = m.rows - (gr - 1) * tr
        cc = m.cols - (gc - 1) * tc
        full = off if cc == tc else off[:, :-1]
        starts.append(full.reshape(-1))
        ends.append((full + rows_in * tc).reshape(-1))
        if cc != tc:
            # right-edge tiles: one run of cc slots per row of the tile
            k = torch.arange(tr, dtype=torch.int64)[None, :]
            row_starts = off[:, -1:] + k * tc
            valid = k < rows_in
            starts.append(row_starts[valid])
            ends.append(row_starts[valid] + cc)
    s, e = torch.cat(starts), torch.cat(ends)
    diff = torch.bincount(s, minlength=memory_size + 1) - torch.bincount(e, minlength=memory_size + 1)
    return torch.cumsum(diff, 0)[:memory_size]
