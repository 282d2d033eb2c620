"""The PyTorch path by runs: a site's view read from the memory one contiguous run at a time.

Row k of hash tile (i, j) is one contiguous run of ``tile_cols`` slots, starting at the tile's
start plus ``(k mod tile_rows) * tile_cols`` (docs/mapping.md). So a view, or some of its rows
(an embedding lookup), is a gather of runs (rows of ``memory.unfold``), not of single elements,
and a gradient goes back as whole runs added at once. Only the signs are per element: computed
from the sign hash in 32-bit arithmetic, or on the CPU read from a bounded cache of one byte per
element (`SIGN_CACHE`). This is what runs wherever no Triton kernel does (the CPU, float64);
codegen/reference.py keeps the element-by-element formulas, the oracle both paths are tested
against.
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
    return mapping.tile_offset((k // mapping.tile_rows)[..., None], j) + ((k % mapping.tile_rows) * mapping.tile_cols)[..., None]


def negative(mapping: TileHash, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Where the sign of element (row, col) is -1 (bool, rows and cols broadcast): bit 16 of
    (c_row * k + c_col * n + d) mod P, in int32 without overflow. With u = c_row * k mod P and
    v = (c_col * n + d) mod P, s = u + v - P lies in [-P, P); the sum mod P is s where s >= 0,
    else s + P = s - 1 + 2**31, whose bits below 31 are those of s - 1."""
    u = (mapping.c_row * rows.to(torch.int64) % PRIME).to(torch.int32)
    v = ((mapping.c_col * cols.to(torch.int64) % PRIME + mapping.d) % PRIME - PRIME).to(torch.int32)
    s = u + v
    s += s >> 31
    return (s & (1 << SIGN_BIT)) != 0


class SignCache:
    """The signs of whole CPU views (bool, one byte per element), least recently used first out,
    bounded in bytes. A sign is a pure function of the frozen ``TileHash``, so an entry is exactly
    what `negative` computes. ROASTFX_SIGN_CACHE_MB sets the budget (default 256; 0 turns it off)."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"sign cache budget must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[TileHash, torch.Tensor] = OrderedDict()

    def get(self, mapping: TileHash) -> torch.Tensor:
        entry = self._entries.get(mapping)
        if entry is not None:
            self._entries.move_to_end(mapping)
            return entry
        entry = negative(mapping, torch.arange(mapping.rows)[:, None], torch.arange(mapping.cols)[None, :])
        size = entry.numel()
        if size <= self.max_bytes:
            while self.bytes + size > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self.bytes -= old.numel()
            self._entries[mapping] = entry
            self.bytes += size
        return entry

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


def _cache_budget() -> int:
    name = "ROASTFX_SIGN_CACHE_MB"
    value = os.environ.get(name)
    if value is None and "ROASTFX_INDEX_CACHE_MB" in os.environ:  # its name before the cache held only signs
        name, value = "ROASTFX_INDEX_CACHE_MB", os.environ["ROASTFX_INDEX_CACHE_MB"]
    try:
        megabytes = float(value if value is not None else 256)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a number of megabytes (0 turns the sign cache off)")
    if megabytes < 0:
        raise ValueError(f"{name}={value!r}: the sign cache budget must be >= 0 megabytes")
    return int(megabytes * 2**20)


SIGN_CACHE = SignCache(_cache_budget())


def view_negative(mapping: TileHash, device) -> torch.Tensor:
    """`negative` over the whole (rows, cols) view, from `SIGN_CACHE` on the CPU."""
    if torch.device(device).type == "cpu":
        return SIGN_CACHE.get(mapping)
    return negative(mapping, torch.arange(mapping.rows, device=device)[:, None],
                    torch.arange(mapping.cols, device=device)[None, :])


def _gather(memory: torch.Tensor, mapping: TileHash, rows: torch.Tensor) -> torch.Tensor:
    """Unsigned, unscaled view rows: rows.shape + (cols,)."""
    starts = run_starts(mapping, rows)
    runs = memory.unfold(0, mapping.tile_cols, 1)[starts]  # rows.shape + (tile columns, tile_cols)
    return runs.reshape(*rows.shape, -1)[..., :mapping.cols]


def _signed_scaled(values: torch.Tensor, negative_: torch.Tensor, scale: float) -> torch.Tensor:
    # the sign flip is exact; the Python scale then multiplies in the values' dtype and rounds once, as
    # reference.materialize does
    return torch.where(negative_, -values, values) * float(scale)


def gather_view(memory: torch.Tensor, mapping: TileHash, scale: float) -> torch.Tensor:
    """The (rows, cols) view ``scale * sign * memory[index]``, equal to reference.materialize."""
    rows = torch.arange(mapping.rows, device=memory.device)
    return _signed_scaled(_gather(memory, mapping, rows), view_negative(mapping, memory.device), scale)


def gather_rows(memory: torch.Tensor, mapping: TileHash, scale: float, ids: torch.Tensor) -> torch.Tensor:
    """View rows ``ids`` (an embedding lookup), shape ids.shape + (cols,), equal to
    reference.materialize_rows."""
    cols = torch.arange(mapping.cols, device=memory.device)
    return _signed_scaled(_gather(memory, mapping, ids), negative(mapping, ids[..., None], cols), scale)


def _scatter(values: torch.Tensor, mapping: TileHash, rows: torch.Tensor, size: int) -> torch.Tensor:
    """Sum each element of ``values`` (rows.shape + (cols,), already signed and scaled) into its slot of a
    zero memory of ``size`` slots: whole runs at a time, as rows of ``block`` slots where runs start on
    multiples of ``block`` (the gcd of the alignment and the run length)."""
    tn, grid_cols = mapping.tile_cols, mapping.grid[1]
    block = math.gcd(mapping.alignment, tn)
    flat = values.reshape(-1, mapping.cols)
    if grid_cols * tn != mapping.cols:  # the last tile column's runs are longer than the view: pad them
        flat = torch.nn.functional.pad(flat, (0, grid_cols * tn - mapping.cols))
    starts = run_starts(mapping, rows.reshape(-1)) // block  # (rows, tile columns) in blocks
    index = (starts[..., None] + torch.arange(tn // block, device=values.device)).reshape(-1)
    out = values.new_zeros(-(-size // block), block)
    out.index_add_(0, index, flat.reshape(-1, block))
    return out.reshape(-1)[:size]


def scatter_view_grad(grad_view: torch.Tensor, mapping: TileHash, scale: float, size: int) -> torch.Tensor:
    """d(loss)/d(memory) of a memory of ``size`` slots, given d(loss)/d(view); in grad_view's dtype."""
    signed = _signed_scaled(grad_view, view_negative(mapping, grad_view.device), scale)
    return _scatter(signed, mapping, torch.arange(mapping.rows, device=grad_view.device), size)


def scatter_rows_grad(grad_rows: torch.Tensor, ids: torch.Tensor, mapping: TileHash, scale: float,
                      size: int) -> torch.Tensor:
    """d(loss)/d(memory) of `gather_rows`, given d(loss)/d(rows), in grad_rows' dtype."""
    cols = torch.arange(mapping.cols, device=grad_rows.device)
    signed = _signed_scaled(grad_rows, negative(mapping, ids[..., None], cols), scale)
    return _scatter(signed, mapping, ids, size)
