"""roast custom ops (torch.library): what a compiled graph holds instead of dense weights.

Each op takes the memory plus the site's mapping as a flat int list
(``TileHash`` fields in declaration order) and its scale. They work in eager,
under dynamo/AOTAutograd and with ``torch.library.opcheck``. ``roast_linear``
runs the fused Triton kernels (codegen/kernels.py) on CUDA tensors and the
reference path elsewhere; ROASTFX_KERNELS=triton|reference overrides that
(triton on CPU needs TRITON_INTERPRET=1 set before roastfx is imported).
"""
from __future__ import annotations

import os
from dataclasses import replace

import torch

from .grad_norm import normalize, rms_from_sumsq, site_grad_rms
from .hashing import PRIME, TileHash
from . import runs
from .runs import gather_rows, gather_view, scatter_rows_grad, scatter_view_grad

__all__ = ["materialize", "slice_sumsq", "weight_norm_scale", "weight_norm_inner_scale", "roast_linear", "roast_grouped_mm", "roast_picked_mm", "roast_embedding", "roast_conv", "roast_conv_row_scaled",
           "embedding_bag_of_rows", "mapping_args", "use_triton"]


def mapping_args(mapping: TileHash) -> list[int]:
    return mapping.to_list()


def _mapping(args) -> TileHash:
    return TileHash(*[int(a) for a in args])


def column_windows(mapping: list[int], parts: int) -> list[list[int]] | None:
    """The mappings of the view's columns cut into ``parts`` equal windows (a grouped conv's groups,
    attention's q/k/v), or None when the windows do not start on hash-tile boundaries.

    Tile (i, j0 + j') of a window at column n0 = j0 * tile_cols hashes like tile (i, j') of a mapping
    whose constants absorb the shift: b + a_col * j0 and d + c_col * n0 (mod P). Same slots, same signs.
    """
    return _windows(mapping, parts, rows=False)


def row_windows(mapping: list[int], parts: int) -> list[list[int]] | None:
    """``column_windows`` along the view's rows (a grouped transposed conv's groups, whose (in, out/groups *
    kernel) view is cut by input channels): b + a_row * i0 and d + c_row * r0."""
    return _windows(mapping, parts, rows=True)


def _windows(mapping: list[int], parts: int, rows: bool) -> list[list[int]] | None:
    m = _mapping(mapping)
    if parts == 1:
        return [list(mapping)]
    size, tile = (m.rows, m.tile_rows) if rows else (m.cols, m.tile_cols)
    a, c = (m.a_row, m.c_row) if rows else (m.a_col, m.c_col)
    width = size // parts
    if width * parts != size or width % tile:
        return None
    return [mapping_args(replace(m, **{"rows" if rows else "cols": width}, b=(m.b + a * (start // tile)) % PRIME,
                                 d=(m.d + c * start) % PRIME))
            for start in range(0, size, width)]


@torch.library.custom_op("roastfx::materialize", mutates_args=())
def materialize(memory: torch.Tensor, mapping: list[int], scale: float) -> torch.Tensor:
    """The (rows, cols) B view of one site, computed from the memory."""
    return gather_view(memory, _mapping(mapping), scale)


@materialize.register_fake
def _(memory, mapping, scale):
    m = _mapping(mapping)
    return memory.new_empty((m.rows, m.cols))


def _materialize_setup(ctx, inputs, output):
    memory, ctx.mapping, ctx.scale = inputs
    ctx.memory_size, ctx.memory_dtype = memory.shape[0], memory.dtype


def _materialize_backward(ctx, grad):
    grad_memory = _memory_grad_op(grad, ctx.mapping, ctx.scale, ctx.memory_size).to(ctx.memory_dtype)
    return grad_memory, None, None


@torch.library.custom_op("roastfx::memory_grad", mutates_args=())
def _memory_grad_op(grad_view: torch.Tensor, mapping: list[int], scale: float, size: int) -> torch.Tensor:
    """d(loss)/d(memory) of a memory of ``size`` slots, given d(loss)/d(B view)."""
    return scatter_view_grad(grad_view, _mapping(mapping), scale, size)


@_memory_grad_op.register_fake
def _(grad_view, mapping, scale, size):
    return grad_view.new_empty(size)


materialize.register_autograd(_materialize_backward, setup_context=_materialize_setup)


@torch.library.custom_op("roastfx::slice_sumsq", mutates_args=())
def slice_sumsq(memory: torch.Tensor, mapping: list[int], scale: float, per_column: bool) -> torch.Tensor:
    """Sum of squares of each column (``per_column``) or row of a site's view, read from the memory (float32,
    float64 for a float64 memory): weight norm's per-slice norms, squared, without the dense view on a GPU
    (codegen/triton_norms.py)."""
    if use_triton(memory) and memory.dtype != torch.float64:
        from . import triton_norms

        return triton_norms.slice_sumsq(memory, _mapping(mapping), scale, per_column)
    return runs.slice_sumsq(memory, _mapping(mapping), scale, per_column)


@slice_sumsq.register_fake
def _(memory, mapping, scale, per_column):
    m = _mapping(mapping)
    return memory.new_empty(m.cols if per_column else m.rows, dtype=torch.promote_types(memory.dtype, torch.float32))


@torch.library.custom_op("roastfx::slice_sumsq_grad", mutates_args=())
def _slice_sumsq_grad(grad: torch.Tensor, memory: torch.Tensor, mapping: list[int], scale: float,
                      per_column: bool) -> torch.Tensor:
    if use_triton(memory) and memory.dtype != torch.float64:
        from . import triton_norms

        return triton_norms.slice_sumsq_grad(grad, memory, _mapping(mapping), scale, per_column).to(memory.dtype)
    return runs.slice_sumsq_grad(grad, memory, _mapping(mapping), scale, per_column).to(memory.dtype)


@_slice_sumsq_grad.register_fake
def _(grad, memory, mapping, scale, per_column):
    return torch.empty_like(memory)


def _slice_sumsq_setup(ctx, inputs, output):
    memory, ctx.mapping, ctx.scale, ctx.per_column = inputs
    ctx.save_for_backward(memory)


def _slice_sumsq_backward(ctx, grad):
    (memory,) = ctx.saved_tensors
    return _slice_sumsq_grad(grad, memory, ctx.mapping, ctx.scale, ctx.per_column), None, None, None


slice_sumsq.register_autograd(_slice_sumsq_backward, setup_context=_slice_sumsq_setup)


def weight_norm_scale(g: torch.Tensor, sumsq: torch.Tensor, whole: bool) -> torch.Tensor:
    """``g / norm`` of ``torch._weight_norm(v, g, dim)`` given the squared norms of v's slices (``whole``:
    dim=-1, one norm over all of v, from the sums of its slices): per slice, flat, in g's dtype."""
    norm = sumsq.sum().sqrt() if whole else sumsq.sqrt()
    return (g.reshape(-1).to(norm.dtype) / norm).to(g.dtype)


def weight_norm_inner_scale(g: torch.Tensor, inner_sumsq: torch.Tensor, weight_shape: list[int],
                            dim: int) -> torch.Tensor:
    """``g / norm`` of ``torch._weight_norm(v, g, dim)`` for a weight v of ``weight_shape`` and
    1 <= dim < len(weight_shape), given the squared norms of v's slices ``v[:, j1, j2, ...]`` (one per index of
    v's dims after the first, in order, each summed over dim 0: the sums over the lines of the site's view
    that do not run along dim 0): one factor per index of ``dim``, flat, in g's dtype."""
    inner = list(weight_shape[1:])
    others = [i for i in range(len(inner)) if i != dim - 1]
    sums = inner_sumsq.reshape(inner)
    if others:  # (sum over an empty list of dims would sum over all of them)
        sums = sums.sum(others)
    return (g.reshape(-1).to(sums.dtype) / sums.sqrt()).to(g.dtype)


class EagerMaterialize(torch.autograd.Function):
    """``roastfx::materialize``'s forward and backward without the custom-op dispatch, for eager reads (a
    module's weight outside torch.compile): the same functions, about 60 us less per read and backward on a
    CPU. Compiled graphs hold the op. The forward takes ``ctx`` itself: a separate setup_context would make
    every apply bind its arguments through inspect.signature (20-50 us), and no torch.func transform calls
    this Function (they read through runs.gather_view_differentiable)."""

    @staticmethod
    def forward(ctx, memory: torch.Tensor, mapping: TileHash, scale: float) -> torch.Tensor:
        ctx.mapping, ctx.scale = mapping, scale
        ctx.memory_size, ctx.memory_dtype = memory.shape[0], memory.dtype
        return gather_view(memory, mapping, scale)

    @staticmethod
    def backward(ctx, grad):
        grad_memory = scatter_view_grad(grad, ctx.mapping, ctx.scale, ctx.memory_size).to(ctx.memory_dtype)
        return grad_memory, None, None


KERNEL_MODES = ("auto", "triton", "reference")


def use_triton(t: torch.Tensor) -> bool:
    mode = os.environ.get("ROASTFX_KERNELS", "auto")
    if mode not in KERNEL_MODES:
        raise ValueError(f"ROASTFX_KERNELS={mode!r} is not valid; accepted: {', '.join(KERNEL_MODES)}")
    if mode == "auto":
        return t.is_cuda
    return mode == "triton"


def _kernels():
    from . import kernels  # registers the roastfx::linear* ops; imports triton

    return kernels


ACTIVATIONS = ("none", "relu", "gelu_tanh", "silu")


def activation(z: torch.Tensor, name: str) -> torch.Tensor:
    if name == "relu":
        return torch.relu(z)
    if name == "gelu_tanh":
        return torch.nn.functional.gelu(z, approximate="tanh")
    if name == "silu":
        return torch.nn.functional.silu(z)
    return z


def activation_grad(grad: torch.Tensor, pre: torch.Tensor, name: str) -> torch.Tensor:
    """d activation(pre) / d pre, times grad, by explicit formulas, in float32 at least (as the Triton
    kernels and torch's own activation backwards compute; in bf16 the derivative was off by up to 0.013)."""
    if name == "relu":
        return grad * (pre > 0).to(grad.dtype)
    wide = torch.promote_types(grad.dtype, torch.float32)
    g, x = grad.to(wide), pre.to(wide)
    if name == "silu":
        s = torch.sigmoid(x)
        return (g * (s * (1 + x * (1 - s)))).to(grad.dtype)
    if name == "gelu_tanh":
        c = 0.7978845608028654  # sqrt(2 / pi)
        t = torch.tanh(c * (x + 0.044715 * x**3))
        return (g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x))).to(grad.dtype)
    return grad


@torch.library.custom_op("roastfx::roast_linear", mutates_args=())
def roast_linear(x: torch.Tensor, memory: torch.Tensor, mapping: list[int], scale: float,
                 bias: torch.Tensor | None = None, act: str = "none", transpose_view: bool = False,
                 grad_norm: bool = False) -> torch.Tensor:
    """``act(x @ V + bias)`` where V is the site's B view read from the memory (the epilogue fused);
    ``x @ V^T`` instead when transpose_view (a weight read the other way round, e.g. a tied embedding).
    grad_norm: the memory gets this op's view gradient divided by its RMS (grad_norm.py)."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act={act!r} is not valid; accepted: {', '.join(ACTIVATIONS)}")
    if use_triton(x):
        _kernels()
        return torch.ops.roastfx.linear(x, memory, bias, None, mapping, scale, not transpose_view, act, False)[0]
    view = gather_view(memory, _mapping(mapping), scale).to(x.dtype)
    out = x @ (view.t() if transpose_view else view)
    return activation(out + bias if bias is not None else out, act)


@roast_linear.register_fake
def _(x, memory, mapping, scale, bias=None, act="none", transpose_view=False, grad_norm=False):
    return x.new_empty((*x.shape[:-1], mapping[0] if transpose_view else mapping[1]))


def _roast_linear_setup(ctx, inputs, output):
    x, memory, mapping, scale, bias, act, transpose_view, grad_norm = inputs
    ctx.save_for_backward(x, memory, bias)
    ctx.mapping, ctx.scale, ctx.has_bias, ctx.act = mapping, scale, bias is not None, act
    ctx.transpose_view, ctx.grad_norm = transpose_view, grad_norm


def _roast_linear_backward(ctx, grad):
    x, memory, bias = ctx.saved_tensors
    flip = ctx.transpose_view
    if ctx.act != "none":  # recompute the pre-activation rather than keep it alive since the forward
        pre = roast_linear(x, memory, ctx.mapping, ctx.scale, bias, "none", flip)
        grad = activation_grad(grad, pre, ctx.act)
    grad2d = grad.reshape(-1, grad.shape[-1])
    x2d = x.reshape(-1, x.shape[-1])
    accumulate = torch.float32 if grad.element_size() < 4 else grad.dtype
    grad_bias = grad2d.sum(0, dtype=accumulate).to(grad.dtype) if ctx.has_bias else None
    if use_triton(x):
        _kernels()
        grad2d = grad2d.to(x.dtype).contiguous()
        grad_x = torch.ops.roastfx.linear_grad_input(grad2d, memory, ctx.mapping, ctx.scale, not flip).reshape(x.shape)
        grad_memory = linear_grad_memory(x2d, grad2d, memory, ctx.mapping, ctx.scale, not flip, ctx.grad_norm)
        return grad_x, grad_memory, None, None, grad_bias, None, None, None
    view = materialize(memory, ctx.mapping, ctx.scale).to(grad.dtype)
    grad_x = grad @ (view if flip else view.t())
    grad_view = grad2d.t() @ x2d if flip else x2d.t() @ grad2d
    if ctx.grad_norm:
        grad_view = normalize(grad_view, site_grad_rms(grad_view))
    grad_memory = _memory_grad_op(grad_view, ctx.mapping, ctx.scale, memory.numel()).to(memory.dtype)
    return grad_x, grad_memory, None, None, grad_bias, None, None, None


def linear_grad_memory(x2d: torch.Tensor, grad2d: torch.Tensor, memory: torch.Tensor, mapping: list[int],
                       scale: float, view_is_b: bool, grad_norm: bool) -> torch.Tensor:
    """Triton path: dMemory for dV = x^T dZ (dZ^T x unless view_is_b), divided by rms(dV) when grad_norm
    (the kernel's sum of squares over the whole view)."""
    if not grad_norm:
        return torch.ops.roastfx.linear_grad_memory(x2d, grad2d, memory, mapping, scale, view_is_b)
    grad_memory, sumsq = torch.ops.roastfx.linear_grad_memory_sumsq(x2d, grad2d, memory, mapping, scale, view_is_b)
    return normalize(grad_memory, rms_from_sumsq(sumsq, mapping[0] * mapping[1]))


roast_linear.register_autograd(_roast_linear_backward, setup_context=_roast_linear_setup)


def _check_offs(offs: torch.Tensor, groups: int) -> None:
    if offs.dim() != 1 or offs.numel() != groups or offs.dtype.is_floating_point or offs.is_complex():
        raise ValueError(f"roast_grouped_mm: offs must be a 1-D integer tensor of {groups} cumulative group ends, "
                         f"got {offs.dtype} of shape {tuple(offs.shape)}")


def _group_ranges(offs: torch.Tensor, rows: int, groups: int) -> list[tuple[int, int, int]]:
    """(group, first row, end row) of each group with rows: ``offs`` holds the groups' cumulative ends (torch's
    grouped_mm convention); rows past its last entry belong to no group."""
    _check_offs(offs, groups)
    ranges, start = [], 0
    for g, end in enumerate(offs.tolist()):  # one device sync, as torch's and transformers' fallbacks
        end = min(int(end), rows)
        if end < start:
            raise ValueError(f"roast_grouped_mm: offs must not decrease, got {offs.tolist()}")
        if end > start:
            ranges.append((g, start, end))
        start = end
    return ranges


def _group_columns(mapping: list[int], groups: int, g: int) -> slice:
    width = mapping[1] // groups
    return slice(g * width, (g + 1) * width)


@torch.library.custom_op("roastfx::roast_grouped_mm", mutates_args=())
def roast_grouped_mm(x: torch.Tensor, memory: torch.Tensor, offs: torch.Tensor, mapping: list[int], scale: float,
                     groups: int, transpose_view: bool = False, grad_norm: bool = False) -> torch.Tensor:
    """A grouped GEMM over a grouped site (a mixture of experts' stacked weights): the rows of ``x`` that
    ``offs`` gives group g (sorted by group) times B_g, the view's g-th block of columns (B_g^T when
    transpose_view), as ``torch._grouped_mm(x, W, offs=offs)``; rows past ``offs[-1]`` come out zero.

    With the kernels every group runs in one launch of the fused roast GEMM, each on its own column window of
    the view (``column_windows``: the group's columns are whole hash tiles), so no expert's weight is built and
    ``offs`` stays on the device (the kernels take a decreasing ``offs`` as empty groups; the other paths
    refuse it). Where tiles straddle two groups, and on the reference path, the view is gathered once and
    sliced."""
    m = _mapping(mapping)
    if m.cols % groups:
        raise ValueError(f"roast_grouped_mm: the view's {m.cols} columns do not split into {groups} groups")
    width = m.cols // groups
    if use_triton(x) and width % m.tile_cols == 0:
        _check_offs(offs, groups)
        from .triton_grouped import roast_grouped_matmul

        return roast_grouped_matmul(x, memory, offs, m, groups, scale, not transpose_view)
    out = x.new_zeros((x.shape[0], m.rows if transpose_view else width))
    ranges = _group_ranges(offs, x.shape[0], groups)
    view = gather_view(memory, m, scale).to(x.dtype)
    for g, a, b in ranges:
        block = view[:, _group_columns(mapping, groups, g)]
        out[a:b] = x[a:b] @ (block.t() if transpose_view else block)
    return out


@roast_grouped_mm.register_fake
def _(x, memory, offs, mapping, scale, groups, transpose_view=False, grad_norm=False):
    return x.new_empty((x.shape[0], mapping[0] if transpose_view else mapping[1] // groups))


def _grouped_setup(ctx, inputs, output):
    x, memory, offs, mapping, scale, groups, transpose_view, grad_norm = inputs
    ctx.save_for_backward(x, memory, offs)
    ctx.mapping, ctx.scale, ctx.groups, ctx.transpose_view, ctx.grad_norm = mapping, scale, groups, transpose_view, \
        grad_norm


def _grouped_backward(ctx, grad):
    x, memory, offs = ctx.saved_tensors
    grad_x, grad_memory = _grouped_mm_grad(grad, x, memory, offs, ctx.mapping, ctx.scale, ctx.groups,
                                           ctx.transpose_view, ctx.grad_norm)
    return grad_x, grad_memory, None, None, None, None, None, None


# an op of its own: the backward reads offs on the host (reference path, deterministic mode), which AOTAutograd
# cannot trace through
@torch.library.custom_op("roastfx::roast_grouped_mm_grad", mutates_args=())
def _grouped_mm_grad(grad: torch.Tensor, x: torch.Tensor, memory: torch.Tensor, offs: torch.Tensor,
                     mapping: list[int], scale: float, groups: int, flip: bool,
                     grad_norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dX, dMemory) of ``roast_grouped_mm``."""
    grad = grad.to(x.dtype)
    m = _mapping(mapping)
    if use_triton(x) and (m.cols // groups) % m.tile_cols == 0:
        from .triton_grouped import roast_grouped_grad_memory, roast_grouped_matmul
        from .triton_matmul import roast_grad_memory_sumsq

        grad = grad.contiguous()
        grad_x = roast_grouped_matmul(grad, memory, offs, m, groups, scale, flip)
        a, c = (grad, x) if flip else (x, grad)  # dV_g = a_g^T c_g
        if not torch.are_deterministic_algorithms_enabled():  # atomics: every group in one launch
            grad_memory, sumsq = roast_grouped_grad_memory(a, c, offs, memory.numel(), m, groups, scale, grad_norm)
        else:  # one launch per group, each reducing its memory gradient without atomics
            windows = column_windows(mapping, groups)
            grad_memory = torch.zeros(memory.numel(), device=memory.device, dtype=torch.float32)
            sumsq = grad_memory.new_zeros((), dtype=torch.float64)
            for g, lo, hi in _group_ranges(offs, x.shape[0], groups):
                part, ss = roast_grad_memory_sumsq(a[lo:hi], c[lo:hi], memory.numel(), _mapping(windows[g]), scale,
                                                   deterministic=True)
                grad_memory += part
                sumsq += ss
        if grad_norm:
            grad_memory = normalize(grad_memory, rms_from_sumsq(sumsq, mapping[0] * mapping[1]))
        return grad_x, grad_memory.to(memory.dtype).reshape(memory.shape)
    grad_x = torch.zeros_like(x)
    ranges = _group_ranges(offs, x.shape[0], groups)
    view = gather_view(memory, _mapping(mapping), scale).to(grad.dtype)
    grad_view = torch.zeros_like(view)
    for g, a, b in ranges:
        cols = _group_columns(mapping, groups, g)
        block = view[:, cols]
        grad_x[a:b] = grad[a:b] @ (block if flip else block.t())
        grad_view[:, cols] = grad[a:b].t() @ x[a:b] if flip else x[a:b].t() @ grad[a:b]
    if grad_norm:
        grad_view = normalize(grad_view, site_grad_rms(grad_view))
    return grad_x, scatter_view_grad(grad_view, _mapping(mapping), scale, memory.numel()).to(memory.dtype)


@_grouped_mm_grad.register_fake
def _(grad, x, memory, offs, mapping, scale, groups, flip, grad_norm):
    return torch.empty_like(x), torch.empty_like(memory)


roast_grouped_mm.register_autograd(_grouped_backward, setup_context=_grouped_setup)


def roast_picked_mm(x: torch.Tensor, group: torch.Tensor, memory: torch.Tensor, mapping: list[int], scale: float,
                    groups: int, transpose_view: bool = False, grad_norm: bool = False) -> torch.Tensor:
    """Row r of ``x`` (rows, K) times B_g of its own group g = ``group[r]`` (B_g^T when transpose_view): what
    ``bmm(x.unsqueeze(1), W[group])`` computes by gathering one stacked weight per row (transformers'
    ``batched_mm`` experts), here with no weight gathered. The rows are sorted by group (a stable sort, on the
    device: no host sync; the groups' ends by a binary search in the sorted ids), run through one
    ``roast_grouped_mm`` and put back in their order. Plain torch ops
    around the custom op, so autograd, dynamo and AOTAutograd trace it."""
    group = group.long()
    group = torch.where(group < 0, group + groups, group)  # W[ids] wraps a negative id, as indexing does
    # an id past the groups would leave its row out of every group (a zero row): refused instead, as W[ids] does,
    # without a host sync on a GPU (a device-side assert)
    torch._assert_async(((group >= 0) & (group < groups)).all(),
                        f"roast_picked_mm: an id is out of range for {groups} groups (stacked weights)")
    sorted_group, order = torch.sort(group, stable=True)
    # each group's cumulative end: where it stops in the sorted order (no atomics: deterministic on a GPU)
    offs = torch.searchsorted(sorted_group, torch.arange(groups, device=group.device), right=True)
    out = torch.ops.roastfx.roast_grouped_mm(x.index_select(0, order), memory, offs, mapping, scale, groups,
                                             transpose_view=transpose_view, grad_norm=grad_norm)
    return out.index_select(0, torch.argsort(order))


def _row_memory_grad(grad_rows: torch.Tensor, ids: torch.Tensor, mapping: TileHash, scale: float,
                     size: int, dtype: torch.dtype) -> torch.Tensor:
    values = grad_rows.reshape(-1, mapping.cols).to(torch.float32 if dtype != torch.float64 else dtype)
    return scatter_rows_grad(values, ids.reshape(-1), mapping, scale, size).to(dtype)


@torch.library.custom_op("roastfx::roast_embedding", mutates_args=())
def roast_embedding(ids: torch.Tensor, memory: torch.Tensor, mapping: list[int], scale: float,
                    padding_idx: int | None = None, grad_norm: bool = False) -> torch.Tensor:
    """``F.embedding(ids, W, padding_idx)`` reading only the looked-up rows of the site's view from the memory.

    padding_idx (in [0, rows)) changes only the backward: its row gets no gradient. grad_norm: the
    memory gets the table's gradient divided by its RMS over the whole table (grad_norm.py).
    """
    if use_triton(memory):
        _kernels()
        return torch.ops.roastfx.gather_rows(memory, ids, mapping, scale, None)
    return gather_rows(memory, _mapping(mapping), scale, ids)


@roast_embedding.register_fake
def _(ids, memory, mapping, scale, padding_idx=None, grad_norm=False):
    return memory.new_empty((*ids.shape, mapping[1]))


@torch.library.custom_op("roastfx::roast_embedding_grad", mutates_args=())
def _roast_embedding_grad(grad_rows: torch.Tensor, ids: torch.Tensor, memory: torch.Tensor, mapping: list[int],
                          scale: float, grad_norm: bool = False) -> torch.Tensor:
    if use_triton(memory):
        _kernels()
        grad = torch.ops.roastfx.gather_rows_grad(grad_rows.contiguous(), memory, ids, mapping, scale)
    else:
        grad = _row_memory_grad(grad_rows, ids, _mapping(mapping), scale, memory.numel(), memory.dtype)
    return normalize(grad, table_grad_rms(grad_rows, ids, mapping)) if grad_norm else grad


def table_grad_rms(grad_rows: torch.Tensor, ids: torch.Tensor, mapping: list[int]) -> torch.Tensor:
    """rms of an embedding table's gradient from its looked-up rows: the table's nonzero rows are the
    per-id sums of the output gradient rows; the rows no id looked up are zeros.

    The ids are grouped by a sort, not torch.unique, whose output size the host must learn (a GPU
    sync every step): each id's group number comes from the sorted order, and the group sums go
    into a buffer with one row per looked-up token, the rows past the last group staying zero."""
    flat = ids.reshape(-1)
    rows = grad_rows.reshape(-1, mapping[1])
    sorted_ids, order = torch.sort(flat, stable=True)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
    group = torch.empty_like(order).scatter_(0, order, torch.cumsum(starts, 0) - 1)
    summed = rows.new_zeros(rows.shape).index_put_((group,), rows, accumulate=True)  # deterministic
    return site_grad_rms(summed, mapping[0] * mapping[1])


@_roast_embedding_grad.register_fake
def _(grad_rows, ids, memory, mapping, scale, grad_norm=False):
    return torch.empty_like(memory)


def _embedding_setup(ctx, inputs, output):
    ids, memory, ctx.mapping, ctx.scale, ctx.padding_idx, ctx.grad_norm = inputs
    ctx.save_for_backward(ids, memory)


def _embedding_backward(ctx, grad):
    ids, memory = ctx.saved_tensors
    if ctx.padding_idx is not None:
        grad = grad.masked_fill((ids == ctx.padding_idx).unsqueeze(-1), 0)
    grad_memory = _roast_embedding_grad(grad, ids, memory, ctx.mapping, ctx.scale, ctx.grad_norm)
    return None, grad_memory, None, None, None, None


roast_embedding.register_autograd(_embedding_backward, setup_context=_embedding_setup)


def embedding_bag_of_rows(rows: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor | None, mode: str,
                          per_sample_weights: torch.Tensor | None, include_last_offset: bool) -> torch.Tensor:
    """``F.embedding_bag(ids, W, offsets, ...)`` given ``rows = W[ids]`` (from roast_embedding): the bags
    are reduced over the looked-up rows only, so the table is never built."""
    flat = rows.reshape(-1, rows.shape[-1])
    positions = torch.arange(flat.shape[0], device=ids.device, dtype=ids.dtype).reshape(ids.shape)
    return torch.nn.functional.embedding_bag(positions, flat, offsets, mode=mode,
                                             per_sample_weights=per_sample_weights,
                                             include_last_offset=include_last_offset)


from .conv import roast_conv, roast_conv_row_scaled, roast_conv_transpose  # noqa: E402,F401 (registers the conv ops, built on the above)
