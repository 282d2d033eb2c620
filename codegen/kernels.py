"""The ROAST ops as differentiable torch functions, backed by the Triton kernels.

Every op takes the global memory, one site's mapping and its scale. Gradients reach
the inputs and the memory; the memory's gradient is reduced with atomic adds, or
deterministically when torch.use_deterministic_algorithms(True) is in effect.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .hashing import TileHash
from .triton_embedding import gather_rows, scatter_rows_grad
from .triton_materialize import materialize
from .triton_matmul import ACTIVATIONS, roast_grad_memory, roast_matmul

__all__ = ["roast_linear", "roast_embedding", "roast_embedding_bag", "roast_materialize", "apply_activation"]


def apply_activation(z: torch.Tensor, activation: str | None) -> torch.Tensor:
    """The epilogue activations in plain torch (the kernels compute the same functions)."""
    if activation in (None, "none"):
        return z
    if activation == "relu":
        return F.relu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if activation == "silu":
        return F.silu(z)
    raise ValueError(f"activation {activation!r} is not one of {sorted(k for k in ACTIVATIONS if k)} or None")


def _activation_backward(grad: torch.Tensor, pre: torch.Tensor, activation: str) -> torch.Tensor:
    z = pre.detach().float().requires_grad_()
    with torch.enable_grad():
        out = apply_activation(z, activation)
    return torch.autograd.grad(out, z, grad.float())[0]


class _RoastLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, memory, bias, residual, mapping, scale, transposed_view, activation):
        x2 = x.reshape(-1, x.shape[-1])
        n_out = mapping.cols if transposed_view else mapping.rows
        out_shape = (*x.shape[:-1], n_out)
        res2 = residual.expand(out_shape).reshape(-1, n_out) if residual is not None else None
        has_activation = activation not in (None, "none")
        wants_grad = any(ctx.needs_input_grad[:3])
        y, pre = roast_matmul(
            x2, memory, mapping, scale, view_is_b=transposed_view, bias=bias, activation=activation,
            residual=res2, store_pre=has_activation and wants_grad,
        )
        ctx.save_for_backward(x2, memory, pre)
        ctx.site = (mapping, scale, transposed_view, activation)
        ctx.shapes = (x.shape, residual.shape if residual is not None else None, bias.dtype if bias is not None else None)
        return y.reshape(out_shape)

    @staticmethod
    def backward(ctx, grad_y):
        x2, memory, pre = ctx.saved_tensors
        mapping, scale, transposed_view, activation = ctx.site
        x_shape, residual_shape, bias_dtype = ctx.shapes
        grad_y2 = grad_y.reshape(x2.shape[0], -1)
        grad_residual = grad_y.sum_to_size(residual_shape) if ctx.needs_input_grad[3] else None
        grad_z = grad_y2 if pre is None else _activation_backward(grad_y2, pre, activation)
        grad_z = grad_z.to(x2.dtype).contiguous()
        grad_bias = grad_z.float().sum(0).to(bias_dtype) if ctx.needs_input_grad[2] else None
        grad_x = grad_memory = None
        if ctx.needs_input_grad[0]:
            # dX = dZ @ op(V)^T: the same kernel, reading the view the other way round
            grad_x, _ = roast_matmul(grad_z, memory, mapping, scale, view_is_b=not transposed_view)
            grad_x = grad_x.reshape(x_shape)
        if ctx.needs_input_grad[1]:
            a, c = (x2, grad_z) if transposed_view else (grad_z, x2)
            grad_memory = roast_grad_memory(a, c, memory.numel(), mapping, scale).to(memory.dtype)
            grad_memory = grad_memory.reshape(memory.shape)
        return grad_x, grad_memory, grad_bias, grad_residual, None, None, None, None


def roast_linear(
    x: torch.Tensor,
    memory: torch.Tensor,
    mapping: TileHash,
    scale: float,
    transposed_view: bool,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``activation(F.linear(x, W, bias)) + residual`` with W read from the memory by the mapping.

    W is the site's parameter: its view V is W^T when ``transposed_view`` (nn.Linear:
    rows = in_features, cols = out_features), else W itself. x may have any leading
    dims; its dtype (fp32, fp16 or bf16) is the output's; accumulation is fp32.
    activation: None, "relu", "gelu_tanh" or "silu". residual broadcasts to the output.
    """
    if not isinstance(mapping, TileHash):
        raise TypeError(f"mapping must be a TileHash, got {type(mapping).__name__}")
    return _RoastLinear.apply(x, memory, bias, residual, mapping, float(scale), bool(transposed_view), activation)


class _RoastGatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, memory, ids, mapping, scale, dtype):
        # ids None: every row, i.e. the whole view
        ctx.save_for_backward(ids)
        ctx.site = (mapping, scale, memory.numel(), memory.shape, memory.dtype)
        if ids is None:
            return materialize(memory, mapping, scale, dtype)
        return gather_rows(memory, mapping, scale, ids, dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        mapping, scale, size, shape, dtype = ctx.site
        if ids is None:
            ids = torch.arange(mapping.rows, device=grad_out.device)
        grad = scatter_rows_grad(grad_out, size, mapping, scale, ids)
        return grad.to(dtype).reshape(shape), None, None, None, None


def roast_embedding(ids: torch.Tensor, memory: torch.Tensor, mapping: TileHash, scale: float,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """``F.embedding(ids, W)`` for a table W = the site's view (rows = num_embeddings)."""
    return _RoastGatherRows.apply(memory, ids, mapping, float(scale), dtype)


def roast_embedding_bag(ids: torch.Tensor, memory: torch.Tensor, mapping: TileHash, scale: float,
                        mode: str = "mean") -> torch.Tensor:
    """``F.embedding_bag`` over fixed-size bags: ids is (bags, bag_size); mode "sum" or "mean"."""
    if ids.dim() != 2:
        raise ValueError(f"roast_embedding_bag takes (bags, bag_size) ids, got shape {tuple(ids.shape)}")
    if mode not in ("sum", "mean"):
        raise ValueError(f"embedding bag mode {mode!r} is not 'sum' or 'mean'")
    rows = roast_embedding(ids, memory, mapping, scale)
    return rows.sum(1) if mode == "sum" else rows.mean(1)


def roast_materialize(memory: torch.Tensor, mapping: TileHash, scale: float,
                      dtype: torch.dtype | None = None) -> torch.Tensor:
    """The site's dense (rows, cols) view, differentiable w.r.t. the memory (for fallbacks)."""
    return _RoastGatherRows.apply(memory, None, mapping, float(scale), dtype)
