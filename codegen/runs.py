"""The PyTorch path by runs: a site's view read from the memory one contiguous run at a time.

Row k of hash tile (i, j) is one contiguous run of ``tile_cols`` slots, starting at the tile's
start plus ``(k mod tile_rows) * tile_cols`` (docs/mapping.md). So a view, or some of its rows
(an embedding lookup), is a gather of runs (rows of ``memory.unfold``), not of single elements,
and a gradient goes back as whole runs added at once. Only the signs are per element: computed
from the sign hash in 32-bit arithmetic, or on the CPU read from a bounded cache of one byte per
element (`VIEW_CACHE`, which also keeps the run starts). This is what runs wherever no Triton
kernel does (the CPU, float64); codegen/reference.py keeps the element-by-element formulas, the
oracle both paths are tested against.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict

import torch

from .hashing import PRIME, SIGN_BIT, TileHash


def run_starts(mapping: TileHash, rows: torch.Tensor) -> torch.Tensor:
    """First slot of each (row, tile column) run: shape rows.shape + (tile columns,), int64."""
    k = rows.to(torch.int64)
    j = torch.arange(mapping.grid[1], device=rows.device, dtype=torch.int64)
    in_tile = (k % mapping.tile_rows) * mapping.tile_cols
    return mapping.tile_offset((k // mapping.tile_rows)[..., None], j) + in_tile[..., None]


def signs(mapping: TileHash, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The sign (int8 +1/-1) of element (row, col), rows and cols broadcast: bit 16 of
    (c_row * k + c_col * n + d) mod P, in int32 without overflow. With u = c_row * k mod P and
    v = (c_col * n + d) mod P, s = u + v - P lies in [-P, P); the sum mod P is s where s >= 0,
    else s + P = s - 1 + 2**31, whose bits below 31 are those of s - 1."""
    u = (mapping.c_row * rows.to(torch.int64) % PRIME).to(torch.int32)
    v = ((mapping.c_col * cols.to(torch.int64) % PRIME + mapping.d) % PRIME - PRIME).to(torch.int32)
    s = u + v
    s += s >> 31
    return (1 - ((s >> (SIGN_BIT - 1)) & 2)).to(torch.int8)


class ViewCache:
    """Per CPU mapping, what reading its whole view needs besides the memory: the signs (int8 +1/-1, one
    byte per element) and the run starts (int64, one per row and tile column), least recently used first
    out, bounded in bytes. Both are pure functions of the frozen ``TileHash``, so an entry is exactly what
    `signs` and `run_starts` compute. ROASTFX_VIEW_CACHE_MB sets the budget (default 256; 0 turns it off)."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"view cache budget must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[TileHash, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def get(self, mapping: TileHash) -> tuple[torch.Tensor, torch.Tensor]:
        """(signs (rows, cols) int8, run starts (rows, tile columns) int64) of the whole view."""
        entry = self._entries.get(mapping)
        if entry is not None:
            self._entries.move_to_end(mapping)
            return entry
        # plain tensors even inside a torch.func transform, whose wrappers must not outlive it in the cache
        with torch._C._DisableFuncTorch():
            rows = torch.arange(mapping.rows)
            entry = (signs(mapping, rows[:, None], torch.arange(mapping.cols)[None, :]), run_starts(mapping, rows))
        size = sum(t.numel() * t.element_size() for t in entry)
        if size <= self.max_bytes:
            while self.bytes + size > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self.bytes -= sum(t.numel() * t.element_size() for t in old)
            self._entries[mapping] = entry
            self.bytes += size
        return entry

    def holds(self, mapping: TileHash) -> bool:
        """Whether ``mapping``'s entry is here or would fit in the budget."""
        return mapping in self._entries or mapping.rows * (mapping.cols + 8 * mapping.grid[1]) <= self.max_bytes

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


def _cache_budget() -> int:
    name = "ROASTFX_VIEW_CACHE_MB"
    value = os.environ.get(name)
    if value is None and "ROASTFX_INDEX_CACHE_MB" in os.environ:  # its name when it held an index per element
        name, value = "ROASTFX_INDEX_CACHE_MB", os.environ["ROASTFX_INDEX_CACHE_MB"]
    try:
        megabytes = float(value if value is not None else 256)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a number of megabytes (0 turns the view cache off)")
    if megabytes < 0:
        raise ValueError(f"{name}={value!r}: the view cache budget must be >= 0 megabytes")
    return int(megabytes * 2**20)


VIEW_CACHE = ViewCache(_cache_budget())


def _whole_view(mapping: TileHash, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(signs, run starts) of every row of the view: from `VIEW_CACHE` on the CPU (not while torch.compile
    traces, whose tensors must not enter the cache)."""
    if torch.device(device).type == "cpu" and not torch.compiler.is_compiling():
        return VIEW_CACHE.get(mapping)
    rows = torch.arange(mapping.rows, device=device)
    return signs(mapping, rows[:, None], torch.arange(mapping.cols, device=device)[None, :]), run_starts(mapping, rows)


def _gather(memory: torch.Tensor, mapping: TileHash, starts: torch.Tensor) -> torch.Tensor:
    """The runs at ``starts`` (shape S + (tile columns,)), laid side by side and cut to the view's width:
    unsigned, unscaled view rows, S + (cols,), a new tensor (possibly a narrowed view of one)."""
    # rows of the unfolded memory by index_select: a copy of whole runs (advanced indexing of the unfolded
    # view took 9x as long on a CPU)
    runs = torch.index_select(memory.unfold(0, mapping.tile_cols, 1), 0, starts.reshape(-1))
    return runs.view(*starts.shape[:-1], -1)[..., :mapping.cols]


def _scaled_gather(memory: torch.Tensor, mapping: TileHash, starts: torch.Tensor, sign: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """``scale * sign * memory[runs]``, a new contiguous tensor (not a view: ops return it, and a caller may
    write to it in place). The scale multiplies the memory first where it is the smaller tensor: the same
    numbers, since a sign flip commutes with rounding."""
    small = memory.numel() < starts.numel() * mapping.tile_cols
    runs = _gather(memory * float(scale) if small else memory, mapping, starts)
    if runs.is_contiguous():
        # a view of index_select's result: the product is a tensor of its own, so that a custom op or
        # autograd.Function returning it returns no view (which a caller's in-place op, e.g. BLIP's
        # `embeddings += position_embeddings`, could not modify)
        signed = torch.mul(runs, sign)
    else:  # narrowed to the view's width: signed in place, then copied once into a tensor of its own
        signed = runs.mul_(sign).contiguous()
    # the sign flip is exact, then the Python scale multiplies in the memory's dtype and rounds once, as
    # reference.materialize does
    return signed if small else signed.mul_(float(scale))


def gather_view(memory: torch.Tensor, mapping: TileHash, scale: float) -> torch.Tensor:
    """The (rows, cols) view ``scale * sign * memory[index]``, equal to reference.materialize; no autograd
    (the ops that call it define their backward)."""
    sign, starts = _whole_view(mapping, memory.device)
    return _scaled_gather(memory, mapping, starts, sign, scale)


def gather_view_differentiable(memory: torch.Tensor, mapping: TileHash, scale: float) -> torch.Tensor:
    """The same view as `gather_view`, built of differentiable torch ops (one memory index per element, a
    transient int64 tensor of the view's shape), so that autograd and torch.func transforms (grad, vmap,
    jacrev, jvp) differentiate it themselves: for transforms, which cannot enter the roast custom ops."""
    sign, starts = _whole_view(mapping, memory.device)
    index = (starts[..., None] + torch.arange(mapping.tile_cols, device=memory.device)).reshape(mapping.rows, -1)
    return memory[index[:, :mapping.cols]] * sign.to(memory.dtype) * float(scale)


def gather_rows(memory: torch.Tensor, mapping: TileHash, scale: float, ids: torch.Tensor) -> torch.Tensor:
    """View rows ``ids`` (an embedding lookup), shape ids.shape + (cols,), equal to
    reference.materialize_rows."""
    sign, starts = _row_terms(mapping, ids)
    return _scaled_gather(memory, mapping, starts, sign, scale)


def _row_terms(mapping: TileHash, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(signs, run starts) of view rows ``ids``: read from the whole view's where the CPU cache holds it (or
    has room for it), else computed for these rows only."""
    if ids.device.type == "cpu" and VIEW_CACHE.holds(mapping):
        sign, starts = VIEW_CACHE.get(mapping)
        return sign[ids], starts[ids]
    cols = torch.arange(mapping.cols, device=ids.device)
    return signs(mapping, ids[..., None], cols), run_starts(mapping, ids)


def _scatter(values: torch.Tensor, mapping: TileHash, starts: torch.Tensor, size: int) -> torch.Tensor:
    """Sum each element of ``values`` (starts.shape[:-1] + (cols,), already signed and scaled) into its slot
    of a zero memory of ``size`` slots: whole runs at a time, as rows of ``block`` slots, runs starting on
    multiples of ``block`` (the gcd of the alignment and the run length)."""
    tn, grid_cols = mapping.tile_cols, mapping.grid[1]
    block = math.gcd(mapping.alignment, tn)
    flat = values.reshape(-1, mapping.cols)
    if grid_cols * tn != mapping.cols:  # the last tile column's runs are longer than the view: pad them
        flat = torch.nn.functional.pad(flat, (0, grid_cols * tn - mapping.cols))
    index = (starts.reshape(-1, grid_cols, 1) // block + torch.arange(tn // block, device=values.device)).reshape(-1)
    out = values.new_zeros(-(-size // block), block)
    out.index_add_(0, index, flat.reshape(-1, block))
    return out.reshape(-1)[:size]


def scatter_view_grad(grad_view: torch.Tensor, mapping: TileHash, scale: float, size: int) -> torch.Tensor:
    """d(loss)/d(memory) of a memory of ``size`` slots, given d(loss)/d(view); in grad_view's dtype."""
    sign, starts = _whole_view(mapping, grad_view.device)
    return _signed_scatter(grad_view, mapping, starts, sign, scale, size)


def _signed_scatter(values: torch.Tensor, mapping: TileHash, starts: torch.Tensor, sign: torch.Tensor,
                    scale: float, size: int) -> torch.Tensor:
    """`_scatter` of ``scale * sign * values``, each element scaled and signed before the sums, as autograd of
    reference.materialize does it (the sums' order may differ)."""
    if values.is_contiguous():
        signed = values * float(scale)
    else:  # e.g. a transposed weight's gradient: one copy into the view's layout, then the arithmetic on it
        # (elementwise ops over the strided tensor took 2-3x as long as the copy on a CPU)
        signed = values.contiguous().mul_(float(scale))
    return _scatter(signed.mul_(sign), mapping, starts, size)


def scatter_rows_grad(grad_rows: torch.Tensor, ids: torch.Tensor, mapping: TileHash, scale: float,
                      size: int) -> torch.Tensor:
    """d(loss)/d(memory) of `gather_rows`, given d(loss)/d(rows), in grad_rows' dtype."""
    sign, starts = _row_terms(mapping, ids)
    return _signed_scatter(grad_rows, mapping, starts, sign, scale, size)


def slice_sumsq(memory: torch.Tensor, mapping: TileHash, scale: float, per_column: bool) -> torch.Tensor:
    """Sum of squares of each column (``per_column``) or row of the view, through the whole view (weight
    norm's per-slice norms, squared); float32, or float64 for a float64 memory. The Triton kernel
    (triton_norms.py) reads the memory block by block instead."""
    view = gather_view(memory, mapping, scale)
    return view.to(torch.promote_types(view.dtype, torch.float32)).square().sum(0 if per_column else 1)


def slice_sumsq_grad(grad: torch.Tensor, memory: torch.Tensor, mapping: TileHash, scale: float,
                     per_column: bool) -> torch.Tensor:
    """d(loss)/d(memory) of `slice_sumsq` given d(loss)/d(sums): d/d(view) is 2 * view * the grad of its
    slice, taken back to the memory as any view gradient is."""
    view = gather_view(memory, mapping, scale)
    wide = torch.promote_types(view.dtype, grad.dtype)
    grad = grad.to(wide)
    grad_view = 2 * view.to(wide) * (grad[None, :] if per_column else grad[:, None])
    return scatter_view_grad(grad_view, mapping, scale, memory.numel())


def slot_sums(views: list[torch.Tensor], mappings: list[TileHash], scales: list[float], size: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of ``sign * w / scale``, number of elements) per memory slot over the given B views, in float64
    on the CPU, whole runs at a time: the sums behind `reference.project` and `reference.project_write`,
    without their per-element int64 index (compress projects every weight of a model through this)."""
    total = torch.zeros(size, dtype=torch.float64)
    count = torch.zeros(size, dtype=torch.float64)
    for view, mapping, scale in zip(views, mappings, scales):
        sign, starts = _whole_view(mapping, "cpu")
        values = view.detach().to("cpu", torch.float64)
        total += _signed_scatter(values, mapping, starts, sign, 1.0 / scale, size)
        count += _run_counts(mapping, starts, size)
    return total, count


def _run_counts(mapping: TileHash, starts: torch.Tensor, size: int) -> torch.Tensor:
    """Elements per slot of one view (float64): each run covers its slots once, so +1 at its start and -1
    after its end, summed up (two index_adds per run instead of one per element)."""
    grid_cols, tn = mapping.grid[1], mapping.tile_cols
    widths = torch.full((grid_cols,), tn, dtype=torch.int64)
    widths[-1] = mapping.cols - (grid_cols - 1) * tn  # the last tile column's runs end at the view's edge
    runs = starts.reshape(-1, grid_cols).to(torch.int64)
    edges = torch.zeros(size + 1, dtype=torch.int64)
    edges.index_add_(0, runs.reshape(-1), torch.ones(runs.numel(), dtype=torch.int64))
    edges.index_add_(0, (runs + widths).reshape(-1), torch.full((runs.numel(),), -1, dtype=torch.int64))
    return edges.cumsum(0)[:size].to(torch.float64)


def project(views: list[torch.Tensor], mappings: list[TileHash], scales: list[float], size: int) -> torch.Tensor:
    """`reference.project` (per slot, the mean of ``sign * w / scale`` over every element landing there; empty
    slots 0), by runs."""
    total, count = slot_sums(views, mappings, scales, size)
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def project_write(baseline: torch.Tensor, load: torch.Tensor, views: list[torch.Tensor], mappings: list[TileHash],
                  scales: list[float]) -> torch.Tensor:
    """`reference.project_write` (some sites set to ``views``, every other site's elements kept at their
    ``baseline`` slot values; ``load``: every site's elements per slot), by runs; float64 on the baseline's
    device."""
    total, mine = slot_sums(views, mappings, scales, baseline.numel())
    total, mine = total.to(baseline.device), mine.to(baseline.device)
    old = baseline.detach().to(torch.float64)
    others = load.to(baseline.device, torch.float64) - mine
    return torch.where(mine > 0, (old * others + total) / (others + mine).clamp_min(1), old)
