"""The ROAST mapping: where each element of a site's weight lives in the memory.

Everything here is the exact arithmetic documented in docs/mapping.md; the
Triton kernels evaluate the same formulas per block, so any block size reads
the same slots. All arithmetic is int64 with every intermediate below 2**62.
"""
from __future__ import annotations

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
        """(index int64, sign int8) for the whole B view, each (rows, cols): the same values as
        ``index_and_sign`` on the full grid, with the per-row and per-column terms separated so each
        element costs a few ops. For the oracle and one-off uses (projection, slot loads): the runtime path
        (codegen/runs.py) reads whole runs and keeps no per-element index."""
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
