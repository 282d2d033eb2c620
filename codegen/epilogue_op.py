"""``roastfx::roast_linear_epilogue``: a ROAST linear followed by any lowerable pointwise chain.

    roast_linear_epilogue(x, memory, mapping, scale, extras, epilogue, transpose_view, grad_norm)
        -> epilogue(x @ V, extras)      (x @ V^T when transpose_view)

V is the site's B view read from the memory (as in ``roastfx::roast_linear``);
``epilogue`` is an `Epilogue` signature string (codegen/epilogue.py) whose steps refer
to ``extras`` as x0, x1 ... Forward runs the kernel generated for the epilogue's pattern
(codegen/triton_epilogue.py) when ``ops.use_triton(x)``, else the reference: the view
materialized, ``x @ V``, then ``Epilogue.apply``. Backward recomputes ``x @ V`` (the
pre-epilogue product is not kept alive), differentiates ``Epilogue.apply`` with
torch.func.vjp, and sends the product's gradient through the existing kernels
(``roastfx::linear_grad_input`` / ``linear_grad_memory``) or the reference formulas;
with grad_norm the memory gets the view's gradient divided by its RMS (grad_norm.py).
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from .epilogue import Epilogue
from .hashing import TileHash
from .grad_norm import normalize, site_grad_rms
from .ops import linear_grad_memory, use_triton  # also registers roastfx::materialize and roastfx::memory_grad

__all__ = ["roast_linear_epilogue", "parse_epilogue"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@lru_cache(maxsize=1024)
def parse_epilogue(signature: str) -> Epilogue:
    return Epilogue.parse(signature)


def _mapping(values: list[int]) -> TileHash:
    if len(values) != 13:
        raise ValueError(f"mapping must be the 13 TileHash integers, got {len(values)} values")
    return TileHash(*[int(v) for v in values])


def _kernel_applies(x: Tensor, memory: Tensor, extras: list[Tensor], out_dtype: torch.dtype) -> bool:
    """The generated kernel computes in fp32 on x's device: float64 anywhere (but a 0-dim extra, which
    promotes like a number and is read as fp32), or an extra on another device (other than a 0-dim one),
    goes to the reference path."""
    return (use_triton(x) and x.dtype in _KERNEL_DTYPES and memory.dtype in _KERNEL_DTYPES
            and out_dtype in _KERNEL_DTYPES and all(e.dtype != torch.float64 or e.dim() == 0 for e in extras)
            and all(e.device == x.device or e.dim() == 0 for e in extras))


def _as_2d(e: Tensor, out_shape: tuple, n: int, device: torch.device) -> Tensor:
    """An extra broadcast to the flattened (M, N) output; a (N,) vector or a scalar stays as it is
    (a 0-dim CPU tensor, which eager torch lets meet CUDA tensors, moves to the output's device)."""
    if e.dim() == 0:
        return e.to(device)
    return e if e.dim() == 1 else e.expand(out_shape).reshape(-1, n)


def _product(x: Tensor, memory: Tensor, mapping: list[int], scale: float, flip: bool) -> Tensor:
    """x @ V (x @ V^T when flip) in x's dtype, without the epilogue."""
    if use_triton(x) and x.dtype in _KERNEL_DTYPES and memory.dtype in _KERNEL_DTYPES:
        from . import kernels  # noqa: F401 - registers roastfx::linear*; imports triton

        return torch.ops.roastfx.linear(x, memory, None, None, mapping, scale, not flip, "none", False)[0]
    view = _view(memory, mapping, scale).to(x.dtype)
    return x @ (view.t() if flip else view)


def _features(mapping: list[int], flip: bool) -> tuple[int, int]:
    """(in, out) features: the view is (in, out), or (out, in) when read transposed."""
    return (mapping[1], mapping[0]) if flip else (mapping[0], mapping[1])


def _out_shape(x: Tensor, mapping: list[int], flip: bool) -> tuple:
    k, n = _features(mapping, flip)
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features but the site's view is {mapping[0]}x{mapping[1]} "
                         f"({k} expected{' with transpose_view' if flip else ''})")
    return (*x.shape[:-1], n)


def _view(memory: Tensor, mapping: list[int], scale: float) -> Tensor:
    """The B view through ``roastfx::materialize`` (ops.py): opaque to tracing, so fake tensors never
    meet the mapping's cached index tensors."""
    return torch.ops.roastfx.materialize(memory.reshape(-1), mapping, scale)


@torch.library.custom_op("roastfx::roast_linear_epilogue", mutates_args=())
def _roast_linear_epilogue(x: Tensor, memory: Tensor, mapping: list[int], scale: float, extras: list[Tensor],
                           epilogue: str, transpose_view: bool, grad_norm: bool) -> Tensor:
    """``epilogue(x @ V, extras)`` with V the site's B view read from the memory (V^T when transpose_view)."""
    epi = parse_epilogue(epilogue)
    m = _mapping(mapping)
    k, n = _features(mapping, transpose_view)
    out_shape = _out_shape(x, mapping, transpose_view)
    epi.check_extras(out_shape, extras)
    out_dtype = epi.out_dtype(x.dtype, extras)
    if _kernel_applies(x, memory, extras, out_dtype):
        from .triton_epilogue import roast_matmul_epilogue

        y = roast_matmul_epilogue(x.reshape(-1, k), memory.reshape(-1), m, scale, not transpose_view, epi,
                                  [_as_2d(e, out_shape, n, x.device) for e in extras], out_dtype)
        return y.reshape(out_shape)
    y = epi.apply(_product(x, memory, mapping, scale, transpose_view), extras)
    return y.clone() if any(y is t for t in (x, *extras)) else y


@_roast_linear_epilogue.register_fake
def _(x, memory, mapping, scale, extras, epilogue, transpose_view, grad_norm):
    epi = parse_epilogue(epilogue)
    out_shape = _out_shape(x, mapping, transpose_view)
    epi.check_extras(out_shape, extras)
    return x.new_empty(out_shape, dtype=epi.out_dtype(x.dtype, extras))


def _setup_context(ctx, inputs, output):
    """Both epilogue ops here take (x or ids, memory, mapping, scale, extras, epilogue, flag, grad_norm), the
    flag being transpose_view or padding_idx."""
    x, memory, mapping, scale, extras, epilogue, flag, grad_norm = inputs
    ctx.save_for_backward(x, memory, *extras)
    ctx.site = (mapping, scale, epilogue, flag, grad_norm)


def _backward(ctx, grad):
    x, memory, *extras = ctx.saved_tensors
    mapping, scale, epilogue, flip, grad_norm = ctx.site
    epi = parse_epilogue(epilogue)
    # the epilogue's vjp at the recomputed product: d/dz and d/d(each floating extra)
    pre = _product(x, memory, mapping, scale, flip)
    grad_pre, grad_extras = epi.vjp(pre, extras, grad)

    n = _features(mapping, flip)[1]
    grad2d = grad_pre.reshape(-1, n).to(x.dtype).contiguous()
    x2d = x.reshape(-1, x.shape[-1])
    if use_triton(x) and x.dtype in _KERNEL_DTYPES and memory.dtype in _KERNEL_DTYPES:
        from . import kernels  # noqa: F401

        grad_x = torch.ops.roastfx.linear_grad_input(grad2d, memory, mapping, scale, not flip).reshape(x.shape)
        grad_memory = linear_grad_memory(x2d, grad2d, memory, mapping, scale, not flip, grad_norm)
    else:
        view = _view(memory, mapping, scale).to(grad2d.dtype)
        grad_x = (grad2d @ (view if flip else view.t())).reshape(x.shape)
        grad_view = grad2d.t() @ x2d if flip else x2d.t() @ grad2d
        if grad_norm:
            grad_view = normalize(grad_view, site_grad_rms(grad_view))
        grad_memory = torch.ops.roastfx.memory_grad(grad_view, mapping, scale, memory.numel())
        grad_memory = grad_memory.to(memory.dtype).reshape(memory.shape)
    return grad_x, grad_memory, None, None, grad_extras, None, None, None


# transpose_view and grad_norm have no default on purpose: the dispatcher drops trailing defaulted arguments, and the
# tensor-list autograd wrapper then expects fewer gradients than the schema has inputs
_roast_linear_epilogue.register_autograd(_backward, setup_context=_setup_context)


def roast_linear_epilogue(x: Tensor, memory: Tensor, mapping, scale: float, epilogue, extras=(),
                          transpose_view: bool = False, grad_norm: bool = False) -> Tensor:
    """``epilogue(x @ V, extras)`` (``x @ V^T`` when transpose_view): ``mapping`` a TileHash or its 13
    integers, ``epilogue`` an `Epilogue` or its signature (e.g. ``"add:x0|gelu_tanh|mul:0.5|cast:bfloat16"``);
    grad_norm divides the memory's gradient by the RMS of the view's gradient."""
    if isinstance(mapping, TileHash):
        mapping = mapping.to_list()
    if isinstance(epilogue, Epilogue):
        epilogue = epilogue.signature
    elif isinstance(epilogue, str):
        Epilogue.parse(epilogue)  # a bad signature fails here, with its message, not inside the op
    else:
        raise TypeError(f"epilogue must be an Epilogue or a signature str, got {type(epilogue).__name__}")
    return _roast_linear_epilogue(x, memory, list(mapping), float(scale), list(extras), epilogue,
                                  bool(transpose_view), bool(grad_norm))


# -- an embedding lookup followed by a generated epilogue --------------------------------------------
@torch.library.custom_op("roastfx::roast_embedding_epilogue", mutates_args=())
def _roast_embedding_epilogue(ids: Tensor, memory: Tensor, mapping: list[int], scale: float, extras: list[Tensor],
                              epilogue: str, padding_idx: int | None, grad_norm: bool) -> Tensor:
    """``epilogue(roast_embedding(ids, memory, mapping, scale, padding_idx), extras)``: on the Triton path one
    generated kernel looks the rows up and applies the epilogue (triton_epilogue.roast_embedding_epilogue)."""
    epi = parse_epilogue(epilogue)
    out_dtype = epi.out_dtype(memory.dtype, extras)
    if (use_triton(memory) and memory.dtype in _KERNEL_DTYPES and out_dtype in _KERNEL_DTYPES
            and all(e.dtype != torch.float64 or e.dim() == 0 for e in extras)
            and all(e.device == memory.device or e.dim() == 0 for e in extras)):
        from .triton_epilogue import roast_embedding_epilogue

        return roast_embedding_epilogue(memory, _mapping(mapping), scale, ids, epi, extras, out_dtype)
    rows = torch.ops.roastfx.roast_embedding(ids, memory, mapping, scale, padding_idx, grad_norm)
    y = epi.apply(rows, extras)
    return y.clone() if any(y is t for t in extras) else y


@_roast_embedding_epilogue.register_fake
def _(ids, memory, mapping, scale, extras, epilogue, padding_idx, grad_norm):
    epi = parse_epilogue(epilogue)
    shape = (*ids.shape, mapping[1])
    epi.check_extras(shape, extras)
    return memory.new_empty(shape, dtype=epi.out_dtype(memory.dtype, extras))


def _embedding_epilogue_backward(ctx, grad):
    """The epilogue's vjp at the recomputed rows, then the lookup's memory gradient (padding_idx's rows get
    none; with grad_norm, divided by the table gradient's RMS)."""
    ids, memory, *extras = ctx.saved_tensors
    mapping, scale, epilogue, padding_idx, grad_norm = ctx.site
    epi = parse_epilogue(epilogue)
    rows = torch.ops.roastfx.roast_embedding(ids, memory, mapping, scale, padding_idx, grad_norm)
    grad_rows, grad_extras = epi.vjp(rows, extras, grad)
    if padding_idx is not None:
        grad_rows = grad_rows.masked_fill((ids == padding_idx).unsqueeze(-1), 0)
    grad_memory = torch.ops.roastfx.roast_embedding_grad(grad_rows.to(memory.dtype), ids, memory, mapping, scale,
                                                         grad_norm)
    return None, grad_memory, None, None, grad_extras, None, None, None


_roast_embedding_epilogue.register_autograd(_embedding_epilogue_backward, setup_context=_setup_context)
