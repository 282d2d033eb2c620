"""The ROAST mapping inside Triton kernels, and what every kernel file shares.

A kernel evaluates the mapping in one of two places, both the arithmetic of
`hashing.TileHash.index` and `TileHash.sign` (docs/mapping.md), so it reads the same
slots whatever its block sizes and however the hash tiles straddle its blocks:
`roast_index_and_sign` hashes each element on its own; `view_block_slots` serves a GEMM's
B blocks, computing each hash tile's start once per column where the block holds whole
tiles along the reduction (or lies inside one), with `view_free_terms` and
`view_red_terms` hoisted out of the main loop. Signs are taken in int32 without overflow
(`_sign_mask`) and applied as a flip of the float's sign bit.
"""
from __future__ import annotations

import inspect
import os

import triton
import triton.language as tl

from .hashing import PRIME, SIGN_BIT, TileHash


_P = tl.constexpr(2147483647)
MAX_SPLIT = 4  # the most whole hash tiles along the reduction a block may hold and still compute their starts once
_SIGN_MASK = tl.constexpr(-2147483648)  # 0x80000000 as int32: the fp32 sign bit


@triton.jit
def _mod_p(x):
    """x mod P for int64 0 <= x < 2**62, without a division: 2**31 = 1 (mod P)."""
    x = (x & _P) + (x >> 31)  # < 2**32
    x = (x & _P) + (x >> 31)  # <= P + 1
    return tl.where(x >= _P, x - _P, x)


@triton.jit
def _mulmod_p(a, x):
    """a * x mod P (int64) for integers 0 <= a, x < 2**31."""
    return _mod_p(tl.cast(a, tl.int64) * tl.cast(x, tl.int64))


@triton.jit
def _addmod_p(x, y):
    """x + y mod P for 0 <= x, y < P, in int64."""
    s = tl.cast(x, tl.int64) + tl.cast(y, tl.int64)
    return tl.where(s >= _P, s - _P, s)


@triton.jit
def offset_magic(offset_range):
    """The constants that reduce mod ``offset_range`` (d, 1 <= d < 2**31) without a division (`_tile_start`),
    packed in an int64: m = ceil(2**(31 + l) / d) < 2**32 in the low 32 bits and l - 1 above, l = ceil(log2 d)
    (Granlund and Montgomery, "Division by invariant integers using multiplication", 1994: for every
    0 <= h < 2**31, h // d = (h * m) >> (31 + l), i.e. umulhi(h, m) >> (l - 1)); 0 for d = 1 (every h mod 1 is
    0). Computed once per program: l from the exponent of d - 1 as a float64, which holds it exactly."""
    d = offset_range.to(tl.int64)
    bits = (d - 1).to(tl.float64).to(tl.int64, bitcast=True)
    l = tl.maximum(((bits >> 52) & 2047) - 1022, 1)  # floor(log2(d - 1)) + 1 for d >= 2
    m = ((tl.full((), 1, tl.int64) << (31 + l)) + d - 1) // d
    return tl.where(d > 1, m | ((l - 1) << 32), 0)


@triton.jit
def _mod(h, offset_range, omagic):
    """h mod offset_range for int32 0 <= h < 2**31: ``h % offset_range``, or with `offset_magic` ``omagic``
    (not None) a high multiply, a shift and a multiply-add instead of a 32-bit division."""
    if omagic is None:
        r = h % offset_range
    else:
        # the high word of a 64-bit product (not tl.umulhi: Triton's analysis then keeps the constancy of h along
        # a tile's columns, which vectorizes the loads of the slots)
        q = (h.to(tl.int64) * (omagic & 0xFFFFFFFF)) >> (32 + (omagic >> 32))
        r = tl.where(omagic == 0, 0, h - q.to(tl.int32) * offset_range)
    return r  # one return: the compiler visits the statements after a constexpr if's early return


@triton.jit
def _tile_start(h, alignment, window_start, offset_range, omagic=None):
    """The first slot of a hash tile whose hash is h (0 <= h < P), int32: window_start + align_down(h mod
    offset_range). h, offset_range and the alignment are below 2**31: 32-bit arithmetic (`_mod`)."""
    hm = _mod(h.to(tl.int32), offset_range, omagic)
    return window_start + hm // alignment * alignment


@triton.jit
def _sign_mask(u, v_minus_p):
    """The fp32 sign bit (int32 0 or 0x80000000) of the element whose sign-hash terms are u and v, given as u
    and v - P (int32; 0 <= u, v < P): bit 16 of (u + v) mod P. s = u + v - P lies in [-P, P), so it does not
    overflow; (u + v) mod P is s when s >= 0, else s + P = s - 1 + 2**31, whose bits below 31 are s - 1's."""
    s = u + v_minus_p
    g = s + (s >> 31)  # arithmetic shift: -1 where s < 0
    return (g << 15) & _SIGN_MASK  # bit 16 -> bit 31


@triton.jit
def roast_index_and_sign(
    k, n,
    tile_rows, tile_cols, alignment, window_start, offset_range, a_row, a_col, b, c_row, c_col, d, omagic=None,
):
    """(memory slot as int64, +1/-1) of element (k, n) of a site's B view, every element hashed on its own.

    k and n are non-negative integer tensors below 2**31 that broadcast against each other. The per-row
    and per-column products are taken on k's and n's own shapes; only sums, one 32-bit remainder and the
    sign bit are per element. (`view_block_slots` is the fast form for GEMM blocks.) ``omagic``: the
    `offset_magic` of offset_range, computed once per program (None: a division per element).
    """
    k = k.to(tl.int32)
    n = n.to(tl.int32)
    h = _addmod_p(_mulmod_p(a_row, k // tile_rows), _addmod_p(_mulmod_p(a_col, n // tile_cols), b))
    start = _tile_start(h, alignment, window_start, offset_range, omagic)
    index = (start + (k % tile_rows) * tile_cols + n % tile_cols).to(tl.int64)
    u = _mulmod_p(c_row, k).to(tl.int32)
    v = (_addmod_p(_mulmod_p(c_col, n), d) - _P).to(tl.int32)
    sign = 1 - 2 * ((_sign_mask(u, v) >> 31) & 1)
    return index, sign


@triton.jit
def element_block(
    K, N, tile_rows, tile_cols, alignment, window_start, offset_range, a_row, a_col, b, c_row, c_col, d,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (program_id(0), program_id(1))'s (BLOCK_K, BLOCK_N) block of a (K, N) view, every element
    hashed on its own: (row offsets, column offsets, row mask, column mask, memory slots (int64), signs)."""
    offs_k = (tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    offs_n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    index, sign = roast_index_and_sign(
        offs_k[:, None], offs_n[None, :], tile_rows, tile_cols, alignment, window_start,
        offset_range, a_row, a_col, b, c_row, c_col, d, offset_magic(offset_range))
    return offs_k, offs_n, offs_k < K, offs_n < N, index, sign


@triton.jit
def signed(w, neg):
    """fp32 ``w`` with its sign flipped where ``neg`` (a `_sign_mask`) is set: one xor per element."""
    return (w.to(tl.int32, bitcast=True) ^ neg).to(tl.float32, bitcast=True)


@triton.jit
def view_free_terms(offs_f, VIEW_IS_B: tl.constexpr, tile_rows, tile_cols, a_row, a_col, b, c_row, c_col, d):
    """The parts of the mapping that a GEMM's B blocks keep along the reduction, per index of the free axis
    (B's columns: the view's columns when VIEW_IS_B, else its rows): the tile-hash term with b added, minus P
    (int32), the element's offset inside its tile along that axis (int32), and the sign-hash term with d
    added, minus P (int32). Computed once per program, outside the main loop. Both terms are kept minus P,
    in [-P, 0), so that adding a term in [0, P) cannot overflow int32."""
    f = offs_f.to(tl.int32)
    if VIEW_IS_B:
        hterm = _addmod_p(_mulmod_p(a_col, f // tile_cols), b)
        intile = f % tile_cols
        sterm = _addmod_p(_mulmod_p(c_col, f), d)
    else:
        hterm = _addmod_p(_mulmod_p(a_row, f // tile_rows), b)
        intile = (f % tile_rows) * tile_cols
        sterm = _addmod_p(_mulmod_p(c_row, f), d)
    return (hterm - _P).to(tl.int32), intile, (sterm - _P).to(tl.int32)


@triton.jit
def view_red_terms(offs_t, VIEW_IS_B: tl.constexpr, c_row, c_col):
    """c * t mod P (int32) for the block-relative reduction offsets t = offs_t, c the sign constant of the
    reduction axis (the view's rows when VIEW_IS_B, else its columns): the loop-invariant part of the
    reduction's sign term."""
    if VIEW_IS_B:
        return _mulmod_p(c_row, offs_t).to(tl.int32)
    return _mulmod_p(c_col, offs_t).to(tl.int32)


@triton.jit
def _addmod32(x, y):
    """x + y mod P for int32 0 <= x, y < P, in int32: x + (y - P) lies in [-P, P)."""
    s = x + (y - _P)
    return tl.where(s < 0, s + _P, s)


@triton.jit
def reduction_bases(r, VIEW_IS_B: tl.constexpr, tile_rows, tile_cols, a_row, a_col, c_row, c_col):
    """(c_red * r mod P, a_red * (r // tile_r) mod P), int32: the parts of the sign's and of the tile hash's
    terms that a GEMM's B block starting at reduction row r adds (`view_block_slots`); c_red, a_red and tile_r
    are the reduction axis' (the view's rows when VIEW_IS_B, else its columns). A main loop computes them for
    its first block and, as steps, for r = BLOCK_R (a multiple of tile_r where it passes the tile hash's),
    then advances them by one `_addmod32` each per block (`advance_bases`): two integer additions instead of
    two 64-bit products mod P."""
    if VIEW_IS_B:
        return _mulmod_p(c_row, r).to(tl.int32), _mulmod_p(a_row, r // tile_rows).to(tl.int32)
    return _mulmod_p(c_col, r).to(tl.int32), _mulmod_p(a_col, r // tile_cols).to(tl.int32)


@triton.jit
def advance_bases(sbase, hbase, sstep, hstep):
    """`reduction_bases` of the next block: each base plus its step, mod P."""
    return _addmod32(sbase, sstep), _addmod32(hbase, hstep)


@triton.jit
def _red_tile_start(hterm, i, a_red, alignment, window_start, offset_range, hbase=None, omagic=None):
    """First slot of tile (i along the reduction, the free axis' tiles as in hterm: their hash terms minus P),
    int32 per free index: the hash (hterm + a_red * i) mod P taken in int32 as the sign's is. ``hbase``: a_red
    * i mod P already known (int32)."""
    if hbase is None:
        hbase = _mulmod_p(a_red, i).to(tl.int32)
    s = hterm + hbase  # in [-P, P)
    return _tile_start(tl.where(s < 0, s + _P, s), alignment, window_start, offset_range, omagic)


@triton.jit
def view_block_slots(
    r0, offs_t, offs_f, hterm, intile, sterm, ct,
    VIEW_IS_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_SPLIT: tl.constexpr,
    tile_rows, tile_cols, alignment, window_start, offset_range, a_row, a_col, b, c_row, c_col, d,
    sbase=None, hbase=None, omagic=None,
):
    """(memory slot, `_sign_mask`) of each element of a GEMM's (BLOCK_R, F) B block: rows r0 + offs_t of the
    reduction axis (offs_t = arange(BLOCK_R)), columns offs_f of the free axis, whose `view_free_terms` are
    (hterm, intile, sterm) and whose reduction sign terms are ct (`view_red_terms`). B[r, f] is the view's
    element (r, f) when VIEW_IS_B, else (f, r).

    ``BLOCK_SPLIT`` (`block_split`, from the host) says how the block meets the hash tiles along the
    reduction: n >= 1, it holds n whole tiles (r0 on a tile boundary); 0, it lies inside one tile; -1,
    tiles straddle it. In the first two cases each tile's start is computed once per free index and an
    element's slot is that start plus its offsets in the tile (a select between the starts where there
    are several): a few integer operations per element. With -1 every element is hashed on its own
    (`roast_index_and_sign`). Either way the slots and signs are those of docs/mapping.md.

    A main loop passes what it carries from block to block: ``sbase`` and ``hbase``, the `reduction_bases`
    of r0 (hbase only where BLOCK_SPLIT > 0), and ``omagic``, the `offset_magic` of offset_range. None:
    computed here (two products mod P) or a division per tile start.
    """
    if VIEW_IS_B:
        tile_r = tile_rows
        stride_r = tile_cols
        a_red = a_row
        c_red = c_row
    else:
        tile_r = tile_cols
        stride_r = 1
        a_red = a_col
        c_red = c_col
    # sign: (c_red * (r0 + t) + the free term) mod P, bit 16
    if sbase is None:
        sbase = _mulmod_p(c_red, r0).to(tl.int32)
    s = (sbase - _P) + ct  # in [-P, P)
    u = tl.where(s < 0, s + _P, s)
    neg = _sign_mask(u[:, None], sterm[None, :])
    if BLOCK_SPLIT > 0:
        # whole tiles along the reduction: tile i0 + t // tile_r, row t % tile_r of it
        i0 = r0 // tile_r
        start = _red_tile_start(hterm, i0, a_red, alignment, window_start, offset_range, hbase, omagic)
        if BLOCK_SPLIT == 1:
            index = (offs_t * stride_r)[:, None] + (start + intile)[None, :]
        else:
            starts = tl.broadcast_to(start[None, :], (BLOCK_R, start.shape[0]))
            sub = offs_t // tile_r
            for j in tl.static_range(1, BLOCK_SPLIT):
                if hbase is None:
                    start_j = _red_tile_start(hterm, i0 + j, a_red, alignment, window_start, offset_range,
                                              None, omagic)
                else:
                    start_j = _red_tile_start(hterm, i0 + j, a_red, alignment, window_start, offset_range,
                                              _addmod32(hbase, _mulmod_p(a_red, j).to(tl.int32)), omagic)
                starts = tl.where((sub == j)[:, None], start_j[None, :], starts)
            index = ((offs_t - sub * tile_r) * stride_r)[:, None] + (starts + intile[None, :])
    elif BLOCK_SPLIT == 0:
        # the block lies inside tile i0 along the reduction
        i0 = r0 // tile_r
        start = _red_tile_start(hterm, i0, a_red, alignment, window_start, offset_range, None, omagic)
        index = ((r0 - i0 * tile_r + offs_t) * stride_r)[:, None] + (start + intile)[None, :]
    else:
        # tiles straddle the block: every element hashed on its own
        if VIEW_IS_B:
            index, _ = roast_index_and_sign((r0 + offs_t)[:, None], offs_f[None, :], tile_rows, tile_cols,
                                            alignment, window_start, offset_range, a_row, a_col, b, c_row, c_col, d,
                                            omagic)
        else:
            index, _ = roast_index_and_sign(offs_f[None, :], (r0 + offs_t)[:, None], tile_rows, tile_cols,
                                            alignment, window_start, offset_range, a_row, a_col, b, c_row, c_col, d,
                                            omagic)
    return index, neg


def block_split(mapping: TileHash, view_is_b: bool, block_r: int, first_row_step: int = 0) -> int:
    """The BLOCK_SPLIT constexpr of a GEMM whose B blocks are ``block_r`` rows of the reduction, starting at
    multiples of ``block_r`` plus multiples of ``first_row_step`` (a group's first row: a grouped conv's dX;
    0: none): n >= 1 when every block holds n <= MAX_SPLIT whole hash tiles along the reduction, 0 when every
    block lies inside one tile, -1 otherwise (every element hashed on its own)."""
    extent = mapping.tile_rows if view_is_b else mapping.tile_cols
    if block_r % extent == 0 and block_r // extent <= MAX_SPLIT:
        return block_r // extent if first_row_step % extent == 0 else -1
    if extent % block_r == 0:
        return 0 if first_row_step % block_r == 0 else -1
    return -1


MAX_KERNEL_SLOT = 2**31 - 1  # the last slot the kernels can address: they take tile starts and slots in int32


def hash_args(mapping: TileHash) -> tuple[int, ...]:
    """The scalar kernel arguments that `roast_index_and_sign` takes after (k, n)."""
    assert PRIME == 2147483647 and SIGN_BIT == 16, "roast_index_and_sign hard-codes P and the sign bit"
    m = mapping
    if m.window_start + m.window_size - 1 > MAX_KERNEL_SLOT:
        raise ValueError(
            f"a window whose last memory slot is {m.window_start + m.window_size - 1} is beyond the Triton kernels' "
            f"32-bit slot arithmetic (slots up to {MAX_KERNEL_SLOT}); use a smaller memory, or the PyTorch path "
            "(ROASTFX_KERNELS=reference)")
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
