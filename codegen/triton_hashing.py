"""The ROAST mapping inside Triton kernels, and what every kernel file shares.

`roast_index_and_sign` is the only place a kernel evaluates the mapping. It is the
arithmetic of `hashing.TileHash.index` and `TileHash.sign`, element by element, so a
kernel reads the same slots whatever its block sizes and however the hash tiles
straddle its blocks.
"""
from __future__ import annotations

import inspect
import os

import triton
import triton.language as tl

from .hashing import PRIME, SIGN_BIT, TileHash


_P = tl.constexpr(2147483647)


@triton.jit
def _mod_p(x):
    """x mod P for int64 0 <= x < 2**62, without a division: 2**31 = 1 (mod P)."""
    x = (x & _P) + (x >> 31)  # < 2**32
    x = (x & _P) + (x >> 31)  # <= P + 1
    return tl.where(x >= _P, x - _P, x)


@triton.jit
def roast_index_and_sign(
    k, n,
    tile_rows, tile_cols, alignment, window_start, offset_range,
    a_row, a_col, b, c_row, c_col, d,
):
    """(memory slot as int64, +1/-1) of element (k, n) of a site's B view.

    k and n are non-negative integer tensors below 2**31 that broadcast against each
    other. Coordinates are split into tile and in-tile parts in int32; every product
    of two numbers below 2**31 is taken in int64, so nothing overflows.
    """
    k = k.to(tl.int32)
    n = n.to(tl.int32)
    i = (k // tile_rows).to(tl.int64)
    j = (n // tile_cols).to(tl.int64)
    h = _mod_p(_mod_p(tl.cast(a_row, tl.int64) * i) + _mod_p(tl.cast(a_col, tl.int64) * j) + tl.cast(b, tl.int64))
    align = tl.cast(alignment, tl.int64)
    start = tl.cast(window_start, tl.int64) + (h % tl.cast(offset_range, tl.int64)) // align * align
    index = start + ((k % tile_rows) * tile_cols + n % tile_cols).to(tl.int64)
    g = _mod_p(_mod_p(tl.cast(c_row, tl.int64) * k.to(tl.int64)) + _mod_p(tl.cast(c_col, tl.int64) * n.to(tl.int64))
               + tl.cast(d, tl.int64))
    sign = 1 - 2 * ((g >> 16) & 1)
    return index, sign


def hash_args(mapping: TileHash) -> tuple[int, ...]:
    """The scalar kernel arguments that `roast_index_and_sign` takes after (k, n)."""
    assert PRIME == 2147483647 and SIGN_BIT == 16, "roast_index_and_sign hard-codes P and the sign bit"
    m = mapping
    return (
        m.tile_rows, m.tile_cols, m.alignment, m.window_start, m.offset_range,
        m.a_row, m.a_col, m.b, m.c_row, m.c_col, m.d,
    )


_dumped: set[str] = set()


def maybe_dump(kernel, launched) -> None:
    """With ROASTFX_DUMP_KERNELS=dir, write each compiled variant's IR and PTX (or, in the
    interpreter, the kernel's source) to dir once per process."""
    directory = os.environ.get("ROASTFX_DUMP_KERNELS")
    if not directory:
        return
    name = kernel.fn.__name__.lstrip("_")
    asm = getattr(launched, "asm", None) or {}
    key = f"{name}-{getattr(launched, 'hash', 'source')}"
    if key in _dumped:
        return
    _dumped.add(key)
    os.makedirs(directory, exist_ok=True)
    if not asm:
        with open(os.path.join(directory, f"{name}.py"), "w") as f:
            f.write(inspect.getsource(kernel.fn))
        return
    for ext, text in asm.items():
        if isinstance(text, str):
            with open(os.path.join(directory, f"{key}.{ext}"), "w") as f:
                f.write(text)
