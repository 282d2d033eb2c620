"""Plan the global layout: memory size, per-site hash tile, alignment, window, hash constants.

This is the default planner: fixed rules that keep every tile valid and the
collision load spread. The hash constants come from the plan's seed through a
counter-based private generator (SHA-256 of seed, site name and field), so the
mapping is bit-identical on any machine and never touches a global RNG.
"""
from __future__ import annotations

import hashlib

from roastfx.codegen.hashing import PRIME, TileHash
from roastfx.codegen.reference import GROUPED, grouped_dims
from roastfx.plan import SCHEMES, Plan, Site

from .capture_sites import SiteSpec

MIN_POSITIONS = 64  # distinct aligned start positions a tile must have in its window
DEFAULT_TILE = (32, 32)
DEFAULT_CHUNK = 32  # ROBE-Z chunk for embeddings


def seeded_int(seed: int, *key, modulus: int) -> int:
    """Deterministic integer in [0, modulus) for (seed, key): the plan's private generator."""
    digest = hashlib.sha256(repr((int(seed),) + tuple(key)).encode()).digest()
    return int.from_bytes(digest[:16], "little") % modulus


def _pow2_at_least(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def view_shape(spec: SiteSpec) -> tuple[int, int]:
    if spec.op == GROUPED:  # (K, groups * N): each group a block of whole columns
        groups, k, n = grouped_dims(spec.shape, spec.transposed)
        return k, groups * n
    rows = spec.shape[0]
    cols = 1
    for s in spec.shape[1:]:
        cols *= s
    return (cols, rows) if spec.transposed else (rows, cols)


def group_width(spec: SiteSpec) -> int | None:
    """N, the columns of one group's block of a grouped site's view (tiles must not straddle two groups, so
    that each group reads as a mapping of its own: ``codegen.ops.column_windows``); None for other sites."""
    return grouped_dims(spec.shape, spec.transposed)[2] if spec.op == GROUPED else None


def choose_tile(rows: int, cols: int, op: str, window: int, cache_line: int, tile=None, alignment=None, chunk=None,
                group_cols: int | None = None):
    """(tile_rows, tile_cols, alignment) for one site in a window of ``window`` slots; with ``group_cols``
    (a grouped site) the tile's columns divide it."""
    if tile is not None:
        tk, tn = tile
    elif op in ("embedding", "embedding_bag"):
        tk, tn = 1, min(chunk or DEFAULT_CHUNK, _pow2_at_least(cols))
    else:
        tk, tn = min(DEFAULT_TILE[0], _pow2_at_least(rows)), min(DEFAULT_TILE[1], _pow2_at_least(group_cols or cols))
        while group_cols and group_cols % tn:
            tn //= 2
    align = alignment if alignment is not None else cache_line
    if tile is None:
        # shrink until the window holds enough distinct positions: first alignment, then the tile
        while (window - tk * tn) // align + 1 < MIN_POSITIONS:
            if alignment is None and align > 1:
                align //= 2
            elif tk * tn > 1:
                if tk >= tn and tk > 1:
                    tk //= 2
                else:
                    tn //= 2
            else:
                break
    if alignment is None:
        align = min(align, _pow2_at_least(tk * tn))
    return tk, tn, align


def _validate_tile(name: str, tile, alignment, chunk):
    if tile is not None:
        if not (isinstance(tile, (tuple, list)) and len(tile) == 2 and all(isinstance(t, int) and t >= 1 for t in tile)):
            raise ValueError(f"{name} tile must be two positive ints (tile_rows, tile_cols), got {tile!r}")
    if alignment is not None and (not isinstance(alignment, int) or alignment < 1):
        raise ValueError(f"alignment must be a positive int (memory elements), got {alignment!r}")
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be a positive int (elements per embedding chunk), got {chunk!r}")


def plan_layout(
    specs: list[SiteSpec],
    memory_size: int,
    scales: dict[str, float],
    *,
    seed: int = 0,
    scheme: str = "roast",
    target: str = "cpu-avx2",
    cache_line: int = 16,
    memory_dtype: str = "float32",
    tile=None,
    alignment=None,
    chunk=None,
    notes=(),
) -> Plan:
    """Lay out every site in one memory of ``memory_size`` slots."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; accepted: {', '.join(SCHEMES)}")
    _validate_tile("hash", tile, alignment, chunk)
    if not specs:
        raise ValueError("nothing to plan: the model has no weight that feeds a matmul-like op")
    for spec in specs:
        if 0 in spec.shape:
            raise ValueError(f"site {spec.name!r} has shape {spec.shape}: an empty weight cannot be tiled; "
                             "exclude it (exclude=[...]) or give it a non-zero size")
    if scheme == "hashednet":
        tile, alignment = (1, 1), 1

    windows = site_windows(specs, memory_size, scheme, alignment or cache_line, fixed=alignment is not None)
    sites = []
    for spec, (start, size) in zip(specs, windows):
        rows, cols = view_shape(spec)
        line = _start_alignment(start, cache_line) if alignment is None else cache_line
        tk, tn, align = choose_tile(rows, cols, spec.op, size, line, tile, alignment, chunk, group_width(spec))
        if tk * tn > size:
            raise ValueError(
                f"memory too small: site {spec.name!r} needs a hash tile of {tk}x{tn} = {tk * tn} slots but its "
                f"window has {size} (memory_size={memory_size}); raise the compression budget or pass a smaller tile"
            )
        sites.append(make_site(spec, float(scales[spec.name]), seed, (tk, tn), align, (start, size)))
    return Plan(seed=int(seed), memory_size=int(memory_size), memory_dtype=memory_dtype, scheme=scheme,
                target=target, sites=tuple(sites), notes=tuple(notes))


def make_site(spec: SiteSpec, scale: float, seed: int, tile: tuple[int, int], alignment: int,
              window: tuple[int, int]) -> Site:
    """The site of ``spec`` with a chosen tile, alignment and window; hash constants from the seed."""
    (tk, tn), (start, size) = tile, window
    if start % alignment:
        raise ValueError(f"site {spec.name!r}: window start {start} not aligned to {alignment}")
    rows, cols = view_shape(spec)
    const = [seeded_int(seed, spec.name, f, modulus=PRIME - 1) + 1 for f in ("a_row", "a_col", "c_row", "c_col")]
    mapping = TileHash(
        rows=rows, cols=cols, tile_rows=tk, tile_cols=tn, alignment=alignment,
        window_start=start, window_size=size,
        a_row=const[0], a_col=const[1], b=seeded_int(seed, spec.name, "b", modulus=PRIME),
        c_row=const[2], c_col=const[3], d=seeded_int(seed, spec.name, "d", modulus=PRIME),
    )
    return Site(spec.name, spec.bindings, spec.shape, spec.op, spec.transposed, spec.dtype, float(scale), mapping,
                tuple(getattr(spec, "other_ops", ())))


def site_windows(specs, memory_size: int, scheme: str, align: int, fixed: bool = False) -> list[tuple[int, int]]:
    """(start, size) of the memory region each site's tiles may land in.

    Local schemes split the memory in aligned units: every site gets at least one
    unit, the rest go by its share of the dense weights (largest remainders first),
    and the last site also takes the slots past the last whole unit. The unit
    halves when the memory has fewer whole units than sites, unless it is an alignment the
    user asked for (``fixed``).
    """
    if scheme == "roast":
        return [(0, memory_size)] * len(specs)
    align = 1 if scheme == "hashednet" else max(1, align)
    if fixed and scheme != "hashednet" and memory_size // align < len(specs):
        raise ValueError(
            f"memory of {memory_size} slots cannot give {len(specs)} sites a window each aligned to alignment={align} "
            f"under scheme {scheme!r} (that needs {len(specs) * align} slots); lower the alignment, raise the budget "
            "or use scheme='roast' (global sharing)")
    while align > 1 and memory_size // align < len(specs):
        align //= 2
    units = memory_size // align
    if units < len(specs):
        raise ValueError(
            f"memory of {memory_size} slots cannot give {len(specs)} sites a region each under scheme {scheme!r}; "
            f"raise the budget to at least {len(specs)} slots or use scheme='roast' (global sharing)"
        )
    numels = [_numel(s) for s in specs]
    total = sum(numels)
    spare = units - len(specs)
    shares = [spare * n / total for n in numels]
    counts = [1 + int(x) for x in shares]
    left = units - sum(counts)
    for i in sorted(range(len(specs)), key=lambda i: shares[i] - int(shares[i]), reverse=True)[:left]:
        counts[i] += 1
    windows, start = [], 0
    for i, c in enumerate(counts):
        size = c * align + (memory_size - units * align if i == len(counts) - 1 else 0)
        windows.append((start, size))
        start += c * align
    return windows


def _start_alignment(start: int, limit: int) -> int:
    """The largest power of two <= limit that divides ``start`` (limit when start is 0)."""
    a = 1
    while a * 2 <= limit and start % (a * 2) == 0:
        a *= 2
    return limit if start == 0 else a


def _numel(spec: SiteSpec) -> int:
    n = 1
    for s in spec.shape:
        n *= s
    return n

