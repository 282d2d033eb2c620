"""The ROAST mapping: where each element of a site's weight lives in the memory.

Everything here is the exact arithmetic documented in docs/mapping.md; the
Triton kernels evaluate the same formulas per block, so any block size reads
the same slots. All arithmetic is int64 with every intermediate below 2**62.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields

import torch

PRIME = 2**31 - 1  # Mersenne prime: hash constants and keys live in Z_P
SIGN_BIT = 16  # which bit of the sign hash picks the sign


@dataclass(frozen=True)
class TileHash:
    """The mapping of one site, viewed as the (rows x cols) B operand of its GEMM.

    The view is cut into hash tiles of tile_rows x tile_cols. Tile (i, j) is one
    contiguous run of tile_rows*tile_cols memory slots that starts at
    ``window_start + align_down(h(i, j) mod (window_size - span + 1))``.
    """

    rows: int
    cols: int
    tile_rows: int
    tile_cols: int
    alignment: int
    window_start: int
    window_size: int
    a_row: int
    a_col: int
    b: int
    c_row: int
    c_col: int
    d: int

    def __post_init__(self):
        for name in ("rows", "cols", "tile_rows", "tile_cols", "alignment", "window_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TileHash.{name} must be >= 1, got {getattr(self, name)}")
        if self.span > self.window_size:
            raise ValueError(
                f"hash tile {self.tile_rows}x{self.tile_cols} ({self.span} slots) does not fit "
                f"in a memory window of {self.window_size} slots"
            )
        if self.window_start % self.alignment:
            raise ValueError(f"window_start {self.window_start} is not a multiple of alignment {self.alignment}")
        if max(self.rows, self.cols) >= PRIME:
            raise ValueError(f"weight view {self.rows}x{self.cols} too large: each side must be < {PRIME}")

    @property
    def span(self) -> int:
        return self.tile_rows * self.tile_cols

    @property
    def offset_range(self) -> int:
        """Number of start positions a tile may take before alignment."""
        return self.window_size - self.span + 1

    @property
    def grid(self) -> tuple[int, int]:
        return (-(-self.rows // self.tile_rows), -(-self.cols // self.tile_cols))

    def to_dict(self) -> dict:
        return asdict(self)

    def to_list(self) -> list[int]:
        """The fields in declaration order: how a mapping crosses a custom op's boundary.
        (Not ``dataclasses.astuple``: it deep-copies, which torch 2.11's dynamo cannot trace.)"""
        return [int(getattr(self, f.name)) for f in fields(self)]

    # -- the formulas, vectorized over index tensors ---------------------------------
    def tile_offset(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Start slot of hash tile (i, j); i and j are int64 tensors (broadcast)."""
        h = (self.a_row * i % PRIME + self.a_col * j % PRIME + self.b) % PRIME
        return self.window_start + (h % self.offset_range) // self.alignment * self.alignment

    def sign(self, k: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """+1/-1 (int64) of element (k, n) of the B view."""
        g = (self.c_row * k % PRIME + self.c_col * n % PRIME + self.d) % PRIME
        return 1 - 2 * ((g >> SIGN_BIT) & 1)

    def index(self, k: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """Memory slot of element (k, n) of the B view."""
        off = self.tile_offset(k // self.tile_rows, n // self.tile_cols)
        return off + (k % self.tile_rows) * self.tile_cols + n % self.tile_cols

    def index_and_sign(self, k: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.index(k, n), self.sign(k, n)

    def full_index(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(index int64, sign int8) for the whole B view, each (rows, cols).

        The same values as ``index_and_sign`` on the full grid. On the CPU the result
        is kept in a bounded cache (`INDEX_CACHE`), since the reference path asks for
        it at every forward and backward; treat the returned tensors as read-only.
        """
        if torch.device(device or "cpu").type == "cpu":
            return INDEX_CACHE.get(self)
        return self.compute_full_index(device)

    def compute_full_index(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """`full_index` without the cache, with the per-row and per-column terms
        separated so each element costs a few ops."""
        k = torch.arange(self.rows, device=device, dtype=torch.int64)
        n = torch.arange(self.cols, device=device, dtype=torch.int64)
        ti = torch.arange(self.grid[0], device=device, dtype=torch.int64)[:, None]
        tj = torch.arange(self.grid[1], device=device, dtype=torch.int64)[None, :]
        offsets = self.tile_offset(ti, tj)  # one per tile
        index = offsets[k // self.tile_rows][:, n // self.tile_cols]
        index += ((k % self.tile_rows) * self.tile_cols)[:, None] + (n % self.tile_cols)[None, :]
        g = (self.c_row * k % PRIME)[:, None] + (self.c_col * n % PRIME + self.d)[None, :]
        sign = (1 - 2 * ((g % PRIME >> SIGN_BIT) & 1)).to(torch.int8)
        return index, sign


class IndexCache:
    """Least-recently-used (index, sign) tensors of CPU mappings, bounded in bytes.

    The mapping is a pure function of the frozen ``TileHash``, so a cached entry is
    exactly what `TileHash.compute_full_index` would return. Each weight element
    costs 9 bytes here (int64 slot, int8 sign): the budget keeps a large model on the
    reference path from holding more than ``max_bytes`` of indices.
    ROASTFX_INDEX_CACHE_MB sets the budget (default 256; 0 turns caching off).
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"index cache budget must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[TileHash, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def get(self, mapping: TileHash) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self._entries.get(mapping)
        if entry is not None:
            self._entries.move_to_end(mapping)
            return entry
        entry = mapping.compute_full_index()
        size = sum(t.numel() * t.element_size() for t in entry)
        if size <= self.max_bytes:
            while self.bytes + size > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self.bytes -= sum(t.numel() * t.element_size() for t in old)
            self._entries[mapping] = entry
            self.bytes += size
        return entry

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


def _cache_budget() -> int:
    value = os.environ.get("ROASTFX_INDEX_CACHE_MB", "256")
    try:
        megabytes = float(value)
    except ValueError:
        raise ValueError(f"ROASTFX_INDEX_CACHE_MB={value!r} is not a number of megabytes (0 turns the cache off)")
    return int(megabytes * 2**20)


INDEX_CACHE = IndexCache(_cache_budget())
