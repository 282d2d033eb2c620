"""The ROAST mapping inside Triton kernels.

`roast_index_and_sign` is the only place a kernel evaluates the mapping. It is the
arithmetic of `hashing.TileHash.index` and `TileHash.sign`, element by element, so a
kernel reads the same slots whatever its block sizes and however the hash tiles
straddle its blocks.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .hashing import PRIME, SIGN_BIT, TileHash


@triton.jit
def roast_index_and_sign(
    k, n,
    tile_rows, tile_cols, alignment, window_start, offset_range,
    a_row, a_col, b, c_row, c_col, d,
):
    """(memory slot, +1/-1 as int64) of element (k, n) of a site's B view.

    k and n are integer tensors that broadcast against each other. Every product
    is of two numbers below 2**31, so int64 never overflows.
    """
    P: tl.constexpr = 2147483647
    k = k.to(tl.int64)
    n = n.to(tl.int64)
    i = k // tl.cast(tile_rows, tl.int64)
    j = n // tl.cast(tile_cols, tl.int64)
    h = (tl.cast(a_row, tl.int64) * i % P + tl.cast(a_col, tl.int64) * j % P + tl.cast(b, tl.int64)) % P
    align = tl.cast(alignment, tl.int64)
    start = tl.cast(window_start, tl.int64) + (h % tl.cast(offset_range, tl.int64)) // align * align
    index = start + (k % tl.cast(tile_rows, tl.int64)) * tl.cast(tile_cols, tl.int64) + n % tl.cast(tile_cols, tl.int64)
    g = (tl.cast(c_row, tl.int64) * k % P + tl.cast(c_col, tl.int64) * n % P + tl.cast(d, tl.int64)) % P
    sign = 1 - 2 * ((g >> 16) & 1)
    return index, sign


def mapping_args(mapping: TileHash) -> tuple[int, ...]:
    """The scalar kernel arguments that `roast_index_and_sign` takes after (k, n)."""
    assert PRIME == 2147483647 and SIGN_BIT == 16, "roast_index_and_sign hard-codes P and the sign bit"
    m = mapping
    return (
        m.tile_rows, m.tile_cols, m.alignment, m.window_start, m.offset_range,
        m.a_row, m.a_col, m.b, m.c_row, m.c_col, m.d,
    )
