"""The ROAST ops as differentiable torch functions, backed by the Triton kernels.

Every op takes the global memory, one site's mapping and its scale. Gradients reach
the inputs and the memory; the memory's gradient is reduced with atomic adds, or
deterministically when torch.use_deterministic_algorithms(True) is in effect at run time.

The ops are registered with torch.library.custom_op (namespace ``roastfx``) with fake
implementations and autograd formulas, so torch.compile and AOTAutograd see one opaque
op per site instead of tracing into a Triton launch. A mapping crosses the op boundary
as its 13 integers (`mapping_to_list`). Schemas other code calls:

    roastfx::linear(x, memory, bias?, residual?, mapping, scale, transposed_view, activation, store_pre) -> (y, pre)
    roastfx::linear_grad_input(grad_z, memory, mapping, scale, transposed_view) -> grad_x (2-D)
    roastfx::linear_grad_memory(x, grad_z, memory, mapping, scale, transposed_view) -> grad_memory
    roastfx::linear_grad_memory_sumsq(x, grad_z, memory, mapping, scale, transposed_view)
        -> (grad_memory, sum of dV^2 as a float64 0-d tensor)
    roastfx::gather_rows(memory, ids?, mapping, scale, dtype?) -> rows (the whole view when ids is None)
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .hashing import TileHash
from .triton_embedding import gather_rows, scatter_rows_grad
from .triton_materialize import materialize
from .triton_matmul import ACTIVATIONS, apply_activation, roast_grad_memory, roast_grad_memory_sumsq, roast_matmul

__all__ = ["roast_linear", "roast_embedding", "roast_embedding_bag", "roast_materialize", "apply_activation",
           "mapping_to_list"]


def mapping_to_list(mapping: TileHash) -> list[int]:
    return mapping.to_list()


def _mapping(values: list[int]) -> TileHash:
    return TileHash(*values)


def _activation_backward(grad: Tensor, pre: Tensor, activation: str) -> Tensor:
    grad, pre = grad.float(), pre.float()
    if activation == "relu":
        return torch.where(pre > 0, grad, torch.zeros_like(grad))
    if activation == "gelu_tanh":
        return torch.ops.aten.gelu_backward(grad, pre, approximate="tanh")
    return torch.ops.aten.silu_backward(grad, pre)


# -- linear ----------------------------------------------------------------------------------
def _out_features(mapping: list[int], transposed_view: bool) -> int:
    return mapping[1] if transposed_view else mapping[0]


@torch.library.custom_op("roastfx::linear", mutates_args=())
def _linear(x: Tensor, memory: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], mapping: list[int],
            scale: float, transposed_view: bool, activation: str, store_pre: bool) -> tuple[Tensor, Tensor]:
    """(y, pre-activation) with y = activation(x @ op(V) * scale + bias) + residual; pre is empty unless store_pre."""
    n_out = _out_features(mapping, transposed_view)
    out_shape = (*x.shape[:-1], n_out)
    res2 = residual.expand(out_shape).reshape(-1, n_out) if residual is not None else None
    y, pre = roast_matmul(x.reshape(-1, x.shape[-1]), memory.reshape(-1), _mapping(mapping), scale,
                          view_is_b=transposed_view, bias=bias, activation=activation, residual=res2,
                          store_pre=store_pre)
    return y.reshape(out_shape), pre.reshape(out_shape) if pre is not None else x.new_empty(0)


@_linear.register_fake
def _(x, memory, bias, residual, mapping, scale, transposed_view, activation, store_pre):
    out_shape = (*x.shape[:-1], _out_features(mapping, transposed_view))
    return x.new_empty(out_shape), x.new_empty(out_shape if store_pre else (0,))


@torch.library.custom_op("roastfx::linear_grad_input", mutates_args=())
def _linear_grad_input(grad_z: Tensor, memory: Tensor, mapping: list[int], scale: float,
                       transposed_view: bool) -> Tensor:
    """dX = dZ @ op(V)^T: the forward kernel reading the view the other way round. grad_z is 2-D."""
    grad_x, _ = roast_matmul(grad_z, memory.reshape(-1), _mapping(mapping), scale, view_is_b=not transposed_view)
    return grad_x


@_linear_grad_input.register_fake
def _(grad_z, memory, mapping, scale, transposed_view):
    return grad_z.new_empty((grad_z.shape[0], mapping[0] if transposed_view else mapping[1]))


@torch.library.custom_op("roastfx::linear_grad_memory", mutates_args=())
def _linear_grad_memory(x: Tensor, grad_z: Tensor, memory: Tensor, mapping: list[int], scale: float,
                        transposed_view: bool) -> Tensor:
    """dMemory for dV = x^T dZ (view is B) or dZ^T x (view is W); x and grad_z are 2-D."""
    a, c = (x, grad_z) if transposed_view else (grad_z, x)
    grad = roast_grad_memory(a, c, memory.numel(), _mapping(mapping), scale)
    return grad.to(memory.dtype).reshape(memory.shape)


@_linear_grad_memory.register_fake
def _(x, grad_z, memory, mapping, scale, transposed_view):
    return torch.empty_like(memory)


@torch.library.custom_op("roastfx::linear_grad_memory_sumsq", mutates_args=())
def _linear_grad_memory_sumsq(x: Tensor, grad_z: Tensor, memory: Tensor, mapping: list[int], scale: float,
                              transposed_view: bool) -> tuple[Tensor, Tensor]:
    """``linear_grad_memory`` and sum(dV^2) from the same kernel launch (for grad_scaling="site")."""
    a, c = (x, grad_z) if transposed_view else (grad_z, x)
    grad, sumsq = roast_grad_memory_sumsq(a, c, memory.numel(), _mapping(mapping), scale)
    return grad.to(memory.dtype).reshape(memory.shape), sumsq


@_linear_grad_memory_sumsq.register_fake
def _(x, grad_z, memory, mapping, scale, transposed_view):
    return torch.empty_like(memory), x.new_empty((), dtype=torch.float64)


def _linear_setup_context(ctx, inputs, output):
    x, memory, bias, residual, mapping, scale, transposed_view, activation, store_pre = inputs
    ctx.save_for_backward(x, memory, output[1] if store_pre else None)
    ctx.site = (mapping, scale, transposed_view, activation)
    ctx.residual_shape = residual.shape if residual is not None else None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _linear_backward(ctx, grad_y, grad_pre):
    x, memory, pre = ctx.saved_tensors
    mapping, scale, transposed_view, activation = ctx.site
    needs = ctx.needs_input_grad
    grad_y2 = grad_y.reshape(-1, grad_y.shape[-1])
    grad_z = grad_y2 if pre is None else _activation_backward(grad_y2, pre.reshape(grad_y2.shape), activation)
    grad_z = grad_z.to(x.dtype).contiguous()
    x2 = x.reshape(-1, x.shape[-1])
    grad_x = _linear_grad_input(grad_z, memory, mapping, scale, transposed_view).reshape(x.shape) if needs[0] else None
    grad_memory = _linear_grad_memory(x2, grad_z, memory, mapping, scale, transposed_view) if needs[1] else None
    grad_bias = grad_z.float().sum(0).to(ctx.bias_dtype) if needs[2] else None
    grad_residual = grad_y.sum_to_size(ctx.residual_shape) if needs[3] else None
    return grad_x, grad_memory, grad_bias, grad_residual, None, None, None, None, None


_linear.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def roast_linear(
    x: Tensor,
    memory: Tensor,
    mapping: TileHash,
    scale: float,
    transposed_view: bool,
    bias: Tensor | None = None,
    activation: str | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """``activation(F.linear(x, W, bias)) + residual`` with W read from the memory by the mapping.

    W is the site's parameter: its view V is W^T when ``transposed_view`` (nn.Linear:
    rows = in_features, cols = out_features), else W itself. x may have any leading
    dims; its dtype (fp32, fp16 or bf16) is the output's; accumulation is fp32.
    activation: None, "relu", "gelu_tanh" or "silu". residual broadcasts to the output.
    """
    if not isinstance(mapping, TileHash):
        raise TypeError(f"mapping must be a TileHash, got {type(mapping).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {sorted(k for k in ACTIVATIONS if k)} or None")
    activation = activation or "none"
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, memory, bias))
    store_pre = activation != "none" and wants_grad
    y, _ = _linear(x, memory, bias, residual, mapping_to_list(mapping), float(scale), bool(transposed_view),
                   activation, store_pre)
    return y


# -- rows of a view: embeddings and materialize -----------------------------------------------
@torch.library.custom_op("roastfx::gather_rows", mutates_args=())
def _gather_rows(memory: Tensor, ids: Optional[Tensor], mapping: list[int], scale: float,
                 dtype: Optional[torch.dtype]) -> Tensor:
    """Rows ``ids`` of the view (ids.shape + (cols,)), or the whole view when ids is None."""
    if ids is None:
        return materialize(memory.reshape(-1), _mapping(mapping), scale, dtype)
    return gather_rows(memory.reshape(-1), _mapping(mapping), scale, ids, dtype)


@_gather_rows.register_fake
def _(memory, ids, mapping, scale, dtype):
    shape = (mapping[0], mapping[1]) if ids is None else (*ids.shape, mapping[1])
    return memory.new_empty(shape, dtype=dtype or memory.dtype)


@torch.library.custom_op("roastfx::gather_rows_grad", mutates_args=())
def _gather_rows_grad(grad_out: Tensor, memory: Tensor, ids: Optional[Tensor], mapping: list[int],
                      scale: float) -> Tensor:
    if ids is None:
        ids = torch.arange(mapping[0], device=grad_out.device)
    grad = scatter_rows_grad(grad_out, memory.numel(), _mapping(mapping), scale, ids)
    return grad.to(memory.dtype).reshape(memory.shape)


@_gather_rows_grad.register_fake
def _(grad_out, memory, ids, mapping, scale):
    return torch.empty_like(memory)


def _gather_setup_context(ctx, inputs, output):
    memory, ids, mapping, scale, _ = inputs
    ctx.save_for_backward(memory, ids)
    ctx.site = (mapping, scale)


def _gather_backward(ctx, grad_out):
    memory, ids = ctx.saved_tensors
    mapping, scale = ctx.site
    return _gather_rows_grad(grad_out.contiguous(), memory, ids, mapping, scale), None, None, None, None


_gather_rows.register_autograd(_gather_backward, setup_context=_gather_setup_context)


def roast_embedding(ids: Tensor, memory: Tensor, mapping: TileHash, scale: float,
                    dtype: torch.dtype | None = None) -> Tensor:
    """``F.embedding(ids, W)`` for a table W = the site's view (rows = num_embeddings)."""
    return _gather_rows(memory, ids, mapping_to_list(mapping), float(scale), dtype)


def roast_embedding_bag(ids: Tensor, memory: Tensor, mapping: TileHash, scale: float, mode: str = "mean",
                        offsets: Tensor | None = None, per_sample_weights: Tensor | None = None) -> Tensor:
    """``F.embedding_bag(ids, W, offsets, mode=mode, per_sample_weights=...)``; mode "sum" or "mean".

    ids is (bags, bag_size), or 1-D with ``offsets`` giving where each bag starts.
    """
    if mode not in ("sum", "mean"):
        raise ValueError(f"embedding bag mode {mode!r} is not 'sum' or 'mean'")
    if per_sample_weights is not None and mode != "sum":
        raise ValueError(f"per_sample_weights need mode 'sum', got {mode!r}")
    if (ids.dim() == 2) == (offsets is not None) or ids.dim() not in (1, 2):
        raise ValueError(
            f"roast_embedding_bag takes 2-D ids without offsets or 1-D ids with offsets, got ids of shape "
            f"{tuple(ids.shape)} and offsets {'given' if offsets is not None else 'None'}"
        )
    rows = roast_embedding(ids, memory, mapping, scale)
    if per_sample_weights is not None:
        rows = rows * per_sample_weights.unsqueeze(-1).to(rows.dtype)
    if offsets is None:
        return rows.sum(1) if mode == "sum" else rows.mean(1)
    # bag of each id, then a deterministic sum per bag (index_put_ with accumulate)
    positions = torch.arange(ids.numel(), device=ids.device)
    bag = torch.searchsorted(offsets.to(positions.dtype), positions, right=True) - 1
    out = rows.new_zeros((offsets.numel(), rows.shape[-1])).index_put((bag,), rows, accumulate=True)
    if mode == "mean":
        counts = torch.zeros(offsets.numel(), device=ids.device, dtype=rows.dtype).index_put(
            (bag,), torch.ones_like(bag, dtype=rows.dtype), accumulate=True)
        out = out / counts.clamp_min(1).unsqueeze(-1)
    return out


def roast_materialize(memory: Tensor, mapping: TileHash, scale: float, dtype: torch.dtype | None = None) -> Tensor:
    """The site's dense (rows, cols) view, differentiable w.r.t. the memory (for fallbacks)."""
    return _gather_rows(memory, None, mapping_to_list(mapping), float(scale), dtype)
